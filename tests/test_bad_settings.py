"""Bad settings are refused with a message naming the key and exit status 2, before any run
directory exists or anything trains; the data and model checks that need the loaded model
or data run before the run directory too."""

import io
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import CLASSES, COLOURS, jpeg_bytes, make_tiny_clip_dir
from PIL import Image

from fedlrm.cli import main
from fedlrm.config import DataConfig
from fedlrm.errors import ConfigError, DataError
from fedlrm.seeding import clients_per_round, sample_clients

NO_CUDA = not torch.cuda.is_available()
NO_MPS = not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def nothing_written(folder):
    return not folder.exists() or not any(folder.iterdir())


# (overrides, a text the message must hold: the key it is about)
BAD = [
    # crashed with a traceback
    (["train.lr=nan"], "train.lr"),
    (["train.lr=-1"], "train.lr"),
    (["train.weight_decay=-1"], "train.weight_decay"),
    (["train.threads=-1"], "train.threads"),
    (["train.device=banana"], "train.device"),
    (["output_dir=/dev/null/x"], "output_dir"),
    (["model.prompt={} {}"], "model.prompt"),
    (['model.prompt="{} {}"'], "model.prompt"),
    (["model.prompt={}{"], "model.prompt"),
    (['model.prompt="{}{"'], "model.prompt"),
    (["name=["], "name"),
    (["train.lr={"], "train.lr"),
    # refused only after writing part of a run directory, or after round 1 trained
    (["train.lr=inf"], "train.lr"),
    (["adapter.alpha=nan"], "adapter.alpha"),
    (["privacy.clip=inf", "privacy.noise_multiplier=1.0"], "privacy.clip"),
    (["federation.min_clients=10"], "federation.min_clients"),
    (["train.client_fraction=0.34", "federation.min_clients=2"], "federation.min_clients"),
    # accepted silently
    (["federation.max_norm_ratio=nan"], "federation.max_norm_ratio"),
    (["federation.max_norm_ratio=inf"], "federation.max_norm_ratio"),
    (["federation.max_norm_ratio=0"], "federation.max_norm_ratio"),
    (["federation.max_weight_share=0.05"], "federation.max_weight_share"),
    (["federation.max_weight_share=nan"], "federation.max_weight_share"),
    (["federation.clip_update_norm=nan"], "federation.clip_update_norm"),
    (["federation.clip_update_norm=0"], "federation.clip_update_norm"),
    (["federation.aggregator=mode"], "federation.aggregator"),
    (["federation.aggregator=median", "algorithm=fedpia"], "federation.aggregator"),
    (["federation.aggregator=krum", "federation.byzantine=1"], "federation.aggregator"),
    (["federation.trim_fraction=0.5"], "federation.trim_fraction"),
    (["federation.max_examples=0"], "federation.max_examples"),
    (["train.eval_fraction=0"], "train.eval_fraction"),
    (["train.eval_fraction=nan"], "train.eval_fraction"),
    (["privacy.clip=nan"], "privacy.clip"),
    (["privacy.noise_multiplier=nan", "privacy.clip=1.0"], "privacy.noise_multiplier"),
    (["data.test_per_client=0"], "data.test_per_client"),
    (["adapter.alpha=-32"], "adapter.alpha"),
    (["algorithm=fedlease", "fedlease.warmup_rounds=3"], "fedlease.warmup_rounds"),
    (["name=../../x"], "name"),
    (["name=/tmp/fedlrm-elsewhere"], "name"),
    (["name=.."], "name"),
    (["data.dirichlet_alpha=inf"], "data.dirichlet_alpha"),
    (["train.momentum=nan"], "train.momentum"),
    (["fedprox.mu=nan"], "fedprox.mu"),
    (["algorithm=f3ocus", "model.target_layers=[0]", "f3ocus.budget=2"], "f3ocus.budget"),
    # devices this machine does not have: refused before the model loads
    (["train.device=cuda:99"], "train.device"),
    pytest.param(["train.device=cuda"], "train.device", marks=pytest.mark.skipif(not NO_CUDA, reason="has CUDA")),
    pytest.param(["train.device=mps"], "train.device", marks=pytest.mark.skipif(not NO_MPS, reason="has MPS")),
    # need the loaded model: refused after it loads, before the run directory
    (["model.target_layers=[0,99]"], "model.target_layers"),
    (["model.target_layers=[-3]"], "model.target_layers"),
    (["algorithm=f3ocus", "f3ocus.budget=99"], "f3ocus.budget"),
    (["adapter.rank=33"], "adapter.rank"),  # the tiny model's layers are 32 -> 32
]


@pytest.mark.parametrize("overrides,key", BAD)
def test_bad_setting_is_refused_before_anything_is_written(capsys, tiny_overrides, tmp_path, overrides, key):
    code, _, err = run_cli(capsys, "run", "--no-progress", *tiny_overrides, *overrides)
    assert code == 2, err
    assert "Traceback" not in err and "fedlrm: error: " in err
    assert key in err
    assert nothing_written(tmp_path / "runs")
    assert not (tmp_path.parent / "x").exists()  # name=../../x


def test_the_refused_values_name_what_to_do(capsys, tiny_overrides):
    _, _, err = run_cli(capsys, "run", *tiny_overrides, "train.device=banana")
    assert "cpu" in err and "cuda" in err
    _, _, err = run_cli(capsys, "run", *tiny_overrides, "train.device=cuda:99")
    assert "not available on this machine" in err and "cpu" in err
    _, _, err = run_cli(capsys, "run", *tiny_overrides, "federation.min_clients=10")
    assert "3 client(s)" in err and "at most 3" in err
    _, _, err = run_cli(capsys, "run", *tiny_overrides, "model.target_layers=[0,99]")
    assert "[99]" in err and "2 blocks" in err
    _, _, err = run_cli(capsys, "run", *tiny_overrides, "algorithm=f3ocus", "f3ocus.budget=99")
    assert "at most 2" in err
    _, _, err = run_cli(capsys, "run", *tiny_overrides, "adapter.rank=33")
    assert "at most 32" in err


def test_valid_edge_values_still_run_far_enough(capsys, tiny_overrides, tmp_path):
    """The checks refuse the bad values only: null turns the norm check off and 0 DP, a prompt may
    use {0}, and a budget equal to the adapted blocks is fine (the config command loads only)."""
    code, out, err = run_cli(capsys, "config", *tiny_overrides, "federation.max_norm_ratio=null", "privacy.clip=0",
                             "model.prompt=a {0} in a photo", "data.test_per_client=null", "name=run-1",
                             "train.device=cuda", "algorithm=fedlease", "fedlease.warmup_rounds=2")
    assert code == 0, err
    assert "a {0} in a photo" in out


def test_clients_per_round_is_what_sampling_draws():
    for n in (1, 3, 7, 10):
        for fraction in (0.1, 0.25, 0.34, 0.5, 0.99, 1.0):
            assert clients_per_round(n, fraction) == len(sample_clients(0, 1, n, fraction))


def test_degenerate_text_features_are_refused(capsys, tiny_overrides, tmp_path):
    """A checkpoint whose text_config.eos_token_id is not its tokenizer's: transformers pools
    every prompt at position 0 (the id is nowhere in the prompt), so every class has the
    same text feature and a run would learn nothing while ending with success."""
    folder = make_tiny_clip_dir(tmp_path / "bad-clip")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 1  # the tokenizer's eos is 3; 1 ([UNK]) is in no prompt
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "run", "--no-progress", *tiny_overrides, f"model.name={folder}")
    assert code == 2 and "Traceback" not in err
    assert "same feature" in err
    assert "text_config.eos_token_id is 1" in err and "eos_token_id is 3" in err
    assert nothing_written(tmp_path / "runs")


def test_matching_eos_token_gives_distinct_text_features(tiny_clip_dir):
    from fedlrm.config import ModelConfig
    from fedlrm.models import ClipClassifier, load_backbone

    classifier = ClipClassifier(load_backbone(ModelConfig(name=tiny_clip_dir)), CLASSES)
    cos = classifier.text_features @ classifier.text_features.t()
    assert cos[~torch.eye(len(CLASSES), dtype=torch.bool)].max() < 0.9999


def _integer_label_parquet(path, per_class=6, seed=0):
    """A Parquet file whose labels are plain integers: no ClassLabel, so no class names."""
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    images = [{"bytes": jpeg_bytes(COLOURS[k], rng), "path": f"{k}_{i}.jpg"} for k in range(len(CLASSES))
              for i in range(per_class)]
    labels = [k for k in range(len(CLASSES)) for _ in range(per_class)]
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(path))
    return str(path)


@pytest.fixture(scope="module")
def unnamed_parquet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unnamed")
    return _integer_label_parquet(folder / "train.parquet"), _integer_label_parquet(folder / "test.parquet", 4, 1)


def test_missing_class_names_warn_and_can_be_given(unnamed_parquet):
    from fedlrm.data.sources import load_source

    train, test = unnamed_parquet
    with pytest.warns(UserWarning, match="data.class_names"):
        source = load_source(DataConfig(source="parquet", train=train, test=test))
    assert source.class_names == [str(i) for i in range(len(CLASSES))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        source = load_source(DataConfig(source="parquet", train=train, test=test, class_names=CLASSES))
    assert source.class_names == CLASSES
    assert source.train.labels.max() == len(CLASSES) - 1


def test_class_names_of_the_wrong_length_are_refused(capsys, tiny_overrides, tiny_dataset, unnamed_parquet, tmp_path):
    from fedlrm.data.sources import load_source

    train, test = unnamed_parquet
    with pytest.raises(DataError, match="data.class_names has 5 names.*up to 5"):
        load_source(DataConfig(source="parquet", train=train, test=test, class_names=CLASSES[:5]))
    # data with its own names (a ClassLabel): one name per class
    code, _, err = run_cli(capsys, "run", "--no-progress", *tiny_overrides, "data.class_names=[a,b,c]")
    assert code == 2 and "data.class_names has 3 names" in err and "6 classes" in err
    assert nothing_written(tmp_path / "runs")
    with pytest.raises(ConfigError, match="data.class_names"):
        DataConfig(class_names=["cat", "cat"]).check()


def test_given_class_names_reach_the_prompts(capsys, tiny_overrides, unnamed_parquet, tmp_path):
    train, test = unnamed_parquet
    code, _, err = run_cli(capsys, "run", "--no-progress", *tiny_overrides, f"data.train={train}",
                           f"data.test={test}", f"data.class_names=[{','.join(CLASSES)}]", "algorithm=zeroshot",
                           "train.rounds=1", "name=named")
    assert code == 0, err
    summary = json.loads((tmp_path / "runs" / "named" / "data_summary.json").read_text())
    assert summary["class_names"] == CLASSES


def _png(array, mode=None):
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    buf.seek(0)
    return Image.open(buf)


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    """A real 16-bit PNG (PIL opens it as I;16): values 0..65535 become 0..255."""
    import datasets

    from fedlrm.data.sources import load_source, to_rgb

    gray16 = np.linspace(0, 65535, 24 * 24).reshape(24, 24).astype(np.uint16)
    expected = (gray16 / 65535.0 * 255.0).mean()
    image = _png(gray16)
    assert image.mode.startswith("I")
    assert np.asarray(image.convert("RGB")).mean() > expected + 50  # PIL's own convert clips to near-white
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and abs(np.asarray(rgb, dtype=np.float64).mean() - expected) < 0.6

    # the same file through a dataset source, where images are decoded for training
    buf = io.BytesIO()
    Image.fromarray(gray16).save(buf, format="PNG")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    path = str(tmp_path / "gray16.parquet")
    datasets.Dataset.from_dict({"image": [{"bytes": buf.getvalue(), "path": "g.png"}] * 2, "label": [0, 1]},
                               features=features).to_parquet(path)
    source = load_source(DataConfig(source="parquet", train=path, test=path))
    loaded = source.train.load(np.array([0]))[0]
    assert loaded.mode == "RGB" and abs(np.asarray(loaded, dtype=np.float64).mean() - expected) < 0.6


@pytest.mark.parametrize("values,mode,scale", [
    (np.linspace(0, 65535, 64).reshape(8, 8).astype(np.int32), "I", 255 / 65535),
    (np.linspace(0, 1, 64).reshape(8, 8).astype(np.float32), "F", 255.0),
    (np.linspace(0, 255, 64).reshape(8, 8).astype(np.float32), "F", 1.0),
])
def test_wide_grayscale_modes_are_scaled(values, mode, scale):
    from fedlrm.data.sources import to_rgb

    image = Image.fromarray(values, mode=mode) if mode == "F" else Image.fromarray(values)
    assert image.mode == mode
    rgb = np.asarray(to_rgb(image), dtype=np.float64)
    assert rgb.shape == (8, 8, 3)
    assert np.abs(rgb[..., 0] - values * scale).max() <= 0.5 + 1e-9
