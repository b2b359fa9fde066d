"""The Flower ClientApp: one SuperNode is one fedlrm client.

The SuperNode's node config says where its data is:
  * `partition-id` and `num-partitions`: its part of the run's dataset, split exactly as the
    in-process runtime splits it (num-partitions must equal data.num_clients);
  * `data-dir`: its own data, the real deployment case: a folder with `train.parquet` and
    `test.parquet` (Hugging Face image layout) or `train/` and `test/` image folders,
    whose classes are those of the run;
and optionally `state-dir` (default ~/.cache/fedlrm/supernode/<partition or folder name>),
where the client keeps its private weights (local expert, gate) between rounds, its
preprocessed images and, after the last round, its personalised adapters. Private
weights are kept on disk rather than in Flower's `context.state` so that they survive a
SuperNode restart and a server that resumes a run as a new Flower run.

Flower starts a ClientApp process per message, so each message rebuilds the model (the
backbone is cached by transformers/open_clip on disk) and reads the preprocessed images
from the state dir.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from safetensors.torch import load_file, save_file

from fedlrm.algorithms import get_algorithm
from fedlrm.config import RunConfig, to_dict
from fedlrm.data import ClientSplit, ImageSet, load_federated_data
from fedlrm.errors import DataError, FedLRMError
from fedlrm.federation.client import Client
from fedlrm.federation.export import save_personalized
from fedlrm.federation.flower.protocol import digest, read_fields, read_request, reply
from fedlrm.federation.flower.secagg import is_secagg, secagg_when_asked, to_arrays
from fedlrm.federation.task import build_model, resolve_device
from fedlrm.federation.wire import decode
from fedlrm.models import load_backbone

app = ClientApp(mods=[secagg_when_asked])
KEEP_ROUNDS = 3  # private-state files kept per client; a resumed server goes back at most one round


# ----------------------------------------------------------------------------- handlers
@app.train()
def train(message: Message, context: Context) -> Message:
    if is_secagg(message):
        return train_for_secure_aggregation(message, context)
    node = NodeClient(context, *read_request(message), training=True)
    result = node.client.train(node.round, node.payload)
    node.save_private(node.round)
    return reply(message, decode(result.upload), client=node.client_id, num_examples=result.num_examples,
                 train_loss=result.train_loss, train_seconds=result.train_seconds,
                 compute_seconds=result.compute_seconds,
                 received_digest=digest(node.payload))


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    node = NodeClient(context, *read_request(message), training=False)
    result = node.client.evaluate(node.round, node.payload)
    if node.meta.get("final"):
        node.export()
    return reply(message, client=node.client_id, accuracy=result.accuracy, loss=result.loss,
                 n_test=result.n_test, n_train=result.n_train, eval_seconds=result.seconds,
                 forward_seconds=result.forward_seconds)


def train_for_secure_aggregation(message: Message, context: Context) -> Message:
    """Training inside SecAgg+ (legacy fit messages): the upload leaves only masked, through the mod."""
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    config = dict(fitins.config)
    payload = config.pop("payload")
    node = NodeClient(context, *read_fields(config), payload, training=True)
    result = node.client.train(node.round, node.payload)
    node.save_private(node.round)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(to_arrays(decode(result.upload))),
                    num_examples=result.num_examples, metrics={})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Which client (partition) this SuperNode is: asked by the server before it sends work. With
    federation.client_keys the server believes it only if the SuperLink holds that client's key for
    this node (identity.py), so the answer needs no proof of its own."""
    return reply(message, client=client_id_of(context.node_config))


# ----------------------------------------------------------------------------- the client
def client_id_of(node_config) -> int:
    if "partition-id" in node_config:
        return int(node_config["partition-id"])
    if "client-id" in node_config:
        return int(node_config["client-id"])
    raise DataError("this SuperNode's node config names neither `partition-id` (with `num-partitions`) nor "
                    "`client-id` (with `data-dir`); start it with e.g. --node-config 'partition-id=0 num-partitions=3'")


class NodeClient:
    """The fedlrm `Client` of this SuperNode for one message, with its state from disk."""

    def __init__(self, context: Context, meta: dict, cfg: RunConfig, payload: bytes, training: bool):
        self.training = training
        self.meta, self.payload = meta, payload
        self.round = int(self.meta["round"])
        self.client_id = client_id_of(context.node_config)
        if int(self.meta["client"]) != self.client_id:
            raise FedLRMError(f"message for client {self.meta['client']} reached client {self.client_id}")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.cfg = cfg
        self.node_config = dict(context.node_config)
        name = f"partition-{self.client_id}" if "data-dir" not in self.node_config else \
            Path(str(self.node_config["data-dir"])).name
        self.state_dir = Path(str(self.node_config.get("state-dir") or
                                  Path.home() / ".cache" / "fedlrm" / "supernode" / name)).expanduser()
        self.run_dir = self.state_dir / "runs" / str(self.meta["run-key"])
        device = resolve_device(cfg.train.device)  # a device this node lacks: refused before loading
        backbone = load_backbone(cfg.model)
        class_names, split = self.load_data(backbone.preprocess)
        self.class_names = class_names
        algorithm = get_algorithm(cfg)
        bundle = build_model(backbone, class_names, cfg, algorithm)
        bundle.model.to(device)
        self.client = Client(bundle, algorithm, cfg, self.client_id, split, self.load_private())

    # ----- data
    def load_data(self, preprocess) -> tuple[list[str], ClientSplit]:
        cfg = self.cfg
        data_cfg = cfg.data
        if "data-dir" in self.node_config:
            data_cfg = own_data_config(cfg, Path(str(self.node_config["data-dir"])).expanduser())
        elif int(self.node_config.get("num-partitions", data_cfg.num_clients)) != data_cfg.num_clients:
            raise DataError(f"this SuperNode serves partition {self.client_id} of "
                            f"{self.node_config['num-partitions']}, but the run splits the data among "
                            f"data.num_clients={data_cfg.num_clients}; start SuperNodes with "
                            f"num-partitions={data_cfg.num_clients}")
        key = hashlib.sha256(json.dumps([to_dict(cfg)["data"], cfg.model.name, cfg.model.backend, cfg.seed,
                                         str(self.node_config.get("data-dir"))], sort_keys=True,
                                        default=str).encode()).hexdigest()[:16]
        cache = self.state_dir / "data" / f"client{self.client_id}-{key}.safetensors"
        if cache.is_file():
            tensors = load_file(cache)
            names = json.loads((cache.with_suffix(".json")).read_text())
        else:
            data = load_federated_data(data_cfg, preprocess, cfg.seed)
            split = data.clients[0 if "data-dir" in self.node_config else self.client_id]
            tensors = {}
            for part in ("train", "test"):
                images, labels = materialize(getattr(split, part))
                tensors[f"{part}.images"], tensors[f"{part}.labels"] = images, labels
            names = data.class_names
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, cache)
            cache.with_suffix(".json").write_text(json.dumps(names))
        split = ClientSplit(self.client_id, ImageSet.from_tensors(tensors["train.images"], tensors["train.labels"]),
                            ImageSet.from_tensors(tensors["test.images"], tensors["test.labels"]))
        return names, split

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


def own_data_config(cfg: RunConfig, folder: Path):
    """The run's data settings pointed at one client's own folder (all of it is this client's)."""
    if (folder / "train.parquet").is_file() and (folder / "test.parquet").is_file():
        source, train, test = "parquet", folder / "train.parquet", folder / "test.parquet"
    elif (folder / "train").is_dir() and (folder / "test").is_dir():
        source, train, test = "imagefolder", folder / "train", folder / "test"
    else:
        raise DataError(f"data-dir {folder} holds neither train.parquet + test.parquet nor train/ + test/ "
                        f"image folders")
    return replace(cfg.data, source=source, train=str(train), test=str(test), num_clients=1,
                   partition="dirichlet", dirichlet_alpha=1.0)

