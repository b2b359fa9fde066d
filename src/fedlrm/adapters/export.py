"""Each client's personalized adapters on disk, loadable without the run that made them.

A folder holds `adapter_model.safetensors` (every adapter weight the client evaluates
with: its private weights and the server state it last received) and
`adapter_config.json` (the algorithm, backbone, adapter settings and class names
needed to rebuild the model). `load_personalized(folder)` rebuilds it.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedlrm.adapters.inject import get_state, set_state
from fedlrm.config import from_dict, to_dict

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def save_personalized(folder: Path, model, cfg, class_names: list[str], client_id: int | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in get_state(model).items()}, folder / WEIGHTS_FILE)
    run = to_dict(cfg)
    meta = {
        "format": "fedlrm-adapter/1",
        "how_to_load": "from fedlrm.adapters.export import load_personalized; model = load_personalized(this_folder)",
        "algorithm": cfg.algorithm, "client": client_id, "class_names": list(class_names),
        "model": run["model"], "adapter": run["adapter"],
    }
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def load_personalized(folder: str | Path):
    """The classifier with the saved adapters, ready for inference (eval mode)."""
    from fedlrm.algorithms import get_algorithm
    from fedlrm.federation.task import build_model
    from fedlrm.models import load_backbone

    folder = Path(folder)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    cfg = from_dict({"algorithm": meta["algorithm"], "model": meta["model"], "adapter": meta["adapter"]})
    bundle = build_model(load_backbone(cfg.model), meta["class_names"], cfg, get_algorithm(cfg))
    set_state(bundle.model, load_file(folder / WEIGHTS_FILE))
    return bundle.model.eval()
