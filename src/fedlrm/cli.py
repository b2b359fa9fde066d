"""The `fedlrm` command: run, compare, flower, params, pretrain, config, configs, flower-app,
predict, evaluate, personalize, export."""

from __future__ import annotations

import argparse
import sys
import time

from fedlrm.errors import ConfigError, FedLRMError



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fedlrm.reporting.tracking import show_log_lines

    show_log_lines()  # the per-round lines and warnings, printed without breaking progress bars
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
    from fedlrm.algorithms import compare_entries

    every = ",".join(compare_entries())
    cmp.add_argument("--algorithms", default=every,
                     help=f"comma-separated; an entry may set the algorithm's own settings, ALGORITHM+key=value "
                          f"(e.g. fedlease+variant=weighted) (default: every algorithm and variant, {every})")
    cmp.add_argument("--seeds", default=None, metavar="S,S,...",
                     help="run the compare once per seed (each its own split and initialisation) and add a "
                          "table of the mean and standard deviation over them (default: the config's seed)")
    cmp.set_defaults(func=cmd_compare)

    flower = sub.add_parser("flower", help="run on Flower on 127.0.0.1: a SuperLink and one SuperNode per client "
                                           "(--runtime deployment) or Flower's Simulation Runtime on Ray "
                                           "(--runtime simulation); stopped when the run ends")
    _config_args(flower)
    flower.add_argument("--runtime", choices=("deployment", "simulation"), default="deployment",
                        help="deployment: one SuperNode process per client; simulation: virtual SuperNodes served "
                             "by a pool of Ray actors (pip install 'fedlrm[simulation]')")
    flower.add_argument("--client-cpus", type=int, default=1,
                        help="simulation: whole CPUs each ClientApp actor holds (as many actors run at once as fit)")
    flower.add_argument("--client-gpus", type=float, default=0.0,
                        help="simulation: GPUs each ClientApp actor holds; fractions share a GPU, e.g. 0.25")
    flower.add_argument("--ray-address", help="simulation: join this Ray cluster (e.g. auto, or HEAD_IP:6379) "
                                              "instead of starting Ray on this machine")
    flower.add_argument("--tls", action="store_true", help="serve the SuperLink over TLS (test certificates)")
    flower.add_argument("--auth", action="store_true", help="authenticate SuperNodes (implies --tls) and bind each "
                        "client to its SuperNode's key (federation.client_keys, written to the work dir)")
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

    pre = sub.add_parser("pretrain", help="pretrain the built-in backbone on offline CIFAR-10 and Caltech101")
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
    _inference_parsers(sub)
    return parser


def _inference_parsers(sub) -> None:
    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", metavar="RUN_DIR|ADAPTER_FOLDER",
                       help="a run directory (with --client) or a client's adapter folder (RUN_DIR/adapters/client_XX)")
        p.add_argument("--client", type=int, help="the client whose personalized model to use (with a RUN_DIR)")
        p.add_argument("--base-model", help="the base model's directory or hub id, if it is not where the "
                                            "folder records it")

    def run_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--image-column", default="image", help="Parquet: the image column (default: image)")
        p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
        p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, ...")

    pred = sub.add_parser("predict", help="classify images with a client's personalized model")
    model_args(pred)
    pred.add_argument("images", nargs="+", metavar="IMAGES",
                      help="image files, folders (searched recursively) or Parquet files (HF image layout)")
    pred.add_argument("--top-k", type=int, default=3, help="classes to report per image (default: 3)")
    pred.add_argument("--out", default="predictions.csv", help="the CSV to write (default: ./predictions.csv)")
    run_args(pred)
    pred.set_defaults(func=cmd_predict)

    ev = sub.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix of a client's "
                                         "personalized model on a labelled set")
    model_args(ev)
    ev.add_argument("data", metavar="LABELLED",
                    help="a folder with one subfolder per class, or a Parquet file with a label column")
    ev.add_argument("--label-column", default="label", help="Parquet: the label column (default: label)")
    ev.add_argument("--out", default="evaluation", help="the folder to write into (default: ./evaluation)")
    run_args(ev)
    ev.set_defaults(func=cmd_evaluate)

    pers = sub.add_parser("personalize", help="bring your own new client into a finished run: adapt from its "
                                               "final server state on your data, evaluate, write its adapters")
    pers.add_argument("run_dir", metavar="RUN_DIR", help="the directory of a finished run")
    pers.add_argument("--data", required=True, metavar="PATH",
                      help="the new client's data: a folder with train/ and test/ (one subfolder per class in "
                           "each) or with train.parquet and test.parquet")
    pers.add_argument("--epochs", type=int, help="local epochs to adapt for (default: the run's "
                                                 "data.new_client_epochs, else train.local_epochs)")
    pers.add_argument("--out", help="the folder to write the adapters and result.json to (new or empty; "
                                    "default: RUN_DIR/personalized/<name of the data folder>)")
    pers.add_argument("--class-names", help="comma-separated class names in label order, for Parquet data with "
                                            "plain integer labels (default: the data's own names)")
    pers.add_argument("--device", help="auto, cpu, cuda, cuda:1, ... (default: the run's train.device)")
    pers.set_defaults(func=cmd_personalize)

    exp = sub.add_parser("export", help="write a client's model with its LoRA merged into the weights "
                                        "(a plain transformers CLIPModel or VisionTextDualEncoderModel folder)")
    model_args(exp)
    exp.add_argument("--merged", required=True, metavar="OUT", help="the new folder to write")
    exp.set_defaults(func=cmd_export)


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


def _seed_list(text: str) -> list[int]:
    from fedlrm.errors import ConfigError

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes whole numbers separated by commas, e.g. 0,1,2; got {text!r}") from None


def cmd_compare(args) -> int:
    from fedlrm.algorithms import load_config
    from fedlrm.experiment import compare, compare_over_seeds

    start = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    if args.seeds is None:
        out, _ = compare(cfg, algorithms, progress=not args.no_progress)
    else:
        out, _ = compare_over_seeds(cfg, algorithms, _seed_list(args.seeds), progress=not args.no_progress)
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
    simulation = simulation_backend(args) if args.runtime == "simulation" else None
    app_source()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fedlrm-flower-")).resolve()
    config_file = work / "fedlrm.yaml"
    work.mkdir(parents=True, exist_ok=True)
    keys_file = work / "client_keys"
    if args.auth:  # the deployment's own SuperNodes, with keys made below: a client's messages go to its key only
        cfg.federation.client_keys = str(keys_file)
    config_file.write_text(to_yaml(cfg))
    n = cfg.data.total_clients  # every domain's clients; the held-out new ones get no SuperNode
    nodes = [{"partition-id": i, "num-partitions": n, "state-dir": str(work / f"client{i}")}
             for i in range(cfg.data.training_clients)]
    # flwr builds the app from a folder; a copy keeps the installed package read-only
    app = write_app(work / "app", overwrite=True)
    start = time.perf_counter()
    run_config = {"config-file": str(config_file)}
    if simulation is not None:
        run_config["client-state-dir"] = str(work)  # virtual SuperNodes have no node config of their own
        print(f"starting a SuperLink with Flower's Simulation Runtime ({n} virtual SuperNodes on Ray actors of "
              f"{args.client_cpus:g} CPU, {args.client_gpus:g} GPU each) on 127.0.0.1 "
              f"(logs: {work / 'deployment' / 'logs'})", flush=True)
        deployment = LocalDeployment(work / "deployment", n, nodes, simulation=simulation)
        if args.ray_address:  # Flower's Ray backend calls ray.init(), which joins the cluster RAY_ADDRESS names
            deployment.extra_env["RAY_ADDRESS"] = args.ray_address
    else:
        print(f"starting a SuperLink and {n} SuperNodes on 127.0.0.1 (logs: {work / 'deployment' / 'logs'})",
              flush=True)
        deployment = LocalDeployment(work / "deployment", n, nodes, tls=args.tls or args.auth, auth=args.auth)
    with deployment as dep:
        if args.auth:
            dep.write_client_keys(keys_file)
        result = dep.run(app, run_config, timeout=args.timeout, poll=5.0)
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


def simulation_backend(args) -> dict:
    """The Simulation Runtime's backend options from `fedlrm flower`'s arguments, checked before
    anything starts."""
    import importlib.util

    if args.tls or args.auth:
        raise ConfigError("--tls and --auth secure SuperNodes of the deployment runtime; the Simulation Runtime has "
                          "none (drop them, or use --runtime deployment)")
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("--runtime simulation needs Ray: pip install 'fedlrm[simulation]' (flwr[simulation])")
    if not args.client_cpus > 0 or not args.client_gpus >= 0:  # NaN fails too
        raise ConfigError(f"--client-cpus must be above 0 and --client-gpus 0 or more, got {args.client_cpus} and "
                          f"{args.client_gpus}")
    return {"client-resources-num-cpus": args.client_cpus, "client-resources-num-gpus": float(args.client_gpus)}


def cmd_flower_app(args) -> int:
    from fedlrm.federation.flower import write_app

    folder = write_app(args.folder, overwrite=args.force)
    print(f"wrote the Flower app to {folder}; run it with `flwr run {folder} <superlink-connection>` "
          f"(its run config keys are in {folder / 'pyproject.toml'})")
    return 0


def _load_for(args):
    """The personalized model of `args` (checked before anything is written)."""
    from fedlrm.federation.task import resolve_device
    from fedlrm.inference import load_personalized

    return load_personalized(args.model, args.client, base_model=args.base_model,
                             device=resolve_device(args.device, "--device"))


def cmd_predict(args) -> int:
    from pathlib import Path

    from rich.table import Table

    from fedlrm.inference import adapter_folder, check_out_file, collect_images, predict_images, prediction_rows, \
        top_classes
    from fedlrm.reporting import wide_console, write_csv

    from fedlrm.config import at_least_one

    at_least_one("--top-k", args.top_k)
    at_least_one("--batch-size", args.batch_size)
    out = Path(args.out)
    check_out_file(out)
    adapter_folder(args.model, args.client)  # a bad model path fails before images are searched
    images = collect_images(args.images, args.image_column)
    model = _load_for(args)
    predictions = top_classes(predict_images(model, images, args.batch_size), model.class_names, args.top_k)
    rows = prediction_rows(images.names, predictions)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out, rows)
    info = model.info
    table = Table(title=f"{info['algorithm']}, client {info['client']}: top-{args.top_k} classes")
    table.add_column("image", overflow="fold")
    for k in range(1, len(predictions[0]) + 1):
        table.add_column(f"#{k}", no_wrap=True)
    shown = 25
    for name, pred in zip(images.names[:shown], predictions[:shown]):
        table.add_row(name, *[f"{c} {p:.3f}" for c, p in pred])
    console = wide_console()
    console.print(table)
    more = f" ({len(rows) - shown} more than shown)" if len(rows) > shown else ""
    console.print(f"{len(rows)} images{more}; predictions written to {out.resolve()}")
    return 0


def cmd_evaluate(args) -> int:
    from pathlib import Path

    from rich.table import Table

    from fedlrm.federation.export import read_meta
    from fedlrm.inference import (adapter_folder, check_out_dir, evaluation, labelled_images, map_labels,
                                  model_about, predict_images, write_evaluation)
    from fedlrm.reporting import wide_console

    from fedlrm.config import at_least_one

    at_least_one("--batch-size", args.batch_size)
    out = Path(args.out)
    check_out_dir(out)
    meta = read_meta(adapter_folder(args.model, args.client))
    images = labelled_images(args.data, args.image_column, args.label_column)
    true = map_labels(images.labels, meta["class_names"], str(args.data))  # refused before the model loads
    model = _load_for(args)
    probs = predict_images(model, images, args.batch_size)
    result = evaluation(true, probs, model.class_names)
    files = write_evaluation(out, result, images, probs, model.class_names, {**model_about(model), "data": args.data})
    console = wide_console()
    console.print(f"{meta['algorithm']}, client {meta['client']} on {args.data}: accuracy "
                  f"{100 * result['accuracy']:.2f}% ({result['correct']}/{result['images']} images)")
    table = Table(title="per-class accuracy")
    for column in ("class", "images", "correct", "accuracy %"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in result["per_class"]:
        table.add_row(row["class"], str(row["images"]), str(row["correct"]), f"{100 * row['accuracy']:.1f}")
    console.print(table)
    classes, matrix = result["confusion"]["classes"], result["confusion"]["matrix"]
    if len(classes) <= 15:
        cm = Table(title="confusion matrix (rows: true class, columns: predicted)")
        cm.add_column("true \\ predicted")
        for c in classes:
            cm.add_column(c, justify="right")
        for c, row in zip(classes, matrix):
            cm.add_row(c, *[str(v) for v in row])
        console.print(cm)
    console.print(f"written to {out.resolve()}: " + ", ".join(p.name for p in files.values()))
    return 0


def cmd_personalize(args) -> int:
    from fedlrm.federation.newcomers import personalize_run

    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    out, result = personalize_run(args.run_dir, args.data, epochs=args.epochs, out=args.out, device=args.device,
                                  class_names=names)
    trained = (f"adapted for {result['epochs']} epoch(s) on {result['n_train']} images"
               if result["epochs"] else "nothing to train (evaluated as received)")
    print(f"{result['algorithm']}: new client on {args.data}, {trained}: accuracy "
          f"{100 * result['accuracy']:.2f} % on its {result['n_test']} test images")
    print(f"its model and result.json written to {out}; use it with `fedlrm predict {out} IMAGES`")
    return 0


def cmd_export(args) -> int:
    from fedlrm.federation.export import export_merged
    from fedlrm.inference import adapter_folder
    from fedlrm.models.backbone import hf_model_class

    out = export_merged(adapter_folder(args.model, args.client), args.merged, args.base_model)
    print(f"wrote the merged model to {out}; load it with transformers.{hf_model_class(str(out)).__name__}"
          f".from_pretrained({str(out)!r}) or fedlrm.load_personalized({str(out)!r})")
    return 0


def cmd_config(args) -> int:
    from fedlrm.algorithms import load_config
    from fedlrm.config import to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
