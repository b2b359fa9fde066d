"""Round checkpoints, written so that an interruption never leaves a broken one.

A checkpoint is a folder: the server's weights and every client's private state as
safetensors, the method's typed record (`Algorithm.Record`) as `record.json` with its
tensors in `record.safetensors`, and `state.json` with the round and the metrics so far.
It is written beside the old one and swapped in by renames.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedlrm.algorithms import ServerState
from fedlrm.errors import FedLRMError

CHECKPOINT = "checkpoint"
TENSOR, ITEMS = "__tensor__", "__items__"


@dataclass
class Checkpoint:
    round: int
    server: ServerState
    clients: dict[int, dict[str, torch.Tensor]]
    client_rows: list[dict]
    round_rows: list[dict]


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    final = run_dir / CHECKPOINT
    tmp, old = run_dir / f"{CHECKPOINT}.tmp", run_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_contiguous(ckpt.server.weights), tmp / "global.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    (tmp / "record.json").write_text(json.dumps(record_tree(ckpt.server.record, "record", tensors)))
    save_file(_contiguous(tensors), tmp / "record.safetensors")
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


def load_checkpoint(run_dir: Path, record_type: type | None) -> Checkpoint | None:
    """The last complete checkpoint of a run, or None if it has none yet; `record_type` is the
    running algorithm's `Record`."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):  # .old survives a crash between the two renames
        path = run_dir / name
        if (path / "state.json").is_file():
            break
    else:
        return None
    try:
        meta = json.loads((path / "state.json").read_text())
        flat = load_file(path / "clients.safetensors")
        weights = load_file(path / "global.safetensors")
        record = restore_record(json.loads((path / "record.json").read_text()), record_type,
                                load_file(path / "record.safetensors"))
    except Exception as err:
        raise FedLRMError(f"the checkpoint in {path} cannot be read ({err}); start a new run") from err
    clients: dict[int, dict[str, torch.Tensor]] = {c: {} for c in meta["clients"]}
    for key, value in flat.items():
        client, _, name = key.partition("/")
        clients[int(client.removeprefix("client"))][name] = value
    return Checkpoint(meta["round"], ServerState(weights, record), clients, meta["client_rows"], meta["round_rows"])


def record_tree(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON tree of a record: dataclasses become objects, dicts lists of [key, value] (keys
    keep their type), tensors a reference to `tensors[path]`."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value
        return {TENSOR: path}
    if dataclasses.is_dataclass(value):
        return {f.name: record_tree(getattr(value, f.name), f"{path}.{f.name}", tensors)
                for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {ITEMS: [[k, record_tree(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [record_tree(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a method record holds {type(value).__name__} at {path}; use numbers, strings, lists, dicts, "
                    f"tensors or dataclasses of them")


def restore_record(tree: Any, hint: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The record `record_tree` wrote, rebuilt as the types `hint` names."""
    if isinstance(tree, dict) and TENSOR in tree:
        return tensors[tree[TENSOR]]
    if tree is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return restore_record(tree, next(a for a in args if a is not type(None)), tensors)
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return hint(**{k: restore_record(v, hints[k], tensors) for k, v in tree.items()})
    if isinstance(tree, dict) and ITEMS in tree:
        item = args[1] if origin is dict and len(args) == 2 else Any
        return {k: restore_record(v, item, tensors) for k, v in tree[ITEMS]}
    if isinstance(tree, list):
        if origin is tuple:
            return tuple(restore_record(v, a, tensors) for v, a in zip(tree, args))
        item = args[0] if origin is list and args else Any
        return [restore_record(v, item, tensors) for v in tree]
    return tree


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}
