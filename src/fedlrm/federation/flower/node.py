"""The work of a fedlrm client on Flower: its model, data and private state, for one message.

`client_app` (the ClientApp Flower loads) imports this module only where the client's work is
done, so a query answers without importing torch. On the deployment runtime Flower starts a
ClientApp process per message, and that process hands training and evaluation to its
SuperNode's long-lived worker (`worker`), which runs these functions. On the Simulation
Runtime a Ray actor runs them for message after message of many clients. Either way the
process builds the model once per run and keeps clients' images (up to DATA_CACHE_BYTES), so
later messages of the same run reuse them; private state is read from and written to the
state dir for every message.

Torch runs one thread per ClientApp unless told otherwise (SuperNodes sharing a host would
otherwise each start one thread per core): the node config's `threads`, else train.threads,
else OMP_NUM_THREADS (which Ray sets to an actor's num-cpus), else 1.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from flwr.app import Context, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from safetensors.torch import load_file, save_file

from fedlrm.algorithms import get_algorithm
from fedlrm.config import RunConfig, to_dict
from fedlrm.data import ClientSplit, ImageSet, load_federated_data, one_client_folder
from fedlrm.errors import DataError, FedLRMError
from fedlrm.federation.client import Client
from fedlrm.federation.export import save_personalized
from fedlrm.federation.flower.protocol import (EVALUATION_PREFIX, client_id_of, digest, read_evaluation, read_fields,
                                              read_request, reply_content, state_dir_of)
from fedlrm.federation.flower.secagg import to_arrays
from fedlrm.federation.task import build_model, resolve_device
from fedlrm.federation.wire import decode
from fedlrm.models import load_backbone

KEEP_ROUNDS = 3  # private-state files kept per client; a resumed server goes back at most one round
DATA_CACHE_BYTES = 1 << 30  # clients' preprocessed images a long-lived ClientApp process keeps in memory

# What a long-lived process (a SuperNode's worker, a Simulation Runtime actor) keeps between
# messages: the model built for the run it serves, and clients' images. A ClientApp process that
# does its own work (node config worker=false) serves one message, and so finds both empty.
_models: dict[str, tuple] = {}
_data: OrderedDict[str, tuple[list[str], ClientSplit, int]] = OrderedDict()  # names, split, bytes


# The work of a message, from its content to the reply's content: the ClientApp (or its worker,
# `worker`, in a process of its own) wraps these in Flower's messages.
def train(content: RecordDict, context: Context) -> RecordDict:
    node = NodeClient(context, *read_request(content), training=True)
    figures = {}
    evaluation = read_evaluation(content, node.meta, node.payload)
    if evaluation is not None:  # the round before, with the private state it ended with: first
        eval_round, eval_payload = evaluation
        if eval_round != node.round - 1:
            raise FedLRMError(f"a training message of round {node.round} asks to evaluate round {eval_round}; "
                              f"only the round before travels with it")
        figures = {EVALUATION_PREFIX + k: v for k, v in evaluation_figures(node.client.evaluate(eval_round,
                                                                                                eval_payload)).items()}
    result = node.client.train(node.round, node.payload)
    node.save_private(node.round)
    return reply_content(decode(result.upload), client=node.client_id, num_examples=result.num_examples,
                         train_loss=result.train_loss, train_seconds=result.train_seconds,
                         compute_seconds=result.compute_seconds, received_digest=digest(node.payload), **figures)


def evaluation_figures(result) -> dict[str, float]:
    return {"accuracy": result.accuracy, "loss": result.loss, "n_test": result.n_test, "n_train": result.n_train,
            "eval_seconds": result.seconds, "forward_seconds": result.forward_seconds}


def evaluate(content: RecordDict, context: Context) -> RecordDict:
    node = NodeClient(context, *read_request(content), training=False)
    result = node.client.evaluate(node.round, node.payload)
    if node.meta.get("final"):
        node.export()
    return reply_content(client=node.client_id, **evaluation_figures(result))


def train_for_secure_aggregation(content: RecordDict, context: Context) -> RecordDict:
    """Training inside SecAgg+ (legacy fit messages): the upload leaves only masked, through the mod."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = dict(fitins.config)
    payload = config.pop("payload")
    node = NodeClient(context, *read_fields(config), payload, training=True)
    result = node.client.train(node.round, node.payload)
    node.save_private(node.round)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(to_arrays(decode(result.upload))),
                    num_examples=result.num_examples, metrics={})
    return compat.fitres_to_recorddict(fitres, keep_input=True)


class NodeClient:
    """The fedlrm `Client` of this SuperNode for one message, with its state from disk."""

    def __init__(self, context: Context, meta: dict, cfg: RunConfig, payload: bytes, training: bool):
        self.training = training
        self.meta, self.payload = meta, payload
        self.round = int(self.meta["round"])
        self.client_id = client_id_of(context.node_config)
        if int(self.meta["client"]) != self.client_id:
            raise FedLRMError(f"message for client {self.meta['client']} reached client {self.client_id}")
        self.node_config = dict(context.node_config)
        torch.set_num_threads(int(self.node_config.get("threads") or cfg.train.threads or
                                  os.environ.get("OMP_NUM_THREADS") or 1))
        self.cfg = cfg
        self.state_dir = state_dir_of(context)
        self.run_dir = self.state_dir / "runs" / str(self.meta["run-key"])
        device = resolve_device(cfg.train.device)  # a device this node lacks: refused before loading
        model_key = json.dumps([str(self.meta["run-key"]), to_dict(cfg)], sort_keys=True, default=str)
        cached = _models.get(model_key)
        backbone = cached[0] if cached else load_backbone(cfg.model)
        class_names, split = self.cached_data(backbone)
        self.class_names = class_names
        if cached is None or cached[3] != class_names:  # clients with data of their own may name classes apart
            algorithm = get_algorithm(cfg)
            bundle = build_model(backbone, class_names, cfg, algorithm)
            bundle.model.to(device)
            _models.clear()  # a process serves one run at a time
            _models[model_key] = cached = (backbone, bundle, algorithm, class_names)
        _, bundle, algorithm, _ = cached
        self.client = Client(bundle, algorithm, cfg, self.client_id, split, self.load_private())

    # ----- data
    def cached_data(self, backbone) -> tuple[list[str], ClientSplit]:
        """`load_data`, kept in this process for later messages; the least recently used goes first."""
        key = json.dumps([str(self.meta["run-key"]), self.client_id, str(self.state_dir)])
        if key not in _data:
            _data[key] = self.load_data(backbone)
            while len(_data) > 1 and sum(entry[2] for entry in _data.values()) > DATA_CACHE_BYTES:
                _data.popitem(last=False)
        _data.move_to_end(key)
        names, split, _ = _data[key]
        return names, split

    def load_data(self, backbone) -> tuple[list[str], ClientSplit, int]:
        """The client's class names, its split and the bytes its tensors take."""
        cfg = self.cfg
        data_cfg = cfg.data
        if "data-dir" in self.node_config:
            try:
                data_cfg = one_client_folder(cfg.data, Path(str(self.node_config["data-dir"])).expanduser())
            except DataError as err:
                raise DataError(f"this SuperNode's data-dir: {err}") from None
        elif int(self.node_config.get("num-partitions", data_cfg.total_clients)) != data_cfg.total_clients:
            raise DataError(f"this SuperNode serves partition {self.client_id} of "
                            f"{self.node_config['num-partitions']}, but the run splits the data among "
                            f"{data_cfg.total_clients} clients (data.num_clients, or the sum over data.domains); "
                            f"start SuperNodes with num-partitions={data_cfg.total_clients}")
        key = hashlib.sha256(json.dumps([to_dict(cfg)["data"], cfg.model.name, cfg.model.backend, cfg.seed,
                                         str(self.node_config.get("data-dir"))], sort_keys=True,
                                        default=str).encode()).hexdigest()[:16]
        cache = self.state_dir / "data" / f"client{self.client_id}-{key}.safetensors"
        if cache.is_file():
            tensors = load_file(cache)
            names = json.loads((cache.with_suffix(".json")).read_text())
        else:
            data = load_federated_data(data_cfg, backbone.preprocess, cfg.seed,
                                       pretrained_on=backbone.pretrained_on)
            split = data.clients[0 if "data-dir" in self.node_config else self.client_id]
            tensors = {}
            for part in ("train", "test"):
                images, labels = materialize(getattr(split, part))
                tensors[f"{part}.images"], tensors[f"{part}.labels"] = images, labels
            names = split.class_names(data.class_names)  # with data.client_classes=own: only its own, in order
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, cache)
            cache.with_suffix(".json").write_text(json.dumps(names))
        split = ClientSplit(self.client_id, ImageSet.from_tensors(tensors["train.images"], tensors["train.labels"]),
                            ImageSet.from_tensors(tensors["test.images"], tensors["test.labels"]))
        return names, split, sum(t.numel() * t.element_size() for t in tensors.values())

    # ----- private state on disk
    def private_file(self, round_index: int) -> Path:
        return self.run_dir / f"client{self.client_id}" / f"private-round{round_index:04d}.safetensors"

    def load_private(self):
        """The private weights as of the round before this message's (or the latest before it)."""
        last = self.round - 1 if self.training else self.round
        folder = self.run_dir / f"client{self.client_id}"
        rounds = sorted(int(p.stem.removeprefix("private-round")) for p in folder.glob("private-round*.safetensors"))
        usable = [r for r in rounds if r <= last]
        return load_file(self.private_file(usable[-1])) if usable else None

    def save_private(self, round_index: int) -> None:
        path = self.private_file(round_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in self.client.state().items()}, tmp)
        tmp.replace(path)  # a crash mid-write never leaves a broken state file
        for old in sorted(path.parent.glob("private-round*.safetensors"))[:-KEEP_ROUNDS]:
            old.unlink()

    def export(self) -> None:
        c = self.client
        save_personalized(self.run_dir / "adapters", c.bundle.model, self.cfg, self.class_names, self.client_id,
                          c.bundle.layout, decode(self.payload), self.round)


def materialize(image_set: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*image_set.batches(max(len(image_set), 1))) if len(image_set) else ((), ())
    if not images:
        raise DataError("a client split has no images")
    return torch.cat(images).contiguous(), torch.cat(labels).contiguous()
