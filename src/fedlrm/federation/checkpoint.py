"""Round checkpoints, written so that an interruption never leaves a broken one, and checked so
that a damaged, edited or foreign one is never resumed.

A checkpoint is a folder:

- `global.safetensors`: the server's weights;
- `record.json` with its tensors in `record.safetensors`: the method's typed record (`Algorithm.Record`);
- `state.json`: the round, the metrics so far, the rejected uploads and the largest upload;
- `manifest.json`: the format version, the round, the run configuration and its sha256, the
  sha256 of each of the other files, and each client's private state file with its sha256.

The clients' private states (in-process; under Flower clients keep their own) are files of the
run directory's `client_states/` (`fedlrm.federation.states`), outside the folder: a file is
written once, when its client's state changed, so a checkpoint writes only what changed since the
last one. A client the manifest does not name never changed from its initial state.

The configuration's digest is the sha256 of the canonical JSON (sorted keys, no spaces) of
`fedlrm.config.to_dict(absolute_paths(cfg))`, the very tree a run directory's config.yaml is
written from; no key is excluded, so a resume under any other setting (even train.device) is
refused: a resumed run must be the run that was started.

A checkpoint is written beside the old one and swapped in by renames. `verify_checkpoint` is
what a resume calls, before it writes anything, to get the checkpoint it continues from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedlrm.adapters import get_state
from fedlrm.algorithms import ServerState
from fedlrm.config import RunConfig, absolute_paths, to_dict
from fedlrm.errors import FedLRMError
from fedlrm.federation.rundir import config_leaves
from fedlrm.federation.states import FOLDER as STATES_FOLDER, PrivateStates, StoredStates, sha256 as _sha256
from fedlrm.federation.task import adapt, initial_private, personalize
from fedlrm.federation.validation import Rejection

log = logging.getLogger("fedlrm.checkpoint")

CHECKPOINT = "checkpoint"
MANIFEST = "manifest.json"
FORMAT = 2  # of the folder; raised when its files or their meaning change (2: client states in client_states/)
FILES = ("global.safetensors", "record.json", "record.safetensors", "state.json")
TENSOR, ITEMS = "__tensor__", "__items__"
#: files a run writes only once a round has finished: with one of them, a missing checkpoint was lost
#: (not client_states/: its files are written before the first checkpoint is in place)
FINISHED_ROUND_FILES = ("rounds.csv", "metrics.csv", "summary.json", "rejected_updates.json", "adapters")


@dataclass
class Checkpoint:
    round: int
    server: ServerState
    #: the clients' private states: a `PrivateStates` store (in-process runs), the `StoredStates` a
    #: checkpoint names, or a dict (written whole); clients absent have their initial state
    clients: Mapping[int, dict[str, torch.Tensor]]
    client_rows: list[dict]
    round_rows: list[dict]
    rejections: list[Rejection] = field(default_factory=list)
    #: the most parameters one upload carried so far (the summary's "uploaded")
    max_upload_params: int = 0
    #: the run configuration, as `canonical_config` gives it (None: written without one, e.g. by a test)
    config: dict | None = None
    #: an evaluation of this round still on its way (Flower: it travels with the next round's training
    #: messages): {"round", "clients", "trained": client -> what its row says of its training}; None: none
    pending_evaluation: dict | None = None


# ---------------------------------------------------------------------------- the run configuration
def canonical_config(cfg: RunConfig) -> dict:
    """The configuration a checkpoint is bound to: what config.yaml is written from, as plain JSON."""
    return json.loads(_canonical_json(to_dict(absolute_paths(cfg))))


def config_sha256(config: dict | None) -> str | None:
    return None if config is None else hashlib.sha256(_canonical_json(config).encode()).hexdigest()


def _canonical_json(tree: Any) -> str:
    return json.dumps(tree, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


# ---------------------------------------------------------------------------- writing
def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    final = run_dir / CHECKPOINT
    tmp, old = run_dir / f"{CHECKPOINT}.tmp", run_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_contiguous(ckpt.server.weights), tmp / "global.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    (tmp / "record.json").write_text(json.dumps(record_tree(ckpt.server.record, "record", tensors)))
    save_file(_contiguous(tensors), tmp / "record.safetensors")
    store = ckpt.clients
    if not isinstance(store, PrivateStates):  # states given whole: all of them are written
        store = PrivateStates(sorted(ckpt.clients), lambda c: {})
        store.restore(ckpt.clients)
    if store.folder is None:
        store.bind(run_dir / STATES_FOLDER)
    elif store.folder != run_dir / STATES_FOLDER:
        raise FedLRMError(f"the client states of this run are kept in {store.folder}, not in {run_dir}")
    files = store.flush(ckpt.round)  # only the states that changed since the last checkpoint
    meta = {"round": ckpt.round, "clients": sorted(files), "client_rows": ckpt.client_rows,
            "round_rows": ckpt.round_rows, "rejections": [dataclasses.asdict(x) for x in ckpt.rejections],
            "max_upload_params": ckpt.max_upload_params, "pending_evaluation": ckpt.pending_evaluation}
    (tmp / "state.json").write_text(json.dumps(meta))
    # Last, over the finished files: a checkpoint without its manifest is never resumed.
    manifest = {"format": FORMAT, "round": ckpt.round, "config_sha256": config_sha256(ckpt.config),
                "config": ckpt.config, "files": {name: _sha256(tmp / name) for name in FILES},
                "client_states": {str(c): {"file": name, "sha256": digest} for c, (name, digest) in files.items()}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    store.prune()  # state files only older checkpoints named (or a crash left) go once this one is in place
    return final


# ---------------------------------------------------------------------------- reading
def find_checkpoint(run_dir: Path) -> Path | None:
    """The folder of the run's last complete checkpoint, or None if it has none."""
    for path in (run_dir / CHECKPOINT, run_dir / f"{CHECKPOINT}.old"):  # .old: a crash between the two renames
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                raise FedLRMError(f"{path} is not a folder, so it is not the run's checkpoint (one is a folder of "
                                  f"safetensors and JSON files); {_advice(run_dir)}")
            if path.name != CHECKPOINT:
                log.info("resuming from %s: the run stopped while its last checkpoint was being replaced", path)
            return path
    return None


def load_checkpoint(run_dir: Path, record_type: type | None) -> Checkpoint | None:
    """The last complete checkpoint of a run, its files checked against its manifest, or None if it
    has none; `record_type` is the running algorithm's `Record`. Whether it belongs to a run is
    `verify_checkpoint`'s question."""
    path = find_checkpoint(run_dir)
    return None if path is None else read_checkpoint(path, record_type)


def read_checkpoint(path: Path, record_type: type | None) -> Checkpoint:
    """The checkpoint in the folder `path`; a FedLRMError if a file is missing, changed since it was
    written, added, or not what it should hold."""
    manifest = _read_manifest(path)
    for name in FILES:
        expected = manifest["files"].get(name)
        if expected is None:
            raise _damaged(path, f"its {MANIFEST} does not list {name}")
        if not (path / name).is_file():
            raise _damaged(path, f"{name} is missing")
        if _sha256(path / name) != expected:
            raise _damaged(path, f"{name} has changed since the checkpoint was written (its sha256 is not the "
                                 f"one in {MANIFEST}): the file is damaged or was edited")
    extra = sorted(p.name for p in path.iterdir() if p.name not in FILES and p.name != MANIFEST)
    if extra:
        raise _damaged(path, f"it holds {', '.join(extra)}, which its {MANIFEST} does not list (added since "
                             f"the checkpoint was written)")
    meta = _read_state(path)
    if meta["round"] != manifest["round"]:
        raise _damaged(path, f"state.json is of round {meta['round']} but {MANIFEST} of round {manifest['round']}")
    try:
        weights = load_file(path / "global.safetensors")
        tensors = load_file(path / "record.safetensors")
        tree = json.loads((path / "record.json").read_text())
    except Exception as err:  # safetensors and json raise several types
        raise _damaged(path, f"a file cannot be read ({err})") from None
    try:
        record = restore_record(tree, record_type, tensors)
    except Exception as err:
        what = record_type.__name__ if record_type else "no record"
        raise _damaged(path, f"record.json does not hold this method's record, {what} ({type(err).__name__}: "
                             f"{err})") from None
    unused = sorted(set(tensors) - set(_tensor_refs(tree)))
    if unused:
        raise _damaged(path, f"record.safetensors holds {unused[0]!r}, which record.json does not refer to")
    clients = _client_states(path, manifest, meta)
    rejections = [Rejection(x["round"], x["client"], x["reason"]) for x in meta["rejections"]]
    return Checkpoint(meta["round"], ServerState(weights, record), clients, meta["client_rows"], meta["round_rows"],
                      rejections, meta["max_upload_params"], manifest["config"], meta.get("pending_evaluation"))


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise _damaged(path, f"it has no {MANIFEST} (it was written by an older fedlrm, or damaged), so its "
                             f"files cannot be checked")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _damaged(path, f"{MANIFEST} cannot be read ({err})") from None
    if not isinstance(manifest, dict):
        raise _damaged(path, f"{MANIFEST} is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise FedLRMError(f"the checkpoint {path} is of format {manifest.get('format')!r}; this fedlrm reads format "
                          f"{FORMAT}: resume it with the fedlrm that wrote it, or {_new_run(path.parent)}")
    problems = [key for key, kind in (("round", int), ("files", dict), ("config_sha256", (str, type(None))),
                                      ("config", (dict, type(None))))
                if key not in manifest or not _is(manifest[key], kind)]
    if problems or not all(isinstance(v, str) for v in manifest["files"].values()):
        raise _damaged(path, f"{MANIFEST} is malformed (bad or missing: {', '.join(problems) or 'files'})")
    if config_sha256(manifest["config"]) != manifest["config_sha256"]:
        raise _damaged(path, f"the configuration in {MANIFEST} does not match its config_sha256")
    return manifest


def _client_states(path: Path, manifest: dict, meta: dict) -> StoredStates:
    """The private state files the manifest names, each there with its sha256 and readable."""
    entries = manifest.get("client_states")
    if not isinstance(entries, dict) or not all(
            isinstance(k, str) and k.isdigit() and isinstance(v, dict) and isinstance(v.get("file"), str)
            and isinstance(v.get("sha256"), str) for k, v in entries.items()):
        raise _damaged(path, f"{MANIFEST} does not list the client state files as client -> {{file, sha256}}")
    files = {int(k): (v["file"], v["sha256"]) for k, v in entries.items()}
    if sorted(files) != sorted(meta["clients"]):
        raise _damaged(path, f"{MANIFEST} names the state files of clients {sorted(files)}, but state.json lists "
                             f"clients {meta['clients']}")
    folder = path.parent / STATES_FOLDER
    for client, (name, digest) in sorted(files.items()):
        file = folder / name
        if Path(name).name != name or not file.is_file():
            raise _damaged(path, f"client {client}'s private state {file} is missing")
        if _sha256(file) != digest:
            raise _damaged(path, f"client {client}'s private state {file} has changed since the checkpoint was "
                                 f"written (its sha256 is not the one in {MANIFEST}): the file is damaged or was edited")
        try:
            load_file(file)
        except Exception as err:  # safetensors raises several types
            raise _damaged(path, f"client {client}'s private state {file} cannot be read ({err})") from None
    return StoredStates(folder, files)


def _read_state(path: Path) -> dict:
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _damaged(path, f"state.json cannot be read ({err})") from None
    if not isinstance(meta, dict):
        raise _damaged(path, "state.json is not a JSON object")
    fields = {"round": int, "clients": list, "client_rows": list, "round_rows": list, "rejections": list,
              "max_upload_params": int}
    missing = [k for k in fields if k not in meta]
    if missing:
        raise _damaged(path, f"state.json lacks {', '.join(missing)}")
    wrong = [k for k, kind in fields.items() if not _is(meta[k], kind)]
    if wrong:
        raise _damaged(path, f"state.json has a value of the wrong type for {', '.join(wrong)}")
    if not all(_is(c, int) for c in meta["clients"]):
        raise _damaged(path, "state.json's clients are not all client numbers")
    for rows in ("client_rows", "round_rows"):
        if not all(isinstance(row, dict) and _is(row.get("round"), int) for row in meta[rows]):
            raise _damaged(path, f"state.json's {rows} are not all rows with a round")
    if not all(isinstance(x, dict) and _is(x.get("round"), int) and _is(x.get("client"), int)
               and isinstance(x.get("reason"), str) for x in meta["rejections"]):
        raise _damaged(path, "state.json's rejections are not all (round, client, reason)")
    pending = meta.get("pending_evaluation")
    if pending is not None and not (
            isinstance(pending, dict) and pending.get("round") == meta["round"]
            and isinstance(pending.get("clients"), list) and all(_is(c, int) for c in pending["clients"])
            and isinstance(pending.get("trained"), dict)
            and all(isinstance(v, dict) for v in pending["trained"].values())):
        raise _damaged(path, "state.json's pending_evaluation is not an evaluation of its round (round, clients, "
                             "trained)")
    return meta


# ---------------------------------------------------------------------------- verifying for a resume
def verify_checkpoint(run_dir: Path, cfg: RunConfig, server, clients: Iterable[int]) -> Checkpoint | None:
    """The checkpoint a resume of `run_dir` under `cfg` continues from, checked in full before the
    resume writes anything: None when the run directory shows no finished round (the run starts at
    round 1, which is logged), else a FedLRMError for whatever does not belong to this run.

    `server` is the run's `Server` (its algorithm and model say what the checkpoint must hold);
    `clients` are the clients whose private states it may carry: every one in-process, none where
    clients keep their own (Flower). Checked, in this order:

    1. the folder: a folder; if there is none, no file of a finished round (rounds.csv, metrics.csv,
       summary.json, rejected_updates.json, adapters/) may be there, or the checkpoint was lost;
    2. its files (`read_checkpoint`): the manifest of this format, every file it lists there with
       its sha256, no other; state.json's fields and types; the record restored as the method's;
    3. the configuration: `cfg`'s digest is the one in the manifest;
    4. the round: within the run's rounds (1..train.rounds; 0 for a method that does not train),
       one row of metrics per round done, the rejections as many as the rounds counted;
    5. the clients: private states of `clients` only (those it does not name start from their initial one);
    6. the tensors, against a fresh run of `cfg`: the server's weights hold every weight of
       `Server.initial_state()` with its shape and dtype; each client's private state has exactly
       the names, shapes and dtypes of `initial_private(...)` or, for a method whose adapters change
       during a run (FedLEASE after clustering), of the layout the server's message gives it. Server
       weights a run adds (FedPIA's barycenter, FedLEASE's cluster experts) cannot be foreseen so:
    7. restoring: each client's model is put together from the checkpoint as its evaluation after
       that round does (`personalize`), which fails on weights whose names or shapes do not fit.
    """
    run_dir = Path(run_dir)
    path = find_checkpoint(run_dir)
    if path is None:
        finished = [name for name in FINISHED_ROUND_FILES if (run_dir / name).exists()]
        if finished:
            raise FedLRMError(f"{run_dir} has no {CHECKPOINT}/ folder, but its {', '.join(finished)} "
                              f"show(s) that rounds were done: the checkpoint was deleted or moved, and starting "
                              f"over at round 1 would overwrite the run's results; put the checkpoint back, or "
                              f"{_new_run(run_dir)}")
        log.warning("%s has no checkpoint: the run stopped before its first round finished, so it starts at "
                    "round 1", run_dir)
        return None
    algo = server.algorithm
    ckpt = read_checkpoint(path, algo.Record)
    _check_config(path, ckpt.config, cfg)
    _check_rounds(path, ckpt, cfg, algo, server.num_clients)
    expected = sorted(set(clients))
    foreign = sorted(set(ckpt.clients) - set(expected))
    if foreign:
        raise _damaged(path, f"it holds the private states of clients {foreign}, but this run's clients are "
                             f"{_span(expected) if expected else 'keeping their own (none here)'}")
    if algo.Record is None and ckpt.server.record is not None:
        raise _damaged(path, f"record.json holds a record, but {algo.name} keeps none")
    with torch.random.fork_rng(devices=[]):  # the checks build adapters; the run's random numbers stay its own
        try:
            _check_tensors(path, ckpt, cfg, server)
        finally:
            initial = algo.layout_of({})
            if server.bundle.layout != initial:
                adapt(server.bundle, algo, cfg, initial)
    return ckpt


def check_config(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse `cfg` for resuming `run_dir` unless its checkpoint was made with it (nothing to check
    without a checkpoint). Reads the manifest only: a resume calls it before loading the model,
    which takes long, and `verify_checkpoint` checks it again with everything else."""
    path = find_checkpoint(Path(run_dir))
    if path is not None:
        _check_config(path, _read_manifest(path)["config"], cfg)


def _check_config(path: Path, config: dict | None, cfg: RunConfig) -> None:
    now = canonical_config(cfg)
    if config_sha256(now) == config_sha256(config):
        return
    differences = ""
    if config is not None:
        then, here = config_leaves(config), config_leaves(now)
        changed = [k for k in sorted(then.keys() | here.keys()) if then.get(k, "(absent)") != here.get(k, "(absent)")]
        shown = [f"{k} is {here.get(k, '(absent)')!r} here, was {then.get(k, '(absent)')!r}" for k in changed[:4]]
        differences = f" ({'; '.join(shown)}{f'; and {len(changed) - 4} more' if len(changed) > 4 else ''})"
    raise FedLRMError(f"the configuration (from {path.parent / 'config.yaml'}) is not the one the checkpoint "
                      f"{path} was made with{differences}; a resumed run must be the run that was started: put "
                      f"back the config.yaml it was started with ({path / MANIFEST} keeps that configuration "
                      f"under \"config\"), or run the new configuration as a new run under another name=")


def _check_rounds(path: Path, ckpt: Checkpoint, cfg: RunConfig, algo, num_clients: int) -> None:
    first, last = (1, cfg.train.rounds) if algo.trains else (0, 0)
    if not first <= ckpt.round <= last:
        raise _damaged(path, f"state.json says round {ckpt.round} was done, but this run's rounds are {first}.."
                             f"{last} (train.rounds={cfg.train.rounds})")
    rounds = [row["round"] for row in ckpt.round_rows]
    if rounds != list(range(first, ckpt.round + 1)):
        raise _damaged(path, f"state.json has metrics of rounds {rounds}, not one row for each of rounds "
                             f"{first}..{ckpt.round}")
    if any(not first <= row["round"] <= ckpt.round or row.get("client") not in range(num_clients)
           for row in ckpt.client_rows):
        raise _damaged(path, "state.json has client metrics of rounds or clients this run does not have")
    pending = ckpt.pending_evaluation
    if pending is not None and any(c not in range(num_clients) for c in pending["clients"]):
        raise _damaged(path, "state.json's pending_evaluation names clients this run does not have")
    counted = sum(row.get("clients_rejected", 0) for row in ckpt.round_rows)
    if counted != len(ckpt.rejections) or any(not first <= x.round <= ckpt.round for x in ckpt.rejections):
        raise _damaged(path, f"state.json lists {len(ckpt.rejections)} rejected upload(s), but its rounds count "
                             f"{counted}")


def _check_tensors(path: Path, ckpt: Checkpoint, cfg: RunConfig, server) -> None:
    algo, bundle = server.algorithm, server.bundle
    initial = algo.layout_of({})
    if bundle.layout != initial:
        adapt(bundle, algo, cfg, initial)
    problem = _difference(_schema(ckpt.server.weights), _schema(server.initial_state().weights), superset=True)
    if problem:
        raise _damaged(path, f"global.safetensors does not hold this run's server weights: {problem}")
    for c in sorted(ckpt.clients):
        got = _schema(ckpt.clients[c])
        allowed = [_schema(initial_private(bundle, algo, cfg, c))]
        if got == allowed[0]:
            continue
        try:
            layout = algo.layout_of(algo.message_for(ckpt.server, c, ckpt.round))
        except Exception as err:  # a record that does not fit: a message cannot be drawn from it
            raise _damaged(path, f"no message for client {c} can be drawn from its server state ({err})") from None
        if layout != initial:  # a client that trained since the layout changed holds that layout's weights
            adapt(bundle, algo, cfg, layout)
            allowed.append(_schema(get_state(bundle.model, bundle.private_keys)))
            if got == allowed[1]:
                continue
        closest = max(allowed, key=lambda schema: len(schema.keys() & got.keys()))
        raise _damaged(path, f"{STATES_FOLDER}/{ckpt.clients.files[c][0]} does not hold client {c}'s private state "
                             f"as this run's model has it: {_difference(got, closest)}")
    for c in range(server.num_clients):
        try:
            personalize(bundle, algo, cfg, c, ckpt.clients.get(c, {}), ckpt.server, ckpt.round)
        except Exception as err:
            raise _damaged(path, f"client {c}'s model cannot be restored from it after round {ckpt.round} "
                                 f"({type(err).__name__}: {err}): its weights do not fit this run's model") from None


# ---------------------------------------------------------------------------- records
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


def _tensor_refs(tree: Any) -> Iterable[str]:
    if isinstance(tree, dict):
        if TENSOR in tree:
            yield tree[TENSOR]
            return
        for value in tree.values():
            yield from _tensor_refs(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _tensor_refs(value)


# ---------------------------------------------------------------------------- helpers
def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _is(value: Any, kind) -> bool:
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is int)


def _schema(state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def _difference(got: dict, expected: dict, superset: bool = False) -> str | None:
    """How tensors (name -> (shape, dtype)) differ from those expected; with `superset`, more are fine."""
    missing = sorted(expected.keys() - got.keys())
    extra = [] if superset else sorted(got.keys() - expected.keys())
    if missing:
        return f"{len(missing)} weight(s) missing, e.g. {missing[0]!r}"
    if extra:
        return f"{len(extra)} weight(s) this model does not have, e.g. {extra[0]!r}"
    for key, (shape, dtype) in expected.items():
        if got[key] != (shape, dtype):
            return f"{key!r} is {_form(*got[key])}, this model's is {_form(shape, dtype)}"
    return None


def _form(shape: tuple[int, ...], dtype: torch.dtype) -> str:
    return f"{list(shape)} {str(dtype).removeprefix('torch.')}"


def _span(clients: list[int]) -> str:
    return f"{clients[0]}..{clients[-1]}" if clients == list(range(clients[0], clients[-1] + 1)) else str(clients)


def _new_run(run_dir: Path) -> str:
    return f"start it anew: `fedlrm run --config {run_dir / 'config.yaml'} name=NEW_NAME`"


def _advice(run_dir: Path) -> str:
    return f"it cannot be resumed: put back an intact copy of {run_dir}, or {_new_run(run_dir)}"


def _damaged(path: Path, what: str) -> FedLRMError:
    return FedLRMError(f"the checkpoint {path}: {what}; {_advice(path.parent)}")
