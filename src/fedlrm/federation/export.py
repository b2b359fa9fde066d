"""Each client's personalized adapters on disk, loadable without the run that made them.

A folder holds `adapter_model.safetensors` (every adapter weight the client evaluates
with: its private weights and the server state it receives), `adapter_config.json` (the
algorithm, backbone, adapter settings, layout and class names needed to rebuild the
model) and, where the server's message carries more than weights (FedLEASE's cluster
index), `received.safetensors`. `load_personalized(folder)` rebuilds the model.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedlrm.adapters import adapter_parameters, get_state, set_state
from fedlrm.algorithms import ClientRound, config_from_dict, get_algorithm
from fedlrm.config import to_dict
from fedlrm.federation.task import adapt, build_model
from fedlrm.models import load_backbone

CONFIG_FILE, WEIGHTS_FILE, RECEIVED_FILE = "adapter_config.json", "adapter_model.safetensors", "received.safetensors"


def save_personalized(folder: Path, model, cfg, class_names: list[str], client_id: int, layout, received,
                      server_round: int) -> None:
    """Save `model` as client `client_id` evaluates it after `server_round` (`received`: the
    server's message to it)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in get_state(model).items()}, folder / WEIGHTS_FILE)
    params = adapter_parameters(model)
    extra = {k: v.contiguous().cpu() for k, v in received.items() if k not in params}
    if extra:
        save_file(extra, folder / RECEIVED_FILE)
    # Everything that shapes the model; data and training settings do not.
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("data", "train", "output_dir", "name")}
    meta = {
        "format": "fedlrm-adapter/1",
        "how_to_load": "from fedlrm.federation.export import load_personalized; model = load_personalized(this_folder)",
        "client": client_id, "round": server_round, "layout": layout, "class_names": list(class_names), "config": settings,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def load_personalized(folder: str | Path):
    """The classifier with the saved adapters, ready for inference (eval mode)."""
    folder = Path(folder)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    cfg = config_from_dict(meta["config"])
    algorithm = get_algorithm(cfg)
    bundle = build_model(load_backbone(cfg.model), meta["class_names"], cfg, algorithm)
    layout = meta["layout"]
    if layout != bundle.layout:
        adapt(bundle, algorithm, cfg, layout)
    set_state(bundle.model, load_file(folder / WEIGHTS_FILE))
    if (folder / RECEIVED_FILE).is_file():
        received = load_file(folder / RECEIVED_FILE)
        algorithm.receive(bundle.model, ClientRound(meta["client"], meta["round"], received))
    return bundle.model.eval()
