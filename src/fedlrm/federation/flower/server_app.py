"""The Flower ServerApp: fedlrm's `Server` with Flower's Grid as its transport.

The round loop, the checks on uploads, aggregation and checkpoints are those of the
in-process runtime (`fedlrm.federation.server`); only the way messages reach clients
differs. The run configuration (`[tool.flwr.app.config]` of the Flower app, overridden with
`flwr run --run-config`) names a fedlrm config file and dotted overrides, a run to resume,
and how long to wait for SuperNodes.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlrm.algorithms import get_algorithm, load_config
from fedlrm.config import RunConfig
from fedlrm.data import load_federated_data
from fedlrm.errors import FedLRMError
from fedlrm.federation.flower.identity import ClientKeys, Verdict, judge, read_client_keys
from fedlrm.federation.flower.protocol import (EVALUATION_PREFIX, INFO, METRICS, STATE, digest, pull_replies, request,
                                              request_fields, unpack_state)
from fedlrm.federation.flower.secagg import from_arrays, secure_mean
from fedlrm.federation.messages import EvalReply, TrainReply
from fedlrm.federation.checkpoint import check_config, verify_checkpoint
from fedlrm.federation.rundir import new_run_dir, read_run_config, write_config
from fedlrm.federation.server import Server
from fedlrm.federation.task import build_model, resolve_device
from fedlrm.federation.wire import decode
from fedlrm.models import load_backbone
from fedlrm.reporting import write_run_report

app = ServerApp()
log = logging.getLogger("fedlrm.server")
DEFAULT_ROUND_TIMEOUT = 3600.0  # seconds; a dead SuperNode must not stall a run forever
POLL_SECONDS = 0.2
REPROBE_SECONDS = 120.0  # a node that has not answered its query for this long is asked again
PROBE_LIFETIME = 3600.0  # after this an unanswered query is given up


class FlowerTransport:
    """Sends each client's message to the SuperNode serving that client, through the Grid."""

    def __init__(self, grid: Grid, context: Context, cfg: RunConfig, run_key: str, run_dir: Path,
                 node_wait: float, wait_for: int):
        self.grid, self.context, self.cfg, self.run_key = grid, context, cfg, run_key
        self.timeout = cfg.federation.round_timeout or DEFAULT_ROUND_TIMEOUT
        self.client_of_node: dict[int, int] = {}
        self.probes: dict[int, list[tuple[str, float]]] = {}  # node id -> its unanswered queries (id, sent)
        self.refused: dict[int, Verdict] = {}  # node id -> why it serves no client (while it stays online)
        self.rejections_path = run_dir / "identity_rejections.jsonl"
        self.client_keys = self.load_client_keys()
        self.log_path = run_dir / "messages.jsonl"
        self.last_round = cfg.train.rounds
        self.wait_for_nodes(node_wait, wait_for)

    # ----- which SuperNode serves which client
    def load_client_keys(self) -> ClientKeys | None:
        """The client -> SuperNode key binding of federation.client_keys (identity.py), or None."""
        path = self.cfg.federation.client_keys
        if not path:
            log.warning("federation.client_keys is not set: SuperNodes are not checked against their keys, so any "
                        "SuperNode that joins the SuperLink and says it serves a client gets that client's "
                        "messages (docs/security.md)")
            return None
        keys = read_client_keys(path)
        missing = sorted(set(range(self.cfg.data.training_clients)) - set(keys.keys))
        log.info("SuperNodes are checked against the keys in %s", keys.path)
        if missing:
            log.warning("%s gives no key for client(s) %s: no SuperNode can serve them in this run", keys.path, missing)
        return keys

    def nodes(self, round_index: int | None = None) -> dict[int, int]:
        """client -> node id of the SuperNodes connected now; new nodes are asked who they are.

        With federation.client_keys a node is bound to the client it claims only if the SuperLink
        holds that client's key for it; a refused node gets no message, and is asked again only
        after it went offline (restarted, perhaps with its node config fixed). `round_index`: the
        round being sent, for the record (None: while waiting for SuperNodes).
        """
        if self.client_keys is not None:  # the online nodes with the keys they registered (NodeInfo.public_key)
            node_keys = {int(n.node_id): bytes(n.public_key) for n in self.grid.get_nodes()}
        else:
            node_keys = dict.fromkeys(self.grid.get_node_ids())
        live = set(node_keys)
        self.client_of_node = {n: c for n, c in self.client_of_node.items() if n in live}
        self.refused = {n: v for n, v in self.refused.items() if n in live}
        unknown = sorted(live - set(self.client_of_node) - set(self.refused))
        # A node that answers late (busy with a message of a run that ended, on a loaded host)
        # answers an earlier query: those stay pending, so a late answer still counts instead
        # of the node being asked again every round and never being heard in time.
        now = time.monotonic()
        self.probes = {n: [(m, t) for m, t in asked if now - t < PROBE_LIFETIME]
                       for n, asked in self.probes.items() if n in unknown}
        ask = [n for n in unknown if not self.probes.get(n) or now - self.probes[n][-1][1] > REPROBE_SECONDS]
        if unknown:
            probes = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in ask]
            for n, message_id in zip(ask, self.grid.push_messages(probes)):
                if message_id:
                    self.probes.setdefault(n, []).append((message_id, now))
            asked = {m: n for n, pending in self.probes.items() for m, _ in pending}
            answered: set[int] = set()
            for answer in pull_replies(self.grid, set(asked), min(self.timeout, 60.0), POLL_SECONDS):
                node = asked.get(answer.metadata.reply_to_message_id)
                if node is None or node != answer.metadata.src_node_id or node in answered:
                    continue  # not an answer to a query of ours, or not from the node asked
                answered.add(node)
                self.probes.pop(node, None)
                error, record = None, None
                if answer.has_error():
                    error = str(answer.error.reason)
                else:
                    try:
                        record = answer.content.get(METRICS)
                    except Exception:  # whatever a node sends must not end the run
                        record = None
                verdict = judge(node, node_keys.get(node), record, self.cfg.data.training_clients, self.client_keys, error)
                if verdict.ok:
                    self.client_of_node[node] = verdict.client
                    if self.client_keys is not None:
                        log.info("SuperNode %d serves client %d (its key %s is the client's)", node, verdict.client,
                                 verdict.key)
                elif error is not None and not self.stranger(node_keys.get(node)):
                    log.warning("SuperNode %d did not say which client it is: %s", node, error)  # asked again later
                else:
                    self.refuse(verdict, round_index)
            for node in sorted(set(unknown) - answered):
                if self.stranger(node_keys.get(node)):  # refused at once, so that it cannot stall each round
                    self.refuse(judge(node, node_keys.get(node), None, self.cfg.data.training_clients, self.client_keys,
                                      "no answer in time"), round_index)
        clients: dict[int, int] = {}
        for node, client in self.client_of_node.items():  # in order of discovery: the newest node wins
            if client in clients:
                log.info("SuperNodes %d and %d both serve client %d; using the newer, %d", clients[client], node,
                         client, node)
            clients[client] = node
        return clients

    def stranger(self, node_key: bytes | None) -> bool:
        """Whether the keys file gives this node's key to no client (False when keys are unchecked)."""
        return self.client_keys is not None and self.client_keys.owner(node_key) is None

    def refuse(self, verdict: Verdict, round_index: int | None) -> None:
        """Keep a node out of the client map; say so in the log and in RUN_DIR/identity_rejections.jsonl."""
        self.refused[verdict.node] = verdict
        when = "while waiting for SuperNodes" if round_index is None else f"round {round_index}"
        claimed = "no client" if verdict.claimed is None else f"client {verdict.claimed}"
        log.warning("%s: SuperNode %d claims %s and is refused: %s; it gets no message of this run", when,
                    verdict.node, claimed, verdict.reason)
        row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "round": round_index,
               "node": verdict.node, "claimed_client": verdict.claimed, "reason": verdict.reason, "key": verdict.key}
        with self.rejections_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def wait_for_nodes(self, seconds: float, count: int) -> None:
        deadline = time.monotonic() + seconds
        while len(self.nodes()) < count and time.monotonic() < deadline:
            time.sleep(0.5)
        found = sorted(self.nodes())
        log.info("SuperNodes serve clients %s (waited for %d)", found, count)

    # ----- messaging
    def exchange(self, round_index: int, train: dict[int, bytes], evaluate: dict[int, bytes],
                 eval_round: int) -> tuple[dict[int, Message], dict[int, Message]]:
        """Send training messages of `round_index` and evaluations of `eval_round` in one push and
        pull the answers: (client -> training answer, client -> evaluation answer). A client in
        both gets one training message that evaluates first, so it starts one ClientApp process."""
        clients = self.nodes(round_index)
        wanted = sorted(set(train) | set(evaluate))
        absent = [c for c in wanted if c not in clients]
        if absent:
            log.warning("round %d: no SuperNode serves client(s) %s now", round_index, absent)
        outgoing: list[Message] = []
        kinds: list[tuple[str, int]] = []
        for c in wanted:
            if c not in clients:
                continue
            if c in train:
                carried = (eval_round, evaluate[c]) if c in evaluate else None
                content = request(train[c], round_index=round_index, client=c, run_key=self.run_key, cfg=self.cfg,
                                  evaluation=carried)
                outgoing.append(Message(content, dst_node_id=clients[c], message_type=MessageType.TRAIN,
                                        group_id=f"train-{round_index}"))
                kinds.append(("train", c))
            else:
                content = request(evaluate[c], round_index=eval_round, client=c, run_key=self.run_key, cfg=self.cfg,
                                  final=eval_round == self.last_round)
                outgoing.append(Message(content, dst_node_id=clients[c], message_type=MessageType.EVALUATE,
                                        group_id=f"evaluate-{eval_round}"))
                kinds.append(("evaluate", c))
        ids = self.grid.push_messages(outgoing)
        kind_of = {m: k for m, k in zip(ids, kinds) if m}
        trained: dict[int, Message] = {}
        evaluated: dict[int, Message] = {}
        for answer in pull_replies(self.grid, set(kind_of), self.timeout, POLL_SECONDS):
            kind, client = kind_of.get(answer.metadata.reply_to_message_id, (None, None))
            if client is None or answer.metadata.src_node_id != clients[client]:
                continue  # not an answer to a message of ours, or not from the node it was sent to
            what = "train" if kind == "train" else "evaluate"
            if answer.has_error():
                log.warning("round %d: client %s failed to %s: %s", round_index, client, what, answer.error.reason)
            else:
                (trained if kind == "train" else evaluated)[client] = answer
        for kind, sent, answers in (("train", train, trained), ("evaluate", evaluate, evaluated)):
            late = sorted(set(sent) - set(answers) - set(absent))
            if late:
                log.warning("round %d: client(s) %s did not %s in time (federation.round_timeout=%s s) or failed",
                            round_index, late, kind, self.timeout)
        self.record("train", round_index, train, trained, {c: eval_round for c in evaluate})
        self.record("evaluate", eval_round, {c: m for c, m in evaluate.items() if c not in train}, evaluated)
        return trained, evaluated

    def train(self, round_index: int, messages: dict[int, bytes]) -> dict[int, TrainReply]:
        answers, _ = self.exchange(round_index, messages, {}, round_index)
        return self.train_replies(round_index, answers)

    def evaluate(self, round_index: int, messages: dict[int, bytes]) -> dict[int, EvalReply]:
        _, answers = self.exchange(round_index, {}, messages, round_index)
        return self.eval_replies(round_index, {c: answers[c].content[METRICS] for c in answers
                                               if METRICS in answers[c].content}, answers)

    def train_and_evaluate(self, round_index: int, messages: dict[int, bytes], eval_round: int,
                           evaluations: dict[int, bytes]) -> tuple[dict[int, TrainReply], dict[int, EvalReply]]:
        """Round `round_index`'s training and round `eval_round`'s evaluation (the round before) at once."""
        trained, evaluated = self.exchange(round_index, messages, evaluations, eval_round)
        figures = {}
        for c, answer in trained.items():
            if c in evaluations and METRICS in answer.content:
                m = answer.content[METRICS]
                figures[c] = {k.removeprefix(EVALUATION_PREFIX): v for k, v in m.items()
                              if k.startswith(EVALUATION_PREFIX)}
        figures.update({c: a.content[METRICS] for c, a in evaluated.items() if METRICS in a.content})
        return self.train_replies(round_index, trained), self.eval_replies(eval_round, figures,
                                                                           {**trained, **evaluated})

    def train_replies(self, round_index: int, answers: dict[int, Message]) -> dict[int, TrainReply]:
        out = {}
        for c, answer in answers.items():
            try:
                m = answer.content[METRICS]
                # the claim as sent (it may be missing, fractional or 1e12): the server's checks judge it
                out[c] = TrainReply(c, unpack_state(answer.content.get(STATE)), m.get("num_examples"),
                                    m.get("train_loss"), float(m.get("train_seconds", 0.0)),
                                    float(m.get("compute_seconds", 0.0)))
            except Exception as err:  # a reply that is not what a fedlrm client sends is no answer
                log.warning("round %d: client %d sent a malformed training reply (%s); ignored", round_index, c, err)
        return out

    def eval_replies(self, round_index: int, figures: dict, answers: dict[int, Message]) -> dict[int, EvalReply]:
        """Evaluation figures (client -> its metrics) checked: a reply that is not one is ignored."""
        out = {}
        for c in sorted(set(answers)):
            m = figures.get(c)
            try:
                reply = EvalReply(c, float(m["accuracy"]), float(m["loss"]), int(m["n_test"]), int(m["n_train"]),
                                  float(m.get("eval_seconds", 0.0)), float(m.get("forward_seconds", 0.0)))
            except Exception as err:
                log.warning("round %d: client %d sent a malformed evaluation reply (%s); ignored", round_index, c,
                            err if m is not None else "it has no evaluation")
                continue
            if not 0 <= reply.accuracy <= 1 or reply.n_test < 1:
                log.warning("round %d: client %d reports accuracy %s on %s test images; ignored", round_index, c,
                            reply.accuracy, reply.n_test)
                continue
            out[c] = reply
        return out

    def secure_train(self, round_index: int, messages: dict[int, bytes], schema):
        """Training whose uploads reach the server only as their SecAgg+ weighted mean."""
        clients = self.nodes(round_index)
        configs = {clients[c]: {**request_fields(round_index=round_index, client=c, run_key=self.run_key,
                                                 cfg=self.cfg), "payload": payload}
                   for c, payload in messages.items() if c in clients}
        mean, contributors = secure_mean(self.grid, self.context, configs, round_index, self.cfg.privacy,
                                         self.timeout)
        log.info("round %d: SecAgg+ mean of %d of %d clients' uploads", round_index, contributors, len(messages))
        with self.log_path.open("a") as f:
            for c, payload in sorted(messages.items()):
                f.write(json.dumps(describe(round_index, c, "down", "secure-train", payload)) + "\n")
            f.write(json.dumps({"round": round_index, "kind": "secure-train", "direction": "up",
                                "contributors": contributors, "tensors": {k: list(v[0]) for k, v in schema.items()}})
                    + "\n")
        return (from_arrays(mean, schema) if mean is not None else None), contributors

    def private_states(self) -> dict:
        return {}  # clients keep their own, on their own disks

    def restore(self, private) -> None:
        pass

    def record(self, kind: str, round_index: int, payloads: dict[int, bytes], answers: dict[int, Message],
               evaluates: dict[int, int] | None = None) -> None:
        """What crossed, per message: tensor names, shapes and bytes (inspected by tests and audits);
        `evaluates`: client -> the earlier round its training message also had it evaluate."""
        with self.log_path.open("a") as f:
            for c, payload in sorted(payloads.items()):
                row = describe(round_index, c, "down", kind, payload)
                if evaluates and c in evaluates:
                    row["evaluates_round"] = evaluates[c]
                f.write(json.dumps(row) + "\n")
                if c in answers:
                    up = unpack_state(answers[c].content.get(STATE))
                    row = describe(round_index, c, "up", kind, up)
                    row["metrics"] = dict(answers[c].content.get(METRICS, {}))
                    row["info"] = dict(answers[c].content.get(INFO, {}))
                    f.write(json.dumps(row) + "\n")


def describe(round_index: int, client: int, direction: str, kind: str, payload: bytes) -> dict:
    state = decode(payload)
    return {"round": round_index, "client": client, "direction": direction, "kind": kind, "bytes": len(payload),
            "digest": digest(payload), "tensors": {k: list(v.shape) for k, v in state.items()}}


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP call drowns the run's own log
    rc = dict(context.run_config)
    resume = str(rc.get("resume", "") or "")
    if resume:
        run_dir = Path(resume).expanduser()
        cfg = read_run_config(run_dir)  # strictly: a cut or edited file must not resume with defaults
        check_config(run_dir, cfg)  # before the model loads; verify_checkpoint below checks the rest
        if not (run_dir / "run_key").is_file():
            raise FedLRMError(f"resume={resume} has no run_key, so it is not a run of the Flower server app "
                              f"(an in-process run resumes with `fedlrm run --resume {resume}`)")
        run_key = (run_dir / "run_key").read_text().strip()
    else:
        cfg = load_config(str(rc.get("config-file", "") or "") or None, shlex.split(str(rc.get("overrides", ""))))
        if not Path(cfg.output_dir).expanduser().is_absolute():
            cfg.output_dir = str(Path.home() / "fedlrm-runs" / cfg.output_dir)
    device = resolve_device(cfg.train.device)  # a device this machine lacks: refused before loading
    backbone = load_backbone(cfg.model)
    global_tests, class_names, domain_of = [], None, {}
    if rc.get("global-eval", True):
        data = load_federated_data(cfg.data, backbone.preprocess, cfg.seed,
                                   pretrained_on=backbone.pretrained_on)
        global_tests, class_names, domain_of = data.global_tests, data.class_names, data.domain_of()
    algorithm = get_algorithm(cfg)
    bundle = build_model(backbone, class_names or [f"class {i}" for i in range(2)], cfg, algorithm)
    bundle.model.to(device)
    if not resume:
        run_dir = new_run_dir(cfg)
        write_config(run_dir, cfg)
        run_key = f"{run_dir.name}-{uuid.uuid4().hex[:8]}"
        (run_dir / "run_key").write_text(run_key)
    log.info("run directory: %s", run_dir)
    # held-out new clients (data.new_clients) take no part: a SuperNode claiming one is refused
    server = Server(cfg, algorithm, bundle, cfg.data.training_clients, global_tests, progress=False,
                    domain_of=domain_of)
    # before anything is written or SuperNodes are waited for; clients keep their own private state
    ckpt = verify_checkpoint(run_dir, cfg, server, ()) if resume else None
    wait_for = int(rc.get("wait-for-clients", 0) or cfg.data.training_clients)
    transport = FlowerTransport(grid, context, cfg, run_key, run_dir, float(rc.get("node-wait-timeout", 120.0)), wait_for)
    result = server.run(transport, run_dir, resume=ckpt if ckpt is not None else False)
    write_run_report(run_dir, result, cfg.algorithm)
    if algorithm.trains:
        algorithm.write_report(run_dir, result.server_state)
    log.info("finished: %s", json.dumps({k: v for k, v in result.summary.items() if k != "per_client_accuracy"}))
