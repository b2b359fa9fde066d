"""Runs as a user starts them: one algorithm, a resumed run, or several compared.

Everything that can fail on bad input (config, model, data) is loaded before a run
directory is created, so a mistake never leaves a half-written one behind.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import fields, replace
from datetime import datetime
from pathlib import Path

from rich.console import Console

from fedlrm.algorithms import ALGORITHMS, check
from fedlrm.config import RunConfig
from fedlrm.data import load_federated_data
from fedlrm.errors import ConfigError
from fedlrm.federation.checkpoint import check_config, verify_checkpoint
from fedlrm.federation.export import save_personalized
from fedlrm.federation.newcomers import adapt_newcomer, newcomer_epochs, newcomer_summary
from fedlrm.federation.rundir import check_run_dir, new_run_dir, read_run_config, write_config
from fedlrm.federation.server import RunResult
from fedlrm.federation.simulation import Simulation
from fedlrm.federation.task import personalize
from fedlrm.models import load_backbone
from fedlrm.reporting import (markdown_table, over_seeds, plot_compare, plot_compare_rounds, print_seed_table,
                              print_table, seeds_markdown, write_csv,
                              write_run_report)

log = logging.getLogger("fedlrm.compare")


def run_experiment(cfg: RunConfig, *, data=None, run_dir: Path | None = None, progress: bool = True,
                   stop_after_round: int | None = None) -> RunResult:
    if run_dir is None:
        check_run_dir(cfg)  # a bad output_dir or a taken name is refused before the model loads
    sim = Simulation(cfg, data=data, progress=progress)
    run_dir = run_dir or new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    (run_dir / "data_summary.json").write_text(json.dumps(
        {"class_names": sim.data.class_names, "clients": sim.data.summary(),
         "global_test_size": sum(len(t.images) for t in sim.data.global_tests),
         **({"domains": [{"label": d.label, "clients": d.clients, "classes": len(d.classes),
                          "global_test_size": len(d.global_test)} for d in sim.data.domains]}
            if sim.data.domains else {})}, indent=2))
    result = sim.run(run_dir, stop_after_round=stop_after_round)
    if stop_after_round is None or result.round_rows and result.round_rows[-1]["round"] >= cfg.train.rounds:
        finish(sim, result, run_dir)
    return result


def resume_experiment(run_dir: str | Path, progress: bool = True) -> RunResult:
    """Continue a run from its last checkpoint. The run directory's config.yaml (read strictly) and
    checkpoint are checked in full before anything is written (`verify_checkpoint`): a resume that
    is refused leaves the folder as it was."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    check_config(run_dir, cfg)  # before the model and data load, which can take long
    sim = Simulation(cfg, progress=progress)
    ckpt = verify_checkpoint(run_dir, cfg, sim.server, range(sim.num_clients))
    # the verified checkpoint itself, so the round loop neither reads nor checks it again; none
    # (stopped before round 1 finished): the run starts at round 1
    result = sim.run(run_dir, resume=ckpt if ckpt is not None else False)
    finish(sim, result, run_dir)
    return result


def finish(sim: Simulation, result: RunResult, run_dir: Path) -> None:
    newcomers = bring_in_newcomers(sim, result, run_dir)
    write_run_report(run_dir, result, sim.cfg.algorithm, newcomers)
    if not sim.algorithm.trains:
        return
    sim.algorithm.write_report(run_dir, result.server_state)
    last = sim.cfg.train.rounds
    for c in exported_clients(sim, result):
        if c >= sim.num_clients:  # a new client's model is saved as it adapts (bring_in_newcomers)
            continue
        model = personalize(sim.bundle, sim.algorithm, sim.cfg, c, result.client_states[c], result.server_state, last)
        save_personalized(run_dir / "adapters" / f"client_{c:02d}", model, sim.cfg,
                          sim.data.clients[c].class_names(sim.data.class_names), c,
                          sim.bundle.layout, sim.algorithm.message_for(result.server_state, c, last), last)


def bring_in_newcomers(sim: Simulation, result: RunResult, run_dir: Path) -> list[dict]:
    """The held-out clients (data.new_clients), each adapted from the final server state as its
    algorithm brings a newcomer in and evaluated: their rows, also written to new_clients.json and
    summed up in the run summary (new_acc_weighted, ...); their adapters are saved where
    report.export_adapters selects them. Seeded as training is, so a resumed run gives the same."""
    if not sim.newcomers:
        return []
    cfg, algorithm = sim.cfg, sim.algorithm
    last = cfg.train.rounds if algorithm.trains else 0
    epochs = newcomer_epochs(cfg)
    selection = cfg.report.export_selection()
    export = algorithm.trains and (selection in ("all", "trained") or isinstance(selection, list))
    domain_of = sim.data.domain_of()
    rows = []
    for c, split in enumerate(sim.newcomers, start=sim.num_clients):
        _, row = adapt_newcomer(sim.bundle, algorithm, cfg, c, split, result.server_state, last, epochs)
        rows.append({**row, **({"domain": domain_of[c]} if c in domain_of else {})})
        if export and (not isinstance(selection, list) or c in selection):
            save_personalized(run_dir / "adapters" / f"client_{c:02d}", sim.bundle.model, cfg,
                              split.class_names(sim.data.class_names), c, sim.bundle.layout,
                              algorithm.newcomer_message(result.server_state, last), last)
    (run_dir / "new_clients.json").write_text(json.dumps(rows, indent=2))
    result.summary.update(newcomer_summary(rows))
    logging.getLogger("fedlrm.newcomers").info(
        "%s: %d new client(s) adapted from the final server state for %d epoch(s): accuracy %.2f %% (weighted), "
        "participating clients %.2f %%", algorithm.name, len(rows), epochs if algorithm.trains else 0,
        100 * result.summary["new_acc_weighted"], 100 * result.summary.get("acc_weighted", float("nan")))
    return rows


def exported_clients(sim: Simulation, result: RunResult) -> list[int]:
    """The clients whose models `report.export_adapters` asks for."""
    selection = sim.cfg.report.export_selection()
    if selection == "all":
        return list(range(sim.num_clients))
    if selection == "none":
        return []
    if selection == "trained":
        return sim.states.stored()  # a client's state is stored once it has trained
    return selection


def compare_entry(cfg: RunConfig, entry: str) -> RunConfig:
    """The run config of one entry of a compare: an algorithm's name, optionally followed by settings
    of its own section, `+key=value` each (`fedlease+variant=weighted`: FedLEASE's other variant)."""
    algorithm, *settings = entry.split("+")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {algorithm!r} in {entry!r}; choose from {', '.join(ALGORITHMS)}")
    if not settings:
        return replace(cfg, algorithm=algorithm)
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    bad = [item for item in settings if "=" not in item or not item.partition("=")[0].strip()]
    if bad:
        raise ConfigError(f"{entry!r}: {', '.join(map(repr, bad))} is not of the form key=value; write an entry "
                          f"as ALGORITHM+key=value, e.g. fedlease+variant=weighted")
    try:
        own = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg.methods[algorithm]),
                                                  OmegaConf.from_dotlist(settings)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{entry!r}: {str(err).splitlines()[0]} (the keys of {algorithm}: "
                          f"{', '.join(f.name for f in fields(cfg.methods[algorithm])) or 'none'})") from None
    return replace(cfg, algorithm=algorithm, methods={**cfg.methods, algorithm: own})


def checked_entries(cfg: RunConfig, algorithms: list[str]) -> dict[str, RunConfig]:
    """Each compare entry's run config, with each method's own checks (e.g. fedlease.warmup_rounds <
    train.rounds) passed: a bad setting must not surface after the first methods ran."""
    if not algorithms:
        raise ConfigError("give at least one algorithm to compare")
    if len(set(algorithms)) != len(algorithms):
        raise ConfigError(f"--algorithms names an entry twice: {', '.join(algorithms)}")
    entries = {entry: compare_entry(cfg, entry) for entry in algorithms}
    for entry_cfg in entries.values():
        check(entry_cfg)
    return entries


def compare_over_seeds(cfg: RunConfig, algorithms: list[str], seeds: list[int], progress: bool = True,
                       console: Console | None = None) -> tuple[Path, list[dict]]:
    """`compare` once per seed (each seed its own split, shots and initialisation), into
    `<out>/seed-<seed>/`, then one table of each method's mean and standard deviation over the seeds
    (`compare.md`, `compare.csv`, `compare.png` in `<out>`)."""
    if not seeds:
        raise ConfigError("give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds names a seed twice: {', '.join(map(str, seeds))}")
    if len(seeds) == 1:
        return compare(replace(cfg, seed=seeds[0]), algorithms, progress, console)
    checked_entries(cfg, algorithms)  # every entry's checks before the first seed runs
    name = cfg.name or f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    out = new_run_dir(replace(cfg, name=name))
    per_seed = {}
    for seed in seeds:
        log.info("seed %d (%d of %d)", seed, len(per_seed) + 1, len(seeds))
        _, per_seed[seed] = compare(replace(cfg, seed=seed, output_dir=str(out), name=f"seed-{seed}"), algorithms,
                                    progress, console)
    rows = over_seeds(per_seed)
    federation = (f"{len(cfg.data.domains)} domains" if cfg.data.domains else
                  f"{cfg.data.num_clients} clients, {cfg.data.shots}-shot, {cfg.data.partition} split")
    title = f"{federation}, mean ± std over seeds {', '.join(map(str, seeds))}"
    print_seed_table(rows, title, console)
    (out / "compare.md").write_text(f"# {title}\n\n" + seeds_markdown(rows))
    write_csv(out / "compare.csv", rows)
    plot_compare(out / "compare.png", [{"method": r["method"], **{k[:-5]: r[k] for k in r if k.endswith("/mean")}}
                                       for r in rows], title)
    return out, rows


def compare(cfg: RunConfig, algorithms: list[str], progress: bool = True,
            console: Console | None = None) -> tuple[Path, list[dict]]:
    """Every algorithm on the identical split and seed; one table, one bar chart. An entry may give
    settings of the algorithm's own section (`fedlease+variant=weighted`): it is labelled as written."""
    entries = checked_entries(cfg, algorithms)
    name = cfg.name or f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    check_run_dir(replace(cfg, name=name))
    # One data load for all: the same clients, images and test sets for every method.
    backbone = load_backbone(cfg.model)
    data = load_federated_data(cfg.data, backbone.preprocess, cfg.seed, pretrained_on=backbone.pretrained_on)
    out = new_run_dir(replace(cfg, name=name))
    summaries, runs = [], {}
    for i, algorithm in enumerate(algorithms, 1):
        run_cfg = replace(entries[algorithm], name=None)
        log.info("[%d/%d] %s: started (%s)", i, len(algorithms), algorithm, out / algorithm)
        start = time.perf_counter()
        result = run_experiment(run_cfg, data=data, run_dir=out / algorithm, progress=progress)
        summaries.append({"method": algorithm, **result.summary})
        runs[algorithm] = (result.client_rows, result.round_rows)
        log.info("[%d/%d] %s: accuracy %.2f %% (weighted; std over clients %.2f) in %.1f s", i, len(algorithms),
                 algorithm, 100 * result.summary.get("acc_weighted", float("nan")),
                 100 * result.summary.get("acc_std", float("nan")), time.perf_counter() - start)
    if data.domains:
        title = (f"{len(data.clients)} clients in {len(data.domains)} domains ("
                 + ", ".join(f"{label}: {len(d.clients)}, {c.shots}-shot, {c.partition}"
                             for d, (label, c) in zip(data.domains, cfg.data.domain_configs()))
                 + f"), seed {cfg.seed}")
    else:
        title = f"{len(data.clients)} clients, {cfg.data.shots}-shot, {cfg.data.partition} split, seed {cfg.seed}"
    print_table(summaries, title, console)
    (out / "compare.md").write_text(f"# {title}\n\n" + markdown_table(summaries))
    write_csv(out / "compare.csv", [{k: v for k, v in s.items() if k not in ("per_client_accuracy", "groups")}
                                    for s in summaries])
    plot_compare(out / "compare.png", summaries, title)
    plot_compare_rounds(out, runs, title)
    return out, summaries
