"""The server's side of a run, whatever carries the messages.

`Server.run` is the round loop of every runtime: sample clients, send each its message,
check and aggregate what comes back, have every client evaluate, record, checkpoint.
How messages reach clients is a `Transport` (`messages`): in-process calls (`simulation`)
or Flower messages (`flower`). Neither the loop nor a transport knows which algorithm runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fedlrm.adapters import get_state, reset_adapters
from fedlrm.algorithms import Algorithm, ServerState, Upload
from fedlrm.config import RunConfig
from fedlrm.data import GlobalTest
from fedlrm.errors import FedLRMError
from fedlrm.federation import privacy
from fedlrm.federation.checkpoint import Checkpoint, canonical_config, save_checkpoint, verify_checkpoint
from fedlrm.federation.messages import EvalReply, Message, TrainReply, Transport
from fedlrm.federation.task import ModelBundle, evaluate, personalize
from fedlrm.federation.robust import capped_weights, clip_update, combine
from fedlrm.federation.validation import (Rejection, claim_problem, expected_upload, norm_outliers,
                                          schema_problem, update_norm)
from fedlrm.federation.wire import decode, encode
from fedlrm.reporting.tracking import RoundReporter
from fedlrm.seeding import derive_seed, sample_clients

log = logging.getLogger("fedlrm.server")


class RoundFailed(FedLRMError):
    pass


@dataclass
class RunResult:
    run_dir: Path | None
    client_rows: list[dict]
    round_rows: list[dict]
    summary: dict
    server_state: ServerState
    client_states: Mapping  # client id -> private state (in-process; {} where clients keep their own)
    messages: list[Message] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


class Server:
    def __init__(self, cfg: RunConfig, algorithm: Algorithm, bundle: ModelBundle, num_clients: int,
                 global_test=None, progress: bool = True, example_bounds: dict[int, int] | None = None,
                 domain_of: Mapping[int, str] | None = None):
        """`global_test`: what a global model is evaluated on, an ImageSet or a list of GlobalTest (one per
        domain, each over its own classes); `example_bounds`: each client's training examples, where the
        server knows them (in-process); `domain_of`: client id -> its domain, for accuracies per domain."""
        self.cfg, self.algorithm, self.bundle = cfg, algorithm, bundle
        self.example_bounds = example_bounds
        self.round_norms: dict[int, float] = {}
        self.round_clipped = 0
        fed = cfg.federation
        if algorithm.trains and fed.bound_examples and example_bounds is None and fed.max_examples is None:
            log.warning("no bound on the training examples a client claims (its weight in every average): "
                        "set federation.max_examples%s", "" if fed.max_weight_share else
                        " or cap each client's share with federation.max_weight_share")
        self.num_clients = num_clients
        if global_test is None or isinstance(global_test, list):
            self.global_tests = list(global_test or [])
        else:
            self.global_tests = [GlobalTest("", None, global_test)]
        self.domain_of = dict(domain_of or {})
        self.progress = progress
        self.max_upload_params = 0
        self.rejections: list[Rejection] = []

    def initial_state(self) -> ServerState:
        reset_adapters(self.bundle.model, derive_seed(self.cfg.seed, "init", "global"))
        return self.algorithm.init_server(get_state(self.bundle.model, self.bundle.shared_keys))

    # ------------------------------------------------------------------ checks and aggregation
    def accept(self, round_index: int, sent: dict[int, bytes], replies: dict[int, TrainReply]) -> list[Upload]:
        """The uploads that pass every check, with bounded weights and, if set, clipped changes;
        the others are logged and recorded as rejections."""
        fed = self.cfg.federation
        candidates, norms = {}, {}
        for c, reply in sorted(replies.items()):
            message = decode(sent[c])
            try:
                upload = decode(reply.upload)
            except Exception as err:  # a corrupt payload is a bad update like any other
                self._reject(round_index, c, f"payload cannot be decoded ({err})")
                continue
            schema = expected_upload(self.bundle, self.algorithm, self.cfg, c, message, round_index)
            problem = schema_problem(schema, upload) or claim_problem(reply.num_examples, self.example_bound(c))
            if problem:
                self._reject(round_index, c, problem)
                continue
            trained = schema.keys() - self.algorithm.report_schema(self.bundle.model).keys()
            norm = update_norm(upload, message, trained)
            if trained and norm == 0.0:  # colluding zero uploads must not stand for training
                self._reject(round_index, c, "the upload is not a change: it returns exactly what it was sent")
                continue
            norms[c] = norm
            candidates[c] = (upload, message, trained, int(reply.num_examples))
        self.round_norms = norms
        for c, reason in norm_outliers(norms, fed.max_norm_ratio).items():
            self._reject(round_index, c, reason)
            candidates.pop(c)
        weights = capped_weights({c: n for c, (_, _, _, n) in candidates.items()}, fed.max_weight_share)
        uploads, self.round_clipped = [], 0
        for c, (upload, message, trained, _) in candidates.items():
            if fed.clip_update_norm is not None:
                upload, factor = clip_update(upload, message, trained, fed.clip_update_norm)
                self.round_clipped += factor < 1
            uploads.append(Upload(c, upload, weights[c]))
        return uploads

    def example_bound(self, client: int) -> int | None:
        """The most training examples `client` may claim: what its data holds where the server
        knows it (in-process), federation.max_examples where set; None: unbounded."""
        fed = self.cfg.federation
        if not fed.bound_examples:
            return None
        bounds = [b for b in ((self.example_bounds or {}).get(client), fed.max_examples) if b is not None]
        return min(bounds) if bounds else None

    def secure_round(self, transport: Transport, round_index: int, sent: dict[int, bytes]) -> tuple[list[Upload], int]:
        """A round with secure aggregation: the transport returns only the weighted mean of the
        uploads, which is checked as a whole and stands in for them (see `aggregates_by_mean`)."""
        first = min(sent)
        schema = expected_upload(self.bundle, self.algorithm, self.cfg, first, decode(sent[first]), round_index)
        mean, contributors = transport.secure_train(round_index, sent, schema)
        if mean is None:
            return [], 0
        problem = schema_problem(schema, mean)
        if problem:
            self._reject(round_index, -1, f"the securely aggregated mean: {problem}")
            return [], contributors
        return [Upload(-1, mean, 1)], contributors  # one upload standing for all contributors

    def _reject(self, round_index: int, client: int, reason: str) -> None:
        log.warning("round %d: rejected the upload of client %d: %s", round_index, client, reason)
        self.rejections.append(Rejection(round_index, client, reason))

    def aggregate(self, round_index: int, state: ServerState, uploads: list[Upload],
                  contributors: int | None = None) -> ServerState:
        """The new server state; `contributors` is how many clients stand behind `uploads`
        (one each, unless secure aggregation merged them)."""
        needed = self.cfg.federation.min_clients
        contributors = len(uploads) if contributors is None else contributors
        if contributors < needed:
            raise RoundFailed(
                f"round {round_index}: only {contributors} valid upload(s) arrived, fewer than "
                f"federation.min_clients={needed}; the last checkpoint keeps the state of round "
                f"{round_index - 1}. Bring clients back and resume the run, or lower federation.min_clients.")
        if self.cfg.federation.aggregator != "mean" and len(uploads) > 1:
            uploads = [combine(uploads, self.cfg.federation)]  # the robust estimate stands in for them
        return self.algorithm.aggregate(state, uploads, round_index) if uploads else state

    # ------------------------------------------------------------------ the round loop
    def run(self, transport: Transport, run_dir: Path | None = None, resume: bool | Checkpoint = False,
            stop_after_round: int | None = None) -> RunResult:
        """Run (or continue) the federation; with a run_dir, checkpoint after every round.

        `resume`: True continues from run_dir's checkpoint, verified first (`verify_checkpoint`),
        or it is the checkpoint a caller verified already. `stop_after_round` ends the run early
        as an interruption would (for tests)."""
        cfg, algo = self.cfg, self.algorithm
        state = self.initial_state()
        client_rows: list[dict] = []
        round_rows: list[dict] = []
        start = 1 if algo.trains else 0
        last = cfg.train.rounds if algo.trains else 0
        ckpt = resume if isinstance(resume, Checkpoint) else None
        if resume is True and run_dir is not None:
            ckpt = verify_checkpoint(run_dir, cfg, self, sorted(transport.private_states()))
        transport.restore(ckpt.clients if ckpt is not None else {})  # a fresh run starts every client afresh
        if ckpt is not None:
            state, client_rows, round_rows = ckpt.server, list(ckpt.client_rows), list(ckpt.round_rows)
            # what the summary and rejected_updates.json count covers the rounds before the resume too
            self.rejections, self.max_upload_params = list(ckpt.rejections), ckpt.max_upload_params
            start = ckpt.round + 1
        config = canonical_config(cfg) if run_dir is not None else None  # the checkpoints are bound to it
        if run_dir is not None and privacy.enabled(cfg.privacy):
            privacy.write_privacy_report(run_dir, cfg.privacy, cfg.train.rounds)
        messages: list[Message] = []
        # A transport that can carry round r's evaluation with round r + 1's training messages
        # (one ClientApp process per client and round on Flower) gets it so; the last round's
        # full evaluation always goes on its own. SecAgg+ training messages carry nothing else.
        defer = hasattr(transport, "train_and_evaluate") and not cfg.privacy.secagg
        pending = ckpt.pending_evaluation if ckpt is not None else None
        bar = tqdm(range(start, last + 1), desc=f"{algo.name} rounds", disable=not self.progress, unit="round")
        reporter = RoundReporter(algo.name, last, run_dir / "tensorboard" if run_dir is not None and
                                 cfg.report.tensorboard else None, start_round=start)
        for r in bar:
            t0 = time.perf_counter()
            sampled = sample_clients(cfg.seed, r, self.num_clients, cfg.train.client_fraction) if r else []
            sent = {c: encode(algo.message_for(state, c, r)) for c in sampled}
            rejected_before = len(self.rejections)
            self.round_norms, self.round_clipped = {}, 0
            late_evals: dict[int, EvalReply] = {}
            if pending is not None:  # state is still that of round pending["round"]
                p = pending["round"]
                late = {c: encode(algo.message_for(state, c, p)) for c in pending["clients"]}
                if not defer:  # a run resumed by a transport that cannot carry it: on its own, first
                    late_evals = transport.evaluate(p, late)
            if cfg.privacy.secagg and sent:
                uploads, answered = self.secure_round(transport, r, sent)
                contributors = answered if uploads else 0
                replies = {}
                # the masked traffic is larger; counted as the plain payloads it stands for
                bytes_up = sum(len(encode(u.state)) for u in uploads) * answered
                bytes_down = sum(len(m) for m in sent.values())
            else:
                if pending is not None and defer:
                    replies, late_evals = transport.train_and_evaluate(r, sent, p, late)
                else:
                    replies = transport.train(r, sent) if sent else {}
                for c, reply in replies.items():
                    messages += [Message(r, c, "down", sent[c]), Message(r, c, "up", reply.upload)]
                for c in sorted(set(sent) - set(replies)):
                    log.warning("round %d: client %d did not answer (crashed, left or timed out); "
                                "the round goes on without it", r, c)
                uploads = self.accept(r, sent, replies)
                answered, contributors = len(replies), len(uploads)
                bytes_up = sum(len(x.upload) for x in replies.values())
                bytes_down = sum(len(sent[c]) for c in replies)
            late_rows = []
            if pending is not None:
                late_rows = self.finish_evaluation(pending, late_evals, round_rows, reporter)
                client_rows += late_rows
                pending = None
            for u in uploads:
                self.max_upload_params = max(self.max_upload_params, sum(v.numel() for v in u.state.values()))
            if sampled:
                state = self.aggregate(r, state, uploads, contributors)
            train_seconds = time.perf_counter() - t0
            rows = []
            evaluating = r == last or r % cfg.train.eval_every == 0
            trained = self._train_facts(sent, replies)
            if evaluating:
                # every client in the last round; before, a sample, so a round costs what it samples
                evaluated = (list(range(self.num_clients)) if r == last else
                             sample_clients(cfg.seed, r, self.num_clients, cfg.train.eval_fraction, "evaluate"))
                if defer and r != last:
                    pending = {"round": r, "clients": [int(c) for c in evaluated],
                               "trained": {str(c): facts for c, facts in trained.items()}}
                else:
                    evals = transport.evaluate(r, {c: encode(algo.message_for(state, c, r)) for c in evaluated})
                    rows = self._client_rows(r, evals, trained)
            client_rows += rows
            round_row = {"round": r, "clients_sampled": len(sampled), "clients_answered": answered,
                         "clients_rejected": len(self.rejections) - rejected_before,
                         "clients_clipped": self.round_clipped,
                         "update_norm_median": float(np.median(list(self.round_norms.values())))
                         if self.round_norms else None,
                         "bytes_up": bytes_up, "bytes_down": bytes_down,
                         "train_seconds": train_seconds}
            if rows:
                round_row.update(self.accuracy_stats(rows))
                bar.set_postfix(acc=f"{round_row['acc_weighted']:.4f}")
            compute = sum(x.compute_seconds for x in replies.values())
            compute += sum(row["eval_forward_seconds"] for row in rows + late_rows)  # those ran in this round
            if r == last:
                global_eval = self.evaluate_global(state, r)
                compute += global_eval.pop("forward_seconds", 0.0)
                round_row.update(global_eval)
            round_row["wall_seconds"] = time.perf_counter() - t0
            # The runner's own share of the round: everything but forward, backward and
            # optimiser steps (messages, checks, aggregation, data batching, checkpoints).
            # Meaningful in-process, where clients run one after another on this clock.
            round_row["compute_seconds"] = compute
            round_row["overhead_share"] = max(0.0, 1.0 - compute / round_row["wall_seconds"])
            round_rows.append(round_row)
            if run_dir is not None:
                save_checkpoint(run_dir, Checkpoint(r, state, transport.private_states(), client_rows, round_rows,
                                                    list(self.rejections), self.max_upload_params, config,
                                                    pending))
                self.write_rejections(run_dir)
            if pending is None:  # a round whose evaluation is on its way is reported when it arrives
                reporter.round_done(round_row, rows)
            if stop_after_round is not None and r >= stop_after_round:
                break
        bar.close()
        reporter.close()
        return RunResult(run_dir, client_rows, round_rows, self.summarize(client_rows, round_rows, state), state,
                         transport.private_states(), messages, list(self.rejections))

    def finish_evaluation(self, pending: dict, evals: dict[int, EvalReply], round_rows: list[dict],
                          reporter: RoundReporter) -> list[dict]:
        """Round pending["round"]'s evaluation, come back with a later round's training: its
        client rows; its round row gets the accuracies and is reported now."""
        p = pending["round"]
        missing = sorted(set(pending["clients"]) - set(evals))
        if missing:
            log.warning("round %d: client(s) %s sent no evaluation of round %d (crashed, left or timed out)",
                        p + 1, missing, p)
        trained = {int(c): facts for c, facts in pending["trained"].items()}
        rows = self._client_rows(p, {c: e for c, e in evals.items() if c in pending["clients"]}, trained)
        row = next(x for x in round_rows if x["round"] == p)
        if rows:
            row.update(self.accuracy_stats(rows))
        reporter.round_done(row, rows)
        return rows

    @staticmethod
    def _train_facts(sent: dict[int, bytes], replies: dict[int, TrainReply]) -> dict[int, dict]:
        """What a client row says of a client's training this round (kept until its evaluation)."""
        return {c: {"train_loss": reply.train_loss, "train_seconds": reply.train_seconds,
                    "bytes_up": len(reply.upload), "bytes_down": len(sent[c]),
                    "compute_seconds": reply.compute_seconds} for c, reply in replies.items()}

    def _client_rows(self, r, evals: dict[int, EvalReply], trained: dict[int, dict]) -> list[dict]:
        rows = []
        for c, e in sorted(evals.items()):
            facts = trained.get(c)
            rows.append({
                "round": r, "client": c, "sampled": facts is not None,
                "accuracy": e.accuracy, "loss": e.loss, "n_test": e.n_test, "n_train": e.n_train,
                "train_loss": facts["train_loss"] if facts else None,
                "train_seconds": facts["train_seconds"] if facts else 0.0,
                "bytes_up": facts["bytes_up"] if facts else 0,
                "bytes_down": facts["bytes_down"] if facts else 0,
                "eval_seconds": e.seconds,
                "compute_seconds": facts["compute_seconds"] if facts else 0.0,
                "eval_forward_seconds": e.forward_seconds,
            })
        return rows

    def accuracy_stats(self, rows: list[dict]) -> dict:
        """Accuracy over the clients of `rows`; with domains, also each domain's weighted accuracy
        (`acc_weighted/<domain>`)."""
        out = client_accuracy_stats(rows)
        for label in dict.fromkeys(self.domain_of.values()):
            own = [row for row in rows if self.domain_of.get(row["client"]) == label]
            if own:
                out[f"acc_weighted/{label}"] = client_accuracy_stats(own)["acc_weighted"]
        return out

    def evaluate_global(self, state: ServerState, server_round: int) -> dict:
        if not self.algorithm.has_global_model or not self.global_tests:
            return {}
        model = personalize(self.bundle, self.algorithm, self.cfg, 0, {}, state, server_round)
        results = []
        for test in self.global_tests:  # each domain's test split over that domain's classes
            with model.classifying_over(test.classes), self.algorithm.global_view(model):
                results.append(evaluate(model, test.images, self.cfg.train.eval_batch_size, self.cfg.train))
        n = sum(r["examples"] for r in results)
        out = {"global_accuracy": sum(r["accuracy"] * r["examples"] for r in results) / n,
               "global_loss": sum(r["loss"] * r["examples"] for r in results) / n,
               "forward_seconds": sum(r["forward_seconds"] for r in results)}
        if len(self.global_tests) > 1:
            out.update({f"global_accuracy/{t.label}": r["accuracy"] for t, r in zip(self.global_tests, results)})
        return out

    def write_rejections(self, run_dir: Path) -> None:
        if self.rejections:
            (run_dir / "rejected_updates.json").write_text(json.dumps(
                [{"round": x.round, "client": x.client, "reason": x.reason} for x in self.rejections], indent=2))

    def summarize(self, client_rows: list[dict], round_rows: list[dict], state: ServerState | None = None) -> dict:
        last_round = max((row["round"] for row in client_rows), default=None)
        final = [row for row in client_rows if row["round"] == last_round]
        participations = sum(row.get("clients_answered", row["clients_sampled"]) for row in round_rows)
        up = sum(row["bytes_up"] for row in round_rows)
        down = sum(row["bytes_down"] for row in round_rows)
        params = sum(v.numel() for v in get_state(self.bundle.model).values())
        return {
            "algorithm": self.algorithm.name,
            "rounds": last_round,
            **(self.accuracy_stats(final) if final else {}),
            **(spread_over_clients(final) if final else {}),
            **best_round(client_rows),
            "per_client_accuracy": {row["client"]: row["accuracy"] for row in final},
            "global_accuracy": round_rows[-1].get("global_accuracy") if round_rows else None,
            **{k: v for k, v in (round_rows[-1] if round_rows else {}).items() if k.startswith("global_accuracy/")},
            "mb_up_per_client_round": up / participations / 1e6 if participations else 0.0,
            "mb_down_per_client_round": down / participations / 1e6 if participations else 0.0,
            "wall_seconds": sum(row["wall_seconds"] for row in round_rows),
            "trainable": params,
            "uploaded": self.max_upload_params,
            "rejected_updates": len(self.rejections),
            **(self.groups_against_domains(state) if state is not None else {}),
        }

    def groups_against_domains(self, state: ServerState) -> dict:
        """How the groups the method formed (FedLEASE's clusters) match the federation's true domains:
        the adjusted Rand index (1: the same partition, about 0: no better than chance) and the share
        of clients in their group's majority domain."""
        groups = self.algorithm.client_groups(state)
        if not groups or not self.domain_of:
            return {}
        from sklearn.metrics import adjusted_rand_score
        from sklearn.metrics.cluster import contingency_matrix

        clients = sorted(c for c in groups if c in self.domain_of)
        truth = [self.domain_of[c] for c in clients]
        found = [groups[c] for c in clients]
        majority = contingency_matrix(truth, found).max(axis=0).sum()  # each group's largest domain
        return {"groups_ari": float(adjusted_rand_score(truth, found)),
                "groups_purity": float(majority / len(clients)),
                "groups": {str(c): {"group": groups[c], "domain": self.domain_of[c]} for c in clients}}


def client_accuracy_stats(rows: list[dict]) -> dict:
    acc = np.array([row["accuracy"] for row in rows], dtype=float)
    n = np.array([row["n_test"] for row in rows], dtype=float)
    return {"acc_weighted": float((acc * n).sum() / n.sum()), "acc_mean": float(acc.mean()),
            "acc_std": float(acc.std())}


def spread_over_clients(rows: list[dict]) -> dict:
    """The worst client of a round and the 10th percentile over clients (linear interpolation):
    what a federation's least served members get, which a mean hides."""
    acc = np.array([row["accuracy"] for row in rows], dtype=float)
    worst = int(np.argmin(acc))
    return {"acc_worst": float(acc[worst]), "worst_client": int(rows[worst]["client"]),
            "acc_p10": float(np.percentile(acc, 10))}


def best_round(client_rows: list[dict]) -> dict:
    """The evaluated round with the highest weighted accuracy (the earliest of equals), among those
    that evaluated the same clients as the last round: with `train.eval_fraction` below 1 a
    sampled round's figure is over other clients and is not compared."""
    by_round: dict[int, list[dict]] = {}
    for row in client_rows:
        by_round.setdefault(int(row["round"]), []).append(row)
    if not by_round:
        return {}
    last = max(by_round)
    clients = sorted(row["client"] for row in by_round[last])
    comparable = {r: rows for r, rows in by_round.items() if sorted(row["client"] for row in rows) == clients}
    scores = {r: client_accuracy_stats(rows)["acc_weighted"] for r, rows in comparable.items()}
    best = max(sorted(scores), key=lambda r: scores[r])
    return {"acc_last": scores[last], "acc_best": scores[best], "best_round": best,
            "best_rounds_compared": len(scores)}
