"""What a person watches while a run goes: one log line per round, TensorBoard scalars.

The round loop calls a `RoundReporter` after every round; it knows rows (the dicts that
become rounds.csv and metrics.csv), not algorithms.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("fedlrm.rounds")

#: per-round columns drawn in TensorBoard (rounds.csv names), under the tag `round/<name>`
ROUND_SCALARS = ("acc_weighted", "acc_mean", "acc_std", "global_accuracy", "global_loss", "clients_answered",
                 "clients_rejected", "bytes_up", "bytes_down", "train_seconds", "wall_seconds")
#: per-client columns (metrics.csv names), under `client/<NN>/<name>`
CLIENT_SCALARS = ("accuracy", "loss", "train_loss")


def round_line(row: dict, last_round: int, method: str) -> str:
    """E.g. `fedlrm round 3/20: 10/10 clients answered, 0 rejected, accuracy 61.20 % (weighted; ...), 12.3 s`."""
    parts = [f"{method} round {row['round']}/{last_round}:"]
    if row["round"] == 0:
        parts.append("no training;")
    else:
        parts.append(f"{row.get('clients_answered', 0)}/{row['clients_sampled']} clients answered, "
                     f"{row.get('clients_rejected', 0)} rejected,")
    if "acc_weighted" not in row:
        parts.append("not evaluated this round,")
    else:
        parts.append(f"accuracy {100 * row['acc_weighted']:.2f} % (weighted; unweighted {100 * row['acc_mean']:.2f} "
                     f"± {100 * row['acc_std']:.2f} over clients),")
        per_domain = [f"{k.partition('/')[2]} {100 * v:.2f} %" for k, v in row.items() if k.startswith("acc_weighted/")]
        if per_domain:
            parts.append(f"by domain: {', '.join(per_domain)},")
    if row.get("global_accuracy") is not None:
        parts.append(f"global model {100 * row['global_accuracy']:.2f} %,")
    parts.append(f"{row['wall_seconds']:.1f} s")
    return " ".join(parts)


class TqdmHandler(logging.Handler):
    """Log records on stderr through `tqdm.write`, which clears and redraws any progress bar
    around the line instead of tearing it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
            tqdm.write(prefix + self.format(record), file=sys.stderr)  # sys.stderr now, not at import
        except Exception:
            self.handleError(record)


def show_log_lines(level: int = logging.INFO) -> None:
    """Print fedlrm's log lines (a line per round, compare's progress, warnings); the CLI
    calls this. Once per process: a second call adds no second handler."""
    logger = logging.getLogger("fedlrm")
    if not any(isinstance(h, TqdmHandler) for h in logger.handlers):
        logger.addHandler(TqdmHandler())
    logger.setLevel(level)


class RoundReporter:
    """Logs a line per round and, with a folder, writes TensorBoard event files there.

    `start_round`: the first round this process reports (after a resume, events from a
    crashed attempt at or beyond it are purged, so a resumed run has each step once)."""

    def __init__(self, method: str, last_round: int, tensorboard_dir: Path | None = None, start_round: int = 0):
        self.method, self.last_round = method, last_round
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir), purge_step=start_round if start_round > 1 else None)

    def round_done(self, row: dict, client_rows: list[dict]) -> None:
        log.info(round_line(row, self.last_round, self.method))
        if self.writer is None:
            return
        step = row["round"]
        by_domain = [k for k in row if k.startswith(("acc_weighted/", "global_accuracy/"))]
        for key in (*ROUND_SCALARS, *by_domain):
            if row.get(key) is not None:
                self.writer.add_scalar(f"round/{key}", float(row[key]), step)
        for client in client_rows:
            for key in CLIENT_SCALARS:
                if client.get(key) is not None:
                    self.writer.add_scalar(f"client/{client['client']:02d}/{key}", float(client[key]), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
