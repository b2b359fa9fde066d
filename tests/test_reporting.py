"""What a person sees: a line per round, TensorBoard event files, and plots that show the data."""

import csv
import importlib.util
import logging
import re

import matplotlib
import pytest

from fedlrm.algorithms import load_config
from fedlrm.cli import main
from fedlrm.errors import ConfigError
from fedlrm.experiment import resume_experiment, run_experiment
from fedlrm.reporting import accuracy_figure, client_figure, compare_figure, compare_rounds_figure
from fedlrm.reporting.tracking import TqdmHandler

matplotlib.use("Agg")


def round_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "fedlrm.rounds"]


# ---------------------------------------------------------------- a line per round
@pytest.mark.parametrize("progress", [False, True])
def test_a_line_per_round_with_and_without_progress_bars(tiny_overrides, caplog, progress):
    cfg = load_config(None, tiny_overrides + ["algorithm=fedavg", "train.rounds=2"])
    with caplog.at_level(logging.INFO, logger="fedlrm"):
        result = run_experiment(cfg, progress=progress)
    lines = round_lines(caplog)
    assert [line.split(":")[0] for line in lines] == ["fedavg round 1/2", "fedavg round 2/2"]
    final = result.round_rows[-1]
    assert "3/3 clients answered, 0 rejected" in lines[-1]
    assert f"accuracy {100 * final['acc_weighted']:.2f} % (weighted" in lines[-1]
    assert f"global model {100 * final['global_accuracy']:.2f} %" in lines[-1]


def test_zero_shot_prints_its_round_zero_line(tiny_overrides, caplog):
    cfg = load_config(None, tiny_overrides + ["algorithm=zeroshot"])
    with caplog.at_level(logging.INFO, logger="fedlrm"):
        result = run_experiment(cfg, progress=False)
    lines = round_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith("zeroshot round 0/0: no training;")
    assert f"{100 * result.round_rows[0]['acc_weighted']:.2f} %" in lines[0]


def test_cli_prints_round_and_method_lines_without_progress(capsys, tiny_overrides, cli_logging):
    code = main(["compare", "--no-progress", "--algorithms", "zeroshot,fedavg", *tiny_overrides,
                 "train.rounds=2", "name=cmp"])
    _, err = capsys.readouterr()
    assert code == 0
    lines = [line for line in err.splitlines() if re.match(r"(\[\d+/\d+\] |\w+ round \d+/)", line)]
    assert [line.split(":")[0] for line in lines] == [
        "[1/2] zeroshot", "zeroshot round 0/0", "[1/2] zeroshot",
        "[2/2] fedavg", "fedavg round 1/2", "fedavg round 2/2", "[2/2] fedavg"]
    assert "started" in lines[3] and "accuracy" in lines[-1] and lines[-1].endswith(" s")


def test_log_lines_go_through_tqdm_write_and_keep_warnings_marked(capsys, monkeypatch):
    from tqdm.auto import tqdm

    written = []
    monkeypatch.setattr(tqdm, "write", lambda s, file=None, **kw: written.append((s, file)))
    logger = logging.getLogger("fedlrm.test-handler")
    handler = TqdmHandler()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("client %d did not answer", 2)
        logger.error("bad")
    finally:
        logger.removeHandler(handler)
    import sys

    assert written == [("warning: client 2 did not answer", sys.stderr), ("error: bad", sys.stderr)]


# ---------------------------------------------------------------- TensorBoard
def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def assert_matches_csvs(run_dir, written, rounds):
    for row in read_csv(run_dir / "rounds.csv"):
        step = int(row["round"])
        for key in ("acc_weighted", "acc_mean", "acc_std", "bytes_up", "bytes_down", "clients_rejected",
                    "wall_seconds"):
            assert dict(written[f"round/{key}"])[step] == pytest.approx(float(row[key]), rel=1e-5, abs=1e-6)
    for key in ("acc_weighted", "bytes_up", "wall_seconds"):
        assert [s for s, _ in written[f"round/{key}"]] == rounds, key  # one value per round, in order
    for row in read_csv(run_dir / "metrics.csv"):
        tag = f"client/{int(row['client']):02d}"
        for key in ("accuracy", "loss", "train_loss"):
            if row[key]:
                assert dict(written[f"{tag}/{key}"])[int(row["round"])] == pytest.approx(float(row[key]), rel=1e-5)


def test_tensorboard_event_files_hold_the_csv_values(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["algorithm=fedlrm", "train.rounds=2", "report.tensorboard=true"])
    result = run_experiment(cfg, progress=False)
    written = scalars(result.run_dir / "tensorboard")
    for tag in ("round/acc_weighted", "round/acc_mean", "round/acc_std", "round/global_accuracy", "round/global_loss",
                "round/bytes_up", "round/bytes_down", "round/clients_rejected", "round/wall_seconds",
                "client/00/accuracy", "client/02/loss", "client/01/train_loss"):
        assert tag in written, tag
    assert [s for s, _ in written["round/global_accuracy"]] == [2]  # the global model is evaluated at the end
    assert_matches_csvs(result.run_dir, written, [1, 2])


def test_no_tensorboard_folder_unless_asked(tiny_overrides):
    result = run_experiment(load_config(None, tiny_overrides + ["algorithm=fedavg", "train.rounds=1"]),
                            progress=False)
    assert not (result.run_dir / "tensorboard").exists()


def test_resumed_run_appends_each_round_once(tiny_overrides):
    from torch.utils.tensorboard import SummaryWriter

    cfg = load_config(None, tiny_overrides + ["algorithm=fedavg", "train.rounds=3", "report.tensorboard=true"])
    first = run_experiment(cfg, progress=False, stop_after_round=1)
    folder = first.run_dir / "tensorboard"
    # an attempt that logged round 2 and died before its checkpoint: the resumed run must hide it
    stray = SummaryWriter(str(folder))
    stray.add_scalar("round/acc_weighted", 0.123, 2)
    stray.close()
    resume_experiment(first.run_dir, progress=False)
    written = scalars(folder)
    assert_matches_csvs(first.run_dir, written, [1, 2, 3])


def test_tensorboard_missing_is_a_config_error_before_any_run_directory(capsys, tiny_overrides, tmp_path,
                                                                       monkeypatch, cli_logging):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'fedlrm\[tensorboard\]'"):
        load_config(None, tiny_overrides + ["report.tensorboard=true"])
    code = main(["run", "--no-progress", *tiny_overrides, "report.tensorboard=true"])
    assert code == 2 and "report.tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    load_config(None, tiny_overrides)  # off, it needs nothing


# ---------------------------------------------------------------- plots
def round_rows(rounds, acc=0.6, step=0.01, clients=3, global_acc=0.5):
    rows = []
    for r in rounds:
        rows.append({"round": r, "clients_sampled": clients if r else 0, "clients_answered": clients if r else 0,
                     "clients_rejected": 0, "bytes_up": 1, "bytes_down": 1, "train_seconds": 0.1,
                     "acc_weighted": acc + step * r, "acc_mean": acc + step * r, "acc_std": 0.05,
                     "wall_seconds": 0.2})
    rows[-1].update(global_accuracy=global_acc, global_loss=1.0)
    return rows


def client_rows(rounds, clients):
    return [{"round": r, "client": c, "accuracy": 0.3 + 0.1 * c + 0.01 * r, "loss": 1.0, "n_test": 10}
            for r in rounds for c in range(clients)]


def drawn(fig):
    fig.canvas.draw()
    return fig.axes[0], fig.canvas.get_renderer()


def test_per_client_legend_covers_no_data():
    fig = client_figure(client_rows(range(1, 6), 25), "fedavg")
    ax, renderer = drawn(fig)
    legend = ax.get_legend()
    assert len(legend.get_texts()) == 25
    assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))


@pytest.mark.parametrize("make", [lambda rows: accuracy_figure(round_rows([1]), "x"),
                                  lambda rows: client_figure(client_rows([1], 3), "x")])
def test_one_round_run_has_integer_round_ticks_and_a_full_scale(make):
    ax, _ = drawn(make(None))
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all(label.isdigit() for label in labels)
    lo, hi = ax.get_ylim()
    assert -5 <= lo <= 0 and 100 <= hi <= 115


def test_one_training_round_is_a_point_on_round_one():
    ax, _ = drawn(accuracy_figure(round_rows([1]), "x"))
    assert list(ax.get_xticks()) == [1]


def test_zero_shot_is_drawn_as_levels_on_a_percent_scale():
    rows = round_rows([0], acc=0.42)
    ax, _ = drawn(accuracy_figure(rows, "zeroshot"))
    heights = sorted(p.get_height() for p in ax.patches)
    assert heights == pytest.approx(sorted([42.0, 42.0, 50.0]))  # weighted, unweighted, global model
    lo, hi = ax.get_ylim()
    assert lo == 0 and hi >= 100
    assert "no training" in ax.get_title()


def test_overlapping_weighted_and_unweighted_lines_are_told_apart_and_baselines_drawn():
    rows = round_rows(range(1, 6))
    ax, _ = drawn(accuracy_figure(rows, "fedavg", references={"zero-shot": 0.31}))
    lines = {line.get_label(): line for line in ax.get_lines()}
    weighted, unweighted = lines["weighted by test size"], lines["unweighted mean"]
    assert list(weighted.get_ydata()) == pytest.approx(list(unweighted.get_ydata()))  # they coincide here
    assert (weighted.get_marker(), weighted.get_linestyle()) != (unweighted.get_marker(), unweighted.get_linestyle())
    assert unweighted.get_markerfacecolor() == "none"  # the hollow marker shows the one under it
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "zero-shot: 31.0 %" in legend and "global model, round 5: 50.0 %" in legend
    lo, hi = ax.get_ylim()
    for value in (31.0, 50.0, 60 + 5 + 5, 60 + 1 - 5):  # references, band top and bottom
        assert lo <= value <= hi


def test_compare_error_bars_are_named_and_labels_sit_above_them():
    summaries = [{"method": "zeroshot", "acc_weighted": 0.4, "acc_std": 0.0},
                 {"method": "fedavg", "acc_weighted": 0.7, "acc_std": 0.2},
                 {"method": "fedlrm", "acc_weighted": 0.95, "acc_std": 0.1}]
    fig = compare_figure(summaries, "compare")
    ax, renderer = drawn(fig)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "± std over clients" in legend and "zero-shot: 40.0 %" in legend
    labels = {t.get_text(): t for t in ax.texts}
    assert set(labels) == {"40.0", "70.0", "95.0"}
    to_display = ax.transData.transform
    for s in summaries:
        top = 100 * (s["acc_weighted"] + s["acc_std"])
        text = labels[f"{100 * s['acc_weighted']:.1f}"].get_window_extent(renderer)
        assert text.y0 >= to_display((0, top))[1]  # above the error bar: nothing crosses it
        assert text.y1 <= ax.get_window_extent(renderer).y1  # and inside the axes
    assert not ax.get_legend().get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))


def test_compare_rounds_puts_zero_shot_as_a_level():
    fig = compare_rounds_figure({"zeroshot": round_rows([0], acc=0.3), "fedavg": round_rows(range(1, 4))}, "c")
    ax, _ = drawn(fig)
    labels = [line.get_label() for line in ax.get_lines()]
    assert "fedavg" in labels and any(label.startswith("zeroshot (round 0): 30.0 %") for label in labels)
