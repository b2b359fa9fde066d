"""A client's side of a run, whatever carries the messages: it keeps its private weights,
answers a training message with an upload and an evaluation message with its accuracy."""

from __future__ import annotations

import time

from fedlrm.algorithms import Algorithm, State
from fedlrm.config import RunConfig
from fedlrm.data import ClientSplit
from fedlrm.federation import privacy
from fedlrm.federation.messages import EvalReply, TrainReply
from fedlrm.federation.states import PrivateStates
from fedlrm.federation.task import ModelBundle, client_round, evaluate, initial_private, load_client
from fedlrm.federation.wire import decode, encode


class Client:
    """`states` holds the private states (this client's among others'); without it, the client keeps
    its own in memory, starting from `private` (None: the initial state)."""

    def __init__(self, bundle: ModelBundle, algorithm: Algorithm, cfg: RunConfig, client_id: int,
                 split: ClientSplit, private: State | None = None, states: PrivateStates | None = None):
        self.bundle, self.algorithm, self.cfg = bundle, algorithm, cfg
        self.client_id, self.split = client_id, split
        if states is None:
            states = PrivateStates([client_id], lambda c: initial_private(bundle, algorithm, cfg, c))
            if private is not None:
                states.put(client_id, private)
        self.states = states

    def state(self) -> State:
        return self.states[self.client_id]

    def train(self, round_index: int, message: bytes) -> TrainReply:
        with self.bundle.model.classifying_over(self.split.classes):
            return self._train(round_index, message)

    def evaluate(self, round_index: int, message: bytes) -> EvalReply:
        with self.bundle.model.classifying_over(self.split.classes):
            return self._evaluate(round_index, message)

    def _train(self, round_index: int, message: bytes) -> TrainReply:
        result = client_round(self.bundle, self.algorithm, self.cfg, self.split.train, self.state(), message,
                              round_index, self.client_id)
        self.states.put(self.client_id, result.private)
        upload = result.upload
        if privacy.enabled(self.cfg.privacy):
            upload = encode(privacy.privatize(decode(upload), decode(message), self.cfg.privacy))
        return TrainReply(self.client_id, upload, len(self.split.train), result.stats.loss, result.stats.seconds,
                          result.stats.compute_seconds)

    def _evaluate(self, round_index: int, message: bytes) -> EvalReply:
        t0 = time.perf_counter()
        load_client(self.bundle, self.algorithm, self.cfg, self.client_id, self.state(), decode(message), round_index)
        result = evaluate(self.bundle.model, self.split.test, self.cfg.train.eval_batch_size, self.cfg.train)
        return EvalReply(self.client_id, result["accuracy"], result["loss"], result["examples"],
                         len(self.split.train), time.perf_counter() - t0, result["forward_seconds"])
