"""The in-process runtime: the server and every client in one Python process.

Messages still cross as bytes (see `wire`), so what is counted and what a test can
inspect is exactly what a deployed client would send or receive.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from fedlrm.algorithms import Algorithm, State, get_algorithm
from fedlrm.config import RunConfig
from fedlrm.data import FederatedData, load_federated_data
from fedlrm.errors import ConfigError, FedLRMError
from fedlrm.federation.client import Client
from fedlrm.federation.messages import EvalReply, TrainReply
from fedlrm.federation.server import RunResult, Server
from fedlrm.federation.states import PrivateStates
from fedlrm.federation.task import ModelBundle, build_model, initial_private, resolve_device
from fedlrm.models import load_backbone
from fedlrm.models.backbone import check_fits


class InProcessTransport:
    """Every client lives in this process and shares one model; a message is a function call."""

    def __init__(self, clients: list[Client], progress: bool = False):
        self.clients = clients
        self.progress = progress
        self.states = clients[0].states if clients else PrivateStates([], lambda c: {})

    def train(self, round_index: int, messages: dict[int, bytes]) -> dict[int, TrainReply]:
        from tqdm.auto import tqdm

        return {c: self.clients[c].train(round_index, m)
                for c, m in tqdm(messages.items(), desc=f"round {round_index} clients", leave=False,
                                 disable=not self.progress)}

    def evaluate(self, round_index: int, messages: dict[int, bytes]) -> dict[int, EvalReply]:
        return {c: self.clients[c].evaluate(round_index, m) for c, m in messages.items()}

    def private_states(self) -> PrivateStates:
        return self.states

    def restore(self, private: Mapping[int, State]) -> None:
        self.states.restore(private)

    def secure_train(self, round_index, messages, schema):
        raise FedLRMError("privacy.secagg needs the Flower runtime (fedlrm flower, or flwr run flower-app)")


class Simulation:
    """Prepares everything that can fail on bad input first, then runs rounds."""

    def __init__(self, cfg: RunConfig, data: FederatedData | None = None, progress: bool = True):
        if cfg.privacy.secagg:  # in one process there is nothing to hide the uploads from
            raise ConfigError("privacy.secagg needs the Flower runtime: run with `fedlrm flower` or "
                              "`flwr run flower-app`, or drop privacy.secagg")
        device = resolve_device(cfg.train.device)  # before the model loads, which can take long
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.cfg = cfg
        self.progress = progress
        self.algorithm: Algorithm = get_algorithm(cfg)
        backbone = load_backbone(cfg.model)
        check_fits(backbone, cfg.model, cfg.adapter.rank)  # before the data, which can take long to read
        self.data = data if data is not None else load_federated_data(
            cfg.data, backbone.preprocess, cfg.seed, pretrained_on=backbone.pretrained_on)
        self.bundle: ModelBundle = build_model(backbone, self.data.class_names, cfg, self.algorithm)
        self.bundle.model.to(device)
        # The clients that train; the last data.new_clients splits are held out until the run is over
        # (`newcomers`): the server knows nothing of them, so it can neither sample nor message them.
        self.num_clients = len(self.data.clients) - cfg.data.new_clients
        if self.num_clients < 1:
            raise ConfigError(f"data.new_clients={cfg.data.new_clients} holds out every one of the "
                              f"{len(self.data.clients)} clients of the data; hold out fewer")
        training = self.data.clients[:self.num_clients]
        self.newcomers = self.data.clients[self.num_clients:]
        self.server = Server(cfg, self.algorithm, self.bundle, self.num_clients, self.data.global_tests, progress,
                             domain_of=self.data.domain_of(),
                             example_bounds={c: len(split.train) for c, split in enumerate(training)})
        # one store of every client's private state: on disk in the run directory but for those that changed
        # since the last checkpoint (`fedlrm.federation.states`)
        self.states = PrivateStates(range(self.num_clients),
                                    lambda c: initial_private(self.bundle, self.algorithm, cfg, c))
        self.clients = [Client(self.bundle, self.algorithm, cfg, c, split, states=self.states)
                        for c, split in enumerate(training)]

    def run(self, run_dir: Path | None = None, resume: bool = False,
            stop_after_round: int | None = None) -> RunResult:
        """Run (or continue) the federation; with a run_dir, checkpoint after every round."""
        transport = InProcessTransport(self.clients, self.progress)
        return self.server.run(transport, run_dir, resume, stop_after_round)

