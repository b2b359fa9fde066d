"""Clients that join once a run is over: the held-out ones (`data.new_clients`) and a user's own
(`fedlrm personalize`).

A newcomer never took part in a round: the server neither sampled nor messaged it. After the
last round it receives what its algorithm gives a newcomer from the final server state
(`Algorithm.newcomer_message`), trains the adapter weights its algorithm names
(`Algorithm.newcomer_trains`; the rest stay as received) for a set number of local epochs on
its own training data, and is evaluated on its own test set. It sends nothing back.

Nothing here knows which algorithm runs; the training and evaluation are those of every client
(`fedlrm.federation.task`).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from fedlrm.adapters import adapter_parameters, get_state
from fedlrm.algorithms import Algorithm, ServerState, State, get_algorithm
from fedlrm.config import DataConfig, RunConfig, at_least_one
from fedlrm.data import ClientSplit, load_federated_data, one_client_folder
from fedlrm.errors import DataError, FedLRMError
from fedlrm.federation.checkpoint import check_config, verify_checkpoint
from fedlrm.federation.export import save_personalized
from fedlrm.federation.rundir import read_run_config
from fedlrm.federation.server import Server, client_accuracy_stats
from fedlrm.federation.task import (ModelBundle, build_model, evaluate, initial_private, load_client, resolve_device,
                                    train_locally, training_only)
from fedlrm.federation.wire import decode, encode
from fedlrm.models import load_backbone

RESULT_FILE = "result.json"


def newcomer_epochs(cfg: RunConfig) -> int:
    """The local epochs a newcomer adapts for: data.new_client_epochs, else train.local_epochs."""
    return cfg.train.local_epochs if cfg.data.new_client_epochs is None else cfg.data.new_client_epochs


def adapt_newcomer(bundle: ModelBundle, algorithm: Algorithm, cfg: RunConfig, client_id: int, split: ClientSplit,
                   server_state: ServerState, server_round: int, epochs: int) -> tuple[State, dict]:
    """Bring client `client_id` in after `server_round` (the run's last): from its initial private
    weights and the algorithm's newcomer message, train what `newcomer_trains` names for `epochs`
    local epochs on `split.train`, then evaluate on `split.test`, over the split's classes.

    Returns every adapter weight of its model and its row (accuracy, loss, n_test, n_train,
    train_loss, train_seconds, eval_seconds, epochs, the weights trained, bytes_down). On return
    `bundle.model` is the newcomer's model, so a caller can save it."""
    sent = encode(algorithm.newcomer_message(server_state, server_round))
    message = decode(sent)  # what would reach the client: copies, never the server's own tensors
    model = bundle.model
    private = initial_private(bundle, algorithm, cfg, client_id)
    stats, trained = None, 0
    with model.classifying_over(split.classes):
        ctx = load_client(bundle, algorithm, cfg, client_id, private, message, server_round)
        with training_only(model, algorithm.newcomer_trains(list(adapter_parameters(model)))):
            trainable = [p for p in adapter_parameters(model).values() if p.requires_grad]
            trained = sum(p.numel() for p in trainable)
            if algorithm.trains and trainable and epochs > 0:
                stats = train_locally(model, algorithm, split.train, ctx, cfg, epochs=epochs)
        t0 = time.perf_counter()
        result = evaluate(model, split.test, cfg.train.eval_batch_size, cfg.train)
    row = {"client": client_id, "accuracy": result["accuracy"], "loss": result["loss"],
           "n_test": result["examples"], "n_train": len(split.train),
           "epochs": epochs if stats is not None else 0, "trained_weights": trained if stats is not None else 0,
           "train_loss": stats.loss if stats is not None else None,
           "train_seconds": stats.seconds if stats is not None else 0.0,
           "eval_seconds": time.perf_counter() - t0, "bytes_down": len(sent)}
    return get_state(model), row


def newcomer_summary(rows: list[dict]) -> dict:
    """The run summary's figures of the new clients, beside those of the participating ones."""
    if not rows:
        return {}
    stats = client_accuracy_stats(rows)
    return {"new_clients": len(rows), "new_acc_weighted": stats["acc_weighted"], "new_acc_mean": stats["acc_mean"]}


# ---------------------------------------------------------------------------- a user's own new client
def own_data_config(data: DataConfig, folder: Path, class_names: list[str] | None = None) -> DataConfig:
    """The data settings of a user's new client whose data is all of `folder` (the layout of a
    SuperNode's `data-dir`, `one_client_folder`). Every image is used (no few-shot draw); the classes
    are the data's own (or `class_names`), not the run's."""
    return replace(one_client_folder(data, folder), name=None, shots=0, test_per_client=None,
                   global_test_size=None, exclude_classes=[], class_names=list(class_names or []),
                   client_classes="all")


def personalize_run(run_dir: str | Path, data_dir: str | Path, *, epochs: int | None = None,
                    out: str | Path | None = None, device: str | None = None,
                    class_names: list[str] | None = None) -> tuple[Path, dict]:
    """Bring a user's own client into the finished run in `run_dir`, as the run's held-out clients
    are brought in (`adapt_newcomer`), on the data in `data_dir`, classifying over that data's
    classes. Writes its adapters (`save_personalized`) and `result.json` to `out` (default
    RUN_DIR/personalized/<data folder's name>) and returns that folder and the result.

    Everything is checked before anything is written: the run directory (config.yaml and a
    checkpoint of its last round, verified as a resume verifies it), `out` (new or empty) and
    the data. The run directory is only read, but for the new folder."""
    run_dir, data_dir = Path(run_dir).expanduser(), Path(data_dir).expanduser()
    if not run_dir.is_dir():
        raise FedLRMError(f"{run_dir} is not a run directory (no such folder); give the folder a finished "
                          f"`fedlrm run` wrote (it holds config.yaml and checkpoint/)")
    if epochs is not None:
        at_least_one("--epochs", epochs)
    cfg = read_run_config(run_dir)
    check_config(run_dir, cfg)  # a config.yaml edited since the run: before the model loads
    out = Path(out).expanduser() if out is not None else run_dir / "personalized" / data_dir.resolve().name
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedLRMError(f"{out} exists and is not an empty folder; give a new one with --out")
    data_cfg = own_data_config(cfg.data, data_dir, class_names)
    torch_device = resolve_device(device or cfg.train.device, "--device" if device else "train.device")
    algorithm = get_algorithm(cfg)
    backbone = load_backbone(cfg.model)
    try:
        data = load_federated_data(data_cfg, backbone.preprocess, cfg.seed, pretrained_on=backbone.pretrained_on)
    except DataError as err:
        raise DataError(f"the new client's data in {data_dir}: {err}") from None
    split = data.clients[0]
    bundle = build_model(backbone, data.class_names, cfg, algorithm)
    bundle.model.to(torch_device)
    training = cfg.data.training_clients
    server = Server(cfg, algorithm, bundle, training, progress=False, example_bounds={})
    ckpt = verify_checkpoint(run_dir, cfg, server, range(training))
    last = cfg.train.rounds if algorithm.trains else 0
    if ckpt is None or ckpt.round < last:
        done = 0 if ckpt is None else ckpt.round
        raise FedLRMError(f"the run in {run_dir} has not finished: {done} of its {last} rounds are done, and a "
                          f"new client joins from the final server state; finish it first with "
                          f"`fedlrm run --resume {run_dir}`")
    client_id = cfg.data.total_clients  # an id none of the run's clients has
    epochs = newcomer_epochs(cfg) if epochs is None else epochs
    _, row = adapt_newcomer(bundle, algorithm, cfg, client_id, split, ckpt.server, last, epochs)
    out.mkdir(parents=True, exist_ok=True)
    kind = save_personalized(out, bundle.model, cfg, data.class_names, client_id, bundle.layout,
                             algorithm.newcomer_message(ckpt.server, last), last)
    result = {"algorithm": cfg.algorithm, "run_dir": str(run_dir.resolve()), "data": str(data_dir.resolve()),
              "round": last, "class_names": data.class_names, "format": kind, **row}
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return out, result
