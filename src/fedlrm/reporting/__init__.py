"""What a run leaves for a person to read: CSV metrics, tables and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib
import numpy as np

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
    ("acc_worst", "worst client %", "{:.2f}"),
    ("acc_p10", "p10 over clients %", "{:.2f}"),
    # the held-out clients (data.new_clients), adapted after the run from its final server state
    ("new_acc_weighted", "new clients %", "{:.2f}"),
    ("acc_best", "best round %", "{:.2f}"),
    ("best_round", "best round", "{}"),
    ("global_accuracy", "global model %", "{:.2f}"),
    ("mb_up_per_client_round", "MB up/client/round", "{:.4f}"),
    ("trainable", "trainable params", "{:,}"),
    ("wall_seconds", "wall s", "{:.1f}"),
]
PERCENT = {"acc_weighted", "acc_mean", "acc_std", "acc_worst", "acc_p10", "acc_best", "global_accuracy",
           "new_acc_weighted"}


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


#: per-domain columns of a multi-domain federation, each placed after the column of its overall figure
_BY_DOMAIN = {"acc_weighted/": ("acc_mean", "acc {} %"), "global_accuracy/": ("global_accuracy", "global model {} %")}


def compare_columns(summaries: list[dict]) -> list[tuple[str, str, str]]:
    """COMPARE_COLUMNS, with a column per domain (`acc_weighted/<domain>`, `global_accuracy/<domain>`)
    and the agreement of a method's client groups with the domains where the summaries have them."""
    columns = list(COMPARE_COLUMNS)
    keys = list(dict.fromkeys(k for s in summaries for k in s))
    for prefix, (after, title) in _BY_DOMAIN.items():
        own = [k for k in keys if k.startswith(prefix)]
        at = next((i for i, c in enumerate(columns) if c[0] == after), len(columns) - 1) + 1
        columns[at:at] = [(k, title.format(k[len(prefix):]), "{:.2f}") for k in own]
    if "groups_ari" in keys:
        at = next(i for i, c in enumerate(columns) if c[0] == "mb_up_per_client_round")
        columns[at:at] = [("groups_ari", "clusters vs domains (ARI)", "{:.2f}")]
    return columns


def _percent(key: str) -> bool:
    return key in PERCENT or key.startswith(tuple(_BY_DOMAIN))


def format_row(summary: dict, columns: list[tuple[str, str, str]] | None = None) -> list[str]:
    cells = []
    for key, _, fmt in columns or COMPARE_COLUMNS:
        value = summary.get(key)
        if value is None:
            cells.append("-")
        else:
            cells.append(fmt.format(value * 100 if _percent(key) else value))
    return cells


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def _print(head: list[str], rows: list[list[str]], title: str, console: Console | None) -> None:
    table = Table(title=title)
    for i, name in enumerate(head):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for cells in rows:
        table.add_row(*cells)
    (console or wide_console()).print(table)


def markdown_table(summaries: list[dict]) -> str:
    columns = compare_columns(summaries)
    return _markdown([title for _, title, _ in columns], [format_row(s, columns) for s in summaries])


def print_table(summaries: list[dict], title: str, console: Console | None = None) -> None:
    columns = compare_columns(summaries)
    _print([title for _, title, _ in columns], [format_row(s, columns) for s in summaries], title, console)


#: what the table over seeds shows of each method, as mean ± std (per-domain figures join them)
SEED_COLUMNS = [
    ("acc_weighted", "acc (weighted) %", "{:.2f}"),
    ("acc_std", "std over clients", "{:.2f}"),
    ("acc_worst", "worst client %", "{:.2f}"),
    ("new_acc_weighted", "new clients %", "{:.2f}"),
    ("global_accuracy", "global model %", "{:.2f}"),
    ("mb_up_per_client_round", "MB up/client/round", "{:.4f}"),
    ("wall_seconds", "wall s", "{:.1f}"),
]


def over_seeds(per_seed: dict[int, list[dict]]) -> list[dict]:
    """Each method's figures over the seeds of a compare: `<key>/mean`, `<key>/std` (sample standard
    deviation; 0 for one seed) and the weighted accuracy of each seed, `acc_weighted/seed-<s>`.
    A figure a seed does not have (no global model) is left out of its mean."""
    methods = list(dict.fromkeys(s["method"] for summaries in per_seed.values() for s in summaries))
    shown = {key for key, _, _ in SEED_COLUMNS} | {"groups_ari"}
    keys = [k for k, _, _ in compare_columns([s for summaries in per_seed.values() for s in summaries])
            if k in shown or k.startswith(tuple(_BY_DOMAIN))]
    rows = []
    for method in methods:
        runs = {seed: next(s for s in summaries if s["method"] == method) for seed, summaries in per_seed.items()
                if any(s["method"] == method for s in summaries)}
        row: dict = {"method": method, "seeds": len(runs)}
        for key in keys:
            values = [float(r[key]) for r in runs.values() if r.get(key) is not None]
            if values:
                row[f"{key}/mean"] = float(np.mean(values))
                row[f"{key}/std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        for seed, run in runs.items():
            row[f"acc_weighted/seed-{seed}"] = run.get("acc_weighted")
        rows.append(row)
    return rows


def _seed_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """The compare table's (key, title, format) of each figure the rows hold a mean of, in their order."""
    means = [k[:-len("/mean")] for k in dict.fromkeys(k for r in rows for k in r) if k.endswith("/mean")]
    titles = {key: (key, title, fmt) for key, title, fmt in compare_columns([dict.fromkeys(means, 0)])}
    return [titles[k] for k in means if k in titles]


def _seed_cells(row: dict, columns: list[tuple[str, str, str]], seed_keys: list[str]) -> list[str]:
    cells = [row["method"]]
    for key, _, fmt in columns:
        mean = row.get(f"{key}/mean")
        scale = 100 if _percent(key) else 1
        cells.append("-" if mean is None else f"{fmt.format(mean * scale)} ± {fmt.format(row[f'{key}/std'] * scale)}")
    cells += ["-" if row.get(k) is None else f"{100 * row[k]:.2f}" for k in seed_keys]
    return cells


def _seed_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The head and cells of the table over seeds: mean ± std of each figure, then each seed's accuracy."""
    columns = _seed_columns(rows)
    seed_keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith("acc_weighted/seed-")))
    head = ["method"] + [title for _, title, _ in columns] + [f"seed {k.rsplit('-', 1)[1]} %" for k in seed_keys]
    return head, [_seed_cells(r, columns, seed_keys) for r in rows]


def seeds_markdown(rows: list[dict]) -> str:
    return _markdown(*_seed_table(rows))


def print_seed_table(rows: list[dict], title: str, console: Console | None = None) -> None:
    _print(*_seed_table(rows), title, console)


def wide_console() -> Console:
    """Rich falls back to 80 columns when output is not a terminal; tables need more."""
    import shutil

    return Console(width=max(220, shutil.get_terminal_size().columns))


def _round_axis(ax, rounds: list[int]) -> None:
    """Integer round ticks: every round when there are few (MaxNLocator alone gives fractional
    ticks around a single point)."""
    rounds = sorted(set(rounds))
    if len(rounds) <= 12:
        ax.set_xticks(rounds)
        ax.set_xlim(rounds[0] - 0.5, rounds[-1] + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _percent_axis(ax, values: list[float]) -> None:
    """A y range in % that holds the data with some room, at least 10 points tall, within 0-100."""
    lo, hi = min(values), max(values)
    lo, hi = max(0.0, lo - 5), min(100.0, hi + 5)
    if hi - lo < 10:
        mid = (hi + lo) / 2
        lo, hi = max(0.0, mid - 5), min(100.0, mid + 5)
        lo, hi = (0.0, 10.0) if hi <= 10 else (90.0, 100.0) if lo >= 90 else (lo, hi)
    _pad_ylim(ax, lo, hi)


def _pad_ylim(ax, lo: float, hi: float) -> None:
    """A little room past the range, so that a marker at exactly 0 or 100 % is not cut in half."""
    pad = 0.03 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)


def _legend_outside(ax, **kwargs):
    """The legend right of the axes, where it covers no data (the figure is saved with
    bbox_inches="tight", so it grows to hold it)."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8, **kwargs)


def _bar_labels(ax, bars, values: list[float], tops: list[float]) -> None:
    for bar, v, top in zip(bars, values, tops):  # above the bar (and its error bar), crossing nothing
        ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, top), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=9)


def _percent_bars_axis(ax, tops: list[float]) -> None:
    """0-100 %, with headroom for the labels above the tallest bar or error bar."""
    ax.set_ylim(0, max([100.0, *tops]) + 10)
    ax.set_yticks(range(0, 101, 20))


def accuracy_figure(round_rows: list[dict], title: str, references: dict[str, float] | None = None):
    """Mean client accuracy per round (weighted and unweighted, ± std band), the final global
    model and `references` (name -> accuracy in [0, 1], e.g. zero-shot) as dashed levels.
    A run evaluated only at round 0 (zero-shot) gets bars on a 0-100 % scale. None: nothing evaluated."""
    evaluated = [r for r in round_rows if "acc_weighted" in r]
    if not evaluated:
        return None
    final = evaluated[-1]
    fig, ax = plt.subplots(figsize=(7, 4))
    if [r["round"] for r in evaluated] == [0]:  # no training: one evaluation, shown as levels
        names = ["weighted by\ntest size", "unweighted\nmean"]
        values = [100 * final["acc_weighted"], 100 * final["acc_mean"]]
        errors = [0.0, 100 * final["acc_std"]]
        if final.get("global_accuracy") is not None:
            names.append("global\ntest set")
            values.append(100 * final["global_accuracy"])
            errors.append(0.0)
        bars = ax.bar(names, values, color=["tab:blue", "tab:orange", "tab:gray"][:len(names)], alpha=0.85)
        # the spread over clients belongs to the unweighted mean only
        ax.errorbar([1], values[1:2], yerr=errors[1:2], fmt="none", capsize=4, ecolor="black",
                    label="± std over clients")
        tops = [v + e for v, e in zip(values, errors)]
        _bar_labels(ax, bars, values, tops)
        _percent_bars_axis(ax, tops)
        ax.set(ylabel="accuracy (%)", title=f"{title}: round 0 (no training)")
        ax.grid(axis="y", alpha=0.3)
        _legend_outside(ax)
        return fig
    xs = [r["round"] for r in evaluated]
    weighted = [100 * r["acc_weighted"] for r in evaluated]
    mean = np.array([100 * r["acc_mean"] for r in evaluated])
    std = np.array([100 * r["acc_std"] for r in evaluated])
    if len(xs) > 1:
        ax.fill_between(xs, mean - std, mean + std, color="tab:orange", alpha=0.12, linewidth=0,
                        label="unweighted ± std over clients")
    else:  # a band around one point has no width
        ax.errorbar(xs, mean, yerr=std, fmt="none", capsize=4, ecolor="tab:orange",
                    label="unweighted ± std over clients")
    ax.plot(xs, weighted, marker="o", color="tab:blue", label="weighted by test size")
    # hollow squares on a dashed line stay visible where the two curves coincide
    ax.plot(xs, mean, marker="s", markerfacecolor="none", markersize=8, linestyle="--", color="tab:orange",
            label="unweighted mean")
    shown = weighted + list(np.clip(mean - std, 0, 100)) + list(np.clip(mean + std, 0, 100))
    levels = dict(references or {})
    if final.get("global_accuracy") is not None:
        levels[f"global model, round {final['round']}"] = final["global_accuracy"]
    for (name, value), style in zip(levels.items(), ["--", ":", "-."] * len(levels)):
        ax.axhline(100 * value, color="gray", linestyle=style, label=f"{name}: {100 * value:.1f} %")
        shown.append(100 * value)
    ax.set(xlabel="round", ylabel="mean client accuracy (%)", title=title)
    _round_axis(ax, xs)
    if len(xs) == 1:
        _pad_ylim(ax, 0, 100)  # one point: the whole scale says more than a zoom on it
    else:
        _percent_axis(ax, shown)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def client_figure(client_rows: list[dict], title: str):
    """Each client's test accuracy per round (legend outside the axes), or, for a run evaluated
    once, a bar per client. None: nothing evaluated."""
    if not client_rows:
        return None
    clients = sorted({r["client"] for r in client_rows})
    rounds = sorted({r["round"] for r in client_rows})
    if len(rounds) == 1:
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(clients) + 2), 4))
        by_client = {r["client"]: 100 * r["accuracy"] for r in client_rows}
        values = [by_client[c] for c in clients]
        bars = ax.bar(clients, values, color="tab:blue", alpha=0.85)
        if len(clients) <= 30:  # more labels than that overlap each other
            _bar_labels(ax, bars, values, values)
        _percent_bars_axis(ax, values)
        ax.set_xticks(clients)
        ax.set(xlabel="client", ylabel="client test accuracy (%)", title=f"{title}: per client, round {rounds[0]}")
        ax.grid(axis="y", alpha=0.3)
        return fig
    fig, ax = plt.subplots(figsize=(7, 4))
    values = []
    for c in clients:
        mine = [r for r in client_rows if r["client"] == c]
        ys = [100 * r["accuracy"] for r in mine]
        values += ys
        ax.plot([r["round"] for r in mine], ys, marker=".", label=f"client {c}")
    ax.set(xlabel="round", ylabel="client test accuracy (%)", title=f"{title}: per client")
    _round_axis(ax, rounds)
    _percent_axis(ax, values)
    ax.grid(alpha=0.3)
    _legend_outside(ax, ncol=1 + (len(clients) - 1) // 20)
    return fig


def compare_figure(summaries: list[dict], title: str):
    """Each method's final weighted accuracy, its std over clients as a named error bar, the
    value above the error bar, and zero-shot (when compared) as a dashed level."""
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(summaries)), 4.5))
    names = [s["method"] for s in summaries]
    values = [100 * (s.get("acc_weighted") or 0.0) for s in summaries]
    errors = [100 * (s.get("acc_std") or 0.0) for s in summaries]
    bars = ax.bar(names, values, yerr=errors, capsize=4, color="tab:blue", alpha=0.8,
                  error_kw={"label": "± std over clients", "ecolor": "black"})
    tops = [v + e for v, e in zip(values, errors)]
    _bar_labels(ax, bars, values, tops)
    zeroshot = next((v for s, v in zip(summaries, values) if s["method"] == "zeroshot"), None)
    if zeroshot is not None:
        ax.axhline(zeroshot, color="gray", linestyle="--", label=f"zero-shot: {zeroshot:.1f} %")
    ax.set(ylabel="mean client accuracy (%), weighted", title=title)
    _percent_bars_axis(ax, tops)
    ax.grid(axis="y", alpha=0.3)
    if len(names) > 6:
        ax.tick_params(axis="x", labelrotation=30)
    _legend_outside(ax)
    return fig


def compare_rounds_figure(runs: dict[str, list[dict]], title: str):
    """Weighted accuracy per round of every compared method that trains (method -> its round
    rows); zero-shot, evaluated once, as a dashed level. None: no method has two evaluations."""
    curves = {m: [r for r in rows if "acc_weighted" in r] for m, rows in runs.items()}
    levels = {m: rows[-1]["acc_weighted"] for m, rows in curves.items() if len(rows) == 1}
    curves = {m: rows for m, rows in curves.items() if len(rows) > 1}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    markers = "osD^vP*Xh<>"
    shown = []
    for i, (method, rows) in enumerate(curves.items()):
        ys = [100 * r["acc_weighted"] for r in rows]
        shown += ys
        ax.plot([r["round"] for r in rows], ys, marker=markers[i % len(markers)], markersize=4, label=method)
    for method, value in levels.items():
        ax.axhline(100 * value, color="gray", linestyle="--", label=f"{method} (round {runs[method][-1]['round']}): "
                                                                      f"{100 * value:.1f} %")
        shown.append(100 * value)
    ax.set(xlabel="round", ylabel="mean client accuracy (%), weighted", title=title)
    _round_axis(ax, [r["round"] for rows in curves.values() for r in rows])
    _percent_axis(ax, shown)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return fig


def save_figure(fig, path: Path) -> None:
    if fig is None:
        return
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight" keeps a legend outside the axes in the file
    plt.close(fig)


def plot_run(run_dir: Path, client_rows: list[dict], round_rows: list[dict], title: str,
             references: dict[str, float] | None = None) -> None:
    save_figure(accuracy_figure(round_rows, title, references), run_dir / "accuracy_per_round.png")
    save_figure(client_figure(client_rows, title), run_dir / "client_accuracy.png")


def plot_compare(path: Path, summaries: list[dict], title: str) -> None:
    save_figure(compare_figure(summaries, title), path)


def plot_compare_rounds(out: Path, runs: dict[str, tuple[list[dict], list[dict]]], title: str) -> None:
    """out/compare_rounds.png, every method per round; with zero-shot among the methods
    (method -> (client rows, round rows)), each trained run's accuracy_per_round.png is redrawn
    with the zero-shot accuracy as its baseline."""
    save_figure(compare_rounds_figure({m: rounds for m, (_, rounds) in runs.items()}, title),
                out / "compare_rounds.png")
    zeroshot = [r for r in runs.get("zeroshot", ([], []))[1] if "acc_weighted" in r]
    if not zeroshot:
        return
    for method, (client_rows, round_rows) in runs.items():
        if method != "zeroshot" and (out / method).is_dir():
            save_figure(accuracy_figure(round_rows, method, {"zero-shot": zeroshot[-1]["acc_weighted"]}),
                        out / method / "accuracy_per_round.png")


def write_run_report(run_dir: Path, result, method: str, new_clients: list[dict] | None = None) -> None:
    """metrics.csv, rounds.csv, summary.json and .md, and the plots; `new_clients`: the rows of the
    clients held out of training and adapted after it, listed in summary.md after the others."""
    write_csv(run_dir / "metrics.csv", result.client_rows)
    write_csv(run_dir / "rounds.csv", result.round_rows)
    summary = {"method": method, **result.summary}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    newcomers = ""
    if new_clients:
        epochs = max(row["epochs"] for row in new_clients)
        newcomers = ("\n## New clients\n\nHeld out of training; each adapted from the final server state"
                     + (f" for {epochs} local epoch(s)" if epochs else " (nothing to train)") + ", then evaluated.\n\n"
                     + per_client_markdown({row["client"]: row["accuracy"] for row in new_clients}))
    (run_dir / "summary.md").write_text(f"# {method}\n\n" + markdown_table([summary]) + "\n"
                                        + per_client_markdown(result.summary["per_client_accuracy"]) + newcomers)
    plot_run(run_dir, result.client_rows, result.round_rows, method)


def per_client_markdown(per_client: dict) -> str:
    lines = ["| client | accuracy % |", "|---|---|"]
    lines += [f"| {c} | {100 * a:.2f} |" for c, a in sorted(per_client.items(), key=lambda kv: int(kv[0]))]
    return "\n".join(lines) + "\n"
