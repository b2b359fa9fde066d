"""The `fedlrm` command: run, compare, flower, params, pretrain, config, configs, flower-app."""

from __future__ import annotations

import argparse
import sys
import time

from fedlrm.errors import FedLRMError



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FedLRMError as err:
        print(f"fedlrm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlrm: interrupted; a run can be continued with `fedlrm run --resume RUN_DIR`", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlrm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one algorithm (built-in default without --config)")
    _config_args(run)
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    run.set_defaults(func=cmd_run)

    cmp = sub.add_parser("compare", help="run several algorithms on the identical split and seed")
    _config_args(cmp)
    from fedlrm.algorithms import ALGORITHMS

    every = ",".join(ALGORITHMS)
    cmp.add_argument("--algorithms", default=every, help=f"comma-separated (default: all, {every})")
    cmp.set_defaults(func=cmd_compare)

    flower = sub.add_parser("flower", help="run on a local Flower deployment: a SuperLink and one SuperNode "
                                           "per client on 127.0.0.1, stopped when the run ends")
    _config_args(flower)
    flower.add_argument("--tls", action="store_true", help="serve the SuperLink over TLS (test certificates)")
    flower.add_argument("--auth", action="store_true", help="authenticate SuperNodes (implies --tls)")
    flower.add_argument("--work-dir", help="where the deployment keeps logs, keys and client state "
                                           "(default: a new temporary folder)")
    flower.add_argument("--timeout", type=float, default=24 * 3600, help="give up on the run after this many s")
    flower.set_defaults(func=cmd_flower)

    params = sub.add_parser("params", help="count trainable, uploaded and full-fine-tuning parameters")
    _config_args(params)
    params.add_argument("--layers", type=int, help="synthetic model: number of blocks (paper Table 1: 12)")
    params.add_argument("--dim", type=int, default=256, help="synthetic model: width of the adapted matrix")
    params.add_argument("--global-rank", type=int, nargs="+", help="global LoRA rank(s) (default adapter.rank)")
    params.add_argument("--local-rank", type=int, help="rank of the local expert of fedlrm and apfl (default: each "
                                                       "method's local_rank setting)")
    params.add_argument("--algorithm", help="count for this algorithm only (default: every algorithm)")
    params.set_defaults(func=cmd_params)

    from fedlrm.tools import pretrain

    pre = sub.add_parser("pretrain", help="pretrain the built-in tiny CLIP on offline CIFAR-10")
    pretrain.add_arguments(pre)
    pre.set_defaults(func=lambda a: (pretrain.run(a), 0)[1])

    show = sub.add_parser("config", help="print the resolved configuration")
    _config_args(show)
    show.set_defaults(func=cmd_config)

    listed = sub.add_parser("configs", help="list the configurations shipped with fedlrm (for --config NAME)")
    listed.set_defaults(func=cmd_configs)

    app = sub.add_parser("flower-app", help="write the Flower app folder, for `flwr run FOLDER <superlink>`")
    app.add_argument("folder", help="where to write it (created)")
    app.add_argument("--force", action="store_true", help="replace a pyproject.toml already there")
    app.set_defaults(func=cmd_flower_app)
    return parser


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (default: the built-in default)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. algorithm=fedavg train.rounds=5")


def cmd_run(args) -> int:
    from fedlrm.algorithms import load_config
    from fedlrm.experiment import resume_experiment, run_experiment
    from fedlrm.reporting import print_table

    start = time.perf_counter()
    if args.resume:
        if args.config or args.overrides:
            raise FedLRMError("--resume takes the run directory's own config; drop --config and overrides")
        result = resume_experiment(args.resume, progress=not args.no_progress)
    else:
        cfg = load_config(args.config, args.overrides)
        result = run_experiment(cfg, progress=not args.no_progress)
    summary = {"method": result.summary["algorithm"], **result.summary}
    print_table([summary], f"{summary['method']}: final round")
    print(f"run directory: {result.run_dir}  ({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_compare(args) -> int:
    from fedlrm.algorithms import load_config
    from fedlrm.experiment import compare

    start = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    out, _ = compare(cfg, algorithms, progress=not args.no_progress)
    print(f"results: {out / 'compare.md'}, {out / 'compare.png'}  (wall time {time.perf_counter() - start:.1f} s)")
    return 0


def cmd_flower(args) -> int:
    import json
    import tempfile
    from pathlib import Path

    from fedlrm.algorithms import load_config
    from fedlrm.config import absolute_paths, to_yaml
    from fedlrm.reporting import print_table
    from fedlrm.tools.deployment import LocalDeployment

    from fedlrm.federation.flower import app_source, write_app

    # fail here, before any folder or process exists
    cfg = absolute_paths(load_config(args.config, args.overrides))  # the SuperLink's app reads it from elsewhere
    app_source()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fedlrm-flower-")).resolve()
    config_file = work / "fedlrm.yaml"
    work.mkdir(parents=True, exist_ok=True)
    config_file.write_text(to_yaml(cfg))
    n = cfg.data.num_clients
    nodes = [{"partition-id": i, "num-partitions": n, "state-dir": str(work / f"client{i}")} for i in range(n)]
    # flwr builds the app from a folder; a copy keeps the installed package read-only
    app = write_app(work / "app", overwrite=True)
    start = time.perf_counter()
    print(f"starting a SuperLink and {n} SuperNodes on 127.0.0.1 (logs: {work / 'deployment' / 'logs'})", flush=True)
    with LocalDeployment(work / "deployment", n, nodes, tls=args.tls or args.auth, auth=args.auth) as dep:
        result = dep.run(app, {"config-file": str(config_file)}, timeout=args.timeout, poll=5.0)
    print(result.logs[-4000:] if not result.ok else "", end="")
    if not result.ok:
        raise FedLRMError(f"the Flower run ended {result.status}: {result.details}; logs are in {work}")
    run_dir = next(line.split("run directory: ", 1)[1].strip() for line in result.logs.splitlines()
                   if "run directory: " in line)
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    print_table([summary], f"{summary['method']} on Flower: final round")
    print(f"run directory: {run_dir}  ({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_params(args) -> int:
    from fedlrm.algorithms import load_config
    from fedlrm.params import count_parameters, print_counts

    cfg = load_config(args.config, args.overrides)
    ranks = args.global_rank or [cfg.adapter.rank]
    rows = count_parameters(cfg, ranks, args.local_rank, args.algorithm, args.layers, args.dim)
    title = (f"synthetic: {args.layers} layers, one {args.dim}x{args.dim} matrix each"
             if args.layers else f"{cfg.model.backend}:{cfg.model.name}, targets {cfg.model.target_modules}")
    print_counts(rows, title)
    return 0


def cmd_configs(args) -> int:
    from fedlrm.config import packaged_configs
    from fedlrm.reporting import wide_console
    from rich.table import Table

    table = Table(title="configurations shipped with fedlrm: fedlrm run --config NAME [key=value ...]")
    table.add_column("name", no_wrap=True)
    table.add_column("what it is")
    for name, path in packaged_configs().items():
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        table.add_row(name, first.split(": ")[0])  # its heading comment, to the first colon
    wide_console().print(table)
    return 0


def cmd_flower_app(args) -> int:
    from fedlrm.federation.flower import write_app

    folder = write_app(args.folder, overwrite=args.force)
    print(f"wrote the Flower app to {folder}; run it with `flwr run {folder} <superlink-connection>` "
          f"(its run config keys are in {folder / 'pyproject.toml'})")
    return 0


def cmd_config(args) -> int:
    from fedlrm.algorithms import load_config
    from fedlrm.config import to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
