"""What a run leaves for a person to read: CSV metrics, tables and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

COMPARE_COLUMNS = [
    ("method", "method", "{}"),
    ("acc_weighted", "acc (weighted) %", "{:.2f}"),
    ("acc_mean", "acc (mean) %", "{:.2f}"),
    ("acc_std", "std over clients", "{:.2f}"),
    ("global_accuracy", "global model %", "{:.2f}"),
    ("mb_up_per_client_round", "MB up/client/round", "{:.4f}"),
    ("trainable", "trainable params", "{:,}"),
    ("wall_seconds", "wall s", "{:.1f}"),
]
PERCENT = {"acc_weighted", "acc_mean", "acc_std", "global_accuracy"}


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def format_row(summary: dict) -> list[str]:
    cells = []
    for key, _, fmt in COMPARE_COLUMNS:
        value = summary.get(key)
        if value is None:
            cells.append("-")
        else:
            cells.append(fmt.format(value * 100 if key in PERCENT else value))
    return cells


def markdown_table(summaries: list[dict]) -> str:
    head = [title for _, title, _ in COMPARE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(format_row(s)) + " |" for s in summaries]
    return "\n".join(lines) + "\n"


def print_table(summaries: list[dict], title: str, console: Console | None = None) -> None:
    table = Table(title=title)
    for i, (_, name, _) in enumerate(COMPARE_COLUMNS):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for s in summaries:
        table.add_row(*format_row(s))
    (console or wide_console()).print(table)


def wide_console() -> Console:
    """Rich falls back to 80 columns when output is not a terminal; tables need more."""
    import shutil

    return Console(width=max(160, shutil.get_terminal_size().columns))


def plot_run(run_dir: Path, client_rows: list[dict], round_rows: list[dict], title: str) -> None:
    evaluated = [r for r in round_rows if "acc_weighted" in r]
    if not evaluated:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["round"] for r in evaluated]
    ax.plot(xs, [100 * r["acc_weighted"] for r in evaluated], marker="o", label="weighted by test size")
    ax.plot(xs, [100 * r["acc_mean"] for r in evaluated], marker=".", linestyle="--", label="unweighted")
    ax.set(xlabel="round", ylabel="mean client accuracy (%)", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "accuracy_per_round.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for c in sorted({r["client"] for r in client_rows}):
        mine = [r for r in client_rows if r["client"] == c]
        ax.plot([r["round"] for r in mine], [100 * r["accuracy"] for r in mine], marker=".", label=f"client {c}")
    ax.set(xlabel="round", ylabel="client test accuracy (%)", title=f"{title}: per client")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(run_dir / "client_accuracy.png", dpi=120)
    plt.close(fig)


def plot_compare(path: Path, summaries: list[dict], title: str) -> None:
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(summaries)), 4))
    names = [s["method"] for s in summaries]
    values = [100 * s.get("acc_weighted", 0.0) for s in summaries]
    errors = [100 * s.get("acc_std", 0.0) for s in summaries]
    bars = ax.bar(names, values, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    for bar, v in zip(bars, values):  # inside the bar, clear of the error bar above it
        ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v / 2), ha="center", va="center",
                    fontsize=9, color="white", fontweight="bold")
    ax.set(ylabel="mean client accuracy (%), weighted", title=title)
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_run_report(run_dir: Path, result, method: str) -> None:
    write_csv(run_dir / "metrics.csv", result.client_rows)
    write_csv(run_dir / "rounds.csv", result.round_rows)
    summary = {"method": method, **result.summary}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "summary.md").write_text(f"# {method}\n\n" + markdown_table([summary]) + "\n"
                                        + per_client_markdown(result.summary["per_client_accuracy"]))
    plot_run(run_dir, result.client_rows, result.round_rows, method)


def per_client_markdown(per_client: dict) -> str:
    lines = ["| client | accuracy % |", "|---|---|"]
    lines += [f"| {c} | {100 * a:.2f} |" for c, a in sorted(per_client.items(), key=lambda kv: int(kv[0]))]
    return "\n".join(lines) + "\n"
