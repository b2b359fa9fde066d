"""Round checkpoints, written so that an interruption never leaves a broken one.

A checkpoint is a folder: the server state and every client's private state as
safetensors, and `state.json` with the round and the metrics so far. It is written
beside the old one and swapped in by renames.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedlrm.errors import FedLRMError

CHECKPOINT = "checkpoint"


@dataclass
class Checkpoint:
    round: int
    global_state: dict[str, torch.Tensor]
    clients: dict[int, dict[str, torch.Tensor]]
    client_rows: list[dict]
    round_rows: list[dict]


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    final = run_dir / CHECKPOINT
    tmp, old = run_dir / f"{CHECKPOINT}.tmp", run_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_contiguous(ckpt.global_state), tmp / "global.safetensors")
    flat = {f"client{c}/{k}": v for c, state in ckpt.clients.items() for k, v in state.items()}
    save_file(_contiguous(flat), tmp / "clients.safetensors")
    meta = {"round": ckpt.round, "clients": sorted(ckpt.clients), "client_rows": ckpt.client_rows,
            "round_rows": ckpt.round_rows}
    (tmp / "state.json").write_text(json.dumps(meta))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last complete checkpoint of a run, or None if it has none yet."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):  # .old survives a crash between the two renames
        path = run_dir / name
        if (path / "state.json").is_file():
            break
    else:
        return None
    try:
        meta = json.loads((path / "state.json").read_text())
        flat = load_file(path / "clients.safetensors")
        global_state = load_file(path / "global.safetensors")
    except Exception as err:
        raise FedLRMError(f"the checkpoint in {path} cannot be read ({err}); start a new run") from err
    clients: dict[int, dict[str, torch.Tensor]] = {c: {} for c in meta["clients"]}
    for key, value in flat.items():
        client, _, name = key.partition("/")
        clients[int(client.removeprefix("client"))][name] = value
    return Checkpoint(meta["round"], global_state, clients, meta["client_rows"], meta["round_rows"])


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}
