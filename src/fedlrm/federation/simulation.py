"""The in-process runtime: the server and every client in one Python process.

Messages still cross as bytes (see `wire`), so what is counted and what a test can
inspect is exactly what a deployed client would send or receive.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fedlrm.adapters import get_state, reset_adapters
from fedlrm.algorithms import Algorithm, Upload, get_algorithm
from fedlrm.config import RunConfig, to_yaml
from fedlrm.data import FederatedData, load_federated_data
from fedlrm.errors import FedLRMError
from fedlrm.federation.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedlrm.federation.seeding import derive_seed, sample_clients
from fedlrm.federation.task import ModelBundle, build_model, client_round, evaluate, personalize, resolve_device
from fedlrm.federation.wire import decode, encode
from fedlrm.models import load_backbone


@dataclass
class Message:
    """One transfer between server and a client, as it crossed."""

    round: int
    client: int
    direction: str  # "down" (server to client) or "up"
    payload: bytes

    @property
    def keys(self) -> list[str]:
        return list(decode(self.payload))


@dataclass
class RunResult:
    run_dir: Path | None
    client_rows: list[dict]
    round_rows: list[dict]
    summary: dict
    global_state: dict
    client_states: dict
    messages: list[Message] = field(default_factory=list)


class Simulation:
    """Prepares everything that can fail on bad input first, then runs rounds."""

    def __init__(self, cfg: RunConfig, data: FederatedData | None = None, progress: bool = True):
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.cfg = cfg
        self.progress = progress
        self.algorithm: Algorithm = get_algorithm(cfg)
        backbone = load_backbone(cfg.model)
        self.data = data if data is not None else load_federated_data(cfg.data, backbone.preprocess, cfg.seed)
        self.bundle: ModelBundle = build_model(backbone, self.data.class_names, cfg, self.algorithm)
        self.bundle.model.to(resolve_device(cfg.train.device))
        self.num_clients = len(self.data.clients)
        self.max_upload_params = 0  # measured on the uploads that crossed

    # ------------------------------------------------------------------ state
    def initial_states(self) -> tuple[dict, dict[int, dict]]:
        """The server's first state and each client's first private weights, from seeds."""
        model, b = self.bundle.model, self.bundle
        reset_adapters(model, derive_seed(self.cfg.seed, "init", "global"))
        global_state = self.algorithm.init_server(get_state(model, b.shared_keys))
        clients = {}
        for c in range(self.num_clients):
            reset_adapters(model, derive_seed(self.cfg.seed, "init", "client", self.algorithm.private_init_key(c)))
            clients[c] = get_state(model, b.private_keys)
        return global_state, clients

    def trainable_parameters(self) -> dict[str, int]:
        """Adapter weights a client holds now, and the largest upload seen in the run."""
        params = sum(v.numel() for v in get_state(self.bundle.model).values())
        return {"trainable": params, "uploaded": self.max_upload_params}

    # ------------------------------------------------------------------ run
    def run(self, run_dir: Path | None = None, resume: bool = False,
            stop_after_round: int | None = None) -> RunResult:
        """Run (or continue) the federation; with a run_dir, checkpoint after every round.

        `stop_after_round` ends the run early as an interruption would (for tests)."""
        cfg, algo, b = self.cfg, self.algorithm, self.bundle
        global_state, clients = self.initial_states()
        client_rows: list[dict] = []
        round_rows: list[dict] = []
        start = 1 if algo.trains else 0
        last = cfg.train.rounds if algo.trains else 0
        if resume:
            ckpt = load_checkpoint(run_dir) if run_dir else None
            if ckpt is not None:
                global_state, clients = ckpt.global_state, ckpt.clients
                client_rows, round_rows = ckpt.client_rows, ckpt.round_rows
                start = ckpt.round + 1
        messages: list[Message] = []
        rounds = range(start, last + 1)
        bar = tqdm(rounds, desc=f"{algo.name} rounds", disable=not self.progress, unit="round")
        for r in bar:
            t0 = time.perf_counter()
            sampled = sample_clients(cfg.seed, r, self.num_clients, cfg.train.client_fraction) if r else []
            uploads, up_bytes, down_bytes, stats = [], {}, {}, {}
            for c in tqdm(sampled, desc=f"round {r} clients", leave=False, disable=not self.progress):
                message = encode(algo.message_for(c, global_state))
                result = client_round(b, algo, cfg, self.data.clients[c].train, clients[c], message, r, c)
                clients[c] = result.private
                messages += [Message(r, c, "down", message), Message(r, c, "up", result.upload)]
                uploaded = decode(result.upload)
                self.max_upload_params = max(self.max_upload_params, sum(v.numel() for v in uploaded.values()))
                uploads.append(Upload(c, uploaded, len(self.data.clients[c].train)))
                up_bytes[c], down_bytes[c], stats[c] = len(result.upload), len(message), result.stats
            if uploads:
                global_state = algo.aggregate(global_state, uploads)
            train_seconds = time.perf_counter() - t0
            evaluate_now = r == last or r % cfg.train.eval_every == 0
            rows = self._evaluate_clients(r, global_state, clients, stats, up_bytes, down_bytes) if evaluate_now else []
            client_rows += rows
            round_row = self._round_row(r, rows, up_bytes, down_bytes, train_seconds, time.perf_counter() - t0)
            if r == last:
                round_row.update(self._evaluate_global(global_state))
            round_rows.append(round_row)
            if rows:
                bar.set_postfix(acc=f"{round_row['acc_weighted']:.4f}")
            if run_dir is not None:
                save_checkpoint(run_dir, Checkpoint(r, global_state, clients, client_rows, round_rows))
            if stop_after_round is not None and r >= stop_after_round:
                break
        bar.close()
        summary = self.summarize(client_rows, round_rows)
        return RunResult(run_dir, client_rows, round_rows, summary, global_state, clients, messages)

    def _evaluate_clients(self, r, global_state, clients, stats, up_bytes, down_bytes) -> list[dict]:
        rows = []
        for c, split in enumerate(self.data.clients):
            t0 = time.perf_counter()
            model = personalize(self.bundle, self.algorithm, self.cfg, c, clients[c], global_state)
            result = evaluate(model, split.test, self.cfg.train.eval_batch_size, self.cfg.train)
            s = stats.get(c)
            rows.append({
                "round": r, "client": c, "sampled": c in stats,
                "accuracy": result["accuracy"], "loss": result["loss"],
                "n_test": result["examples"], "n_train": len(split.train),
                "train_loss": s.loss if s else None, "train_seconds": s.seconds if s else 0.0,
                "bytes_up": up_bytes.get(c, 0), "bytes_down": down_bytes.get(c, 0),
                "eval_seconds": time.perf_counter() - t0,
            })
        return rows

    def _round_row(self, r, rows, up_bytes, down_bytes, train_seconds, wall_seconds) -> dict:
        row = {"round": r, "clients_sampled": len(up_bytes), "bytes_up": sum(up_bytes.values()),
               "bytes_down": sum(down_bytes.values()), "train_seconds": train_seconds,
               "wall_seconds": wall_seconds}
        if rows:
            row.update(client_accuracy_stats(rows))
        return row

    def _evaluate_global(self, global_state) -> dict:
        if not self.algorithm.has_global_model:
            return {}
        model = personalize(self.bundle, self.algorithm, self.cfg, 0, {}, global_state)
        with self.algorithm.global_view(model):
            result = evaluate(model, self.data.global_test, self.cfg.train.eval_batch_size, self.cfg.train)
        return {"global_accuracy": result["accuracy"], "global_loss": result["loss"]}

    def summarize(self, client_rows: list[dict], round_rows: list[dict]) -> dict:
        last_round = max((row["round"] for row in client_rows), default=None)
        final = [row for row in client_rows if row["round"] == last_round]
        participations = sum(row["clients_sampled"] for row in round_rows)
        up = sum(row["bytes_up"] for row in round_rows)
        down = sum(row["bytes_down"] for row in round_rows)
        summary = {
            "algorithm": self.algorithm.name,
            "rounds": last_round,
            **(client_accuracy_stats(final) if final else {}),
            "per_client_accuracy": {row["client"]: row["accuracy"] for row in final},
            "global_accuracy": round_rows[-1].get("global_accuracy") if round_rows else None,
            "mb_up_per_client_round": up / participations / 1e6 if participations else 0.0,
            "mb_down_per_client_round": down / participations / 1e6 if participations else 0.0,
            "wall_seconds": sum(row["wall_seconds"] for row in round_rows),
            **self.trainable_parameters(),
        }
        return summary


def client_accuracy_stats(rows: list[dict]) -> dict:
    acc = np.array([row["accuracy"] for row in rows], dtype=float)
    n = np.array([row["n_test"] for row in rows], dtype=float)
    return {"acc_weighted": float((acc * n).sum() / n.sum()), "acc_mean": float(acc.mean()),
            "acc_std": float(acc.std())}


def new_run_dir(cfg: RunConfig, suffix: str = "") -> Path:
    """A fresh, empty run directory under cfg.output_dir."""
    name = cfg.name or f"{cfg.algorithm}-{datetime.now():%Y%m%d-%H%M%S}"
    path = Path(cfg.output_dir).expanduser() / (name + suffix)
    if path.exists() and any(path.iterdir()):
        raise FedLRMError(f"run directory {path} exists and is not empty; choose another name= or "
                          f"continue it with `fedlrm run --resume {path}`")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
