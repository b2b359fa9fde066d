"""`fedlrm pretrain`: run the recipe end to end and write the assets (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fedlrm.errors import DataError, FedLRMError
from fedlrm.tools.pretrain.data import (CIFAR10_NAMES, IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD, TEST_FILE, TRAIN_FILE,
                                        decode_images, encode_indices, indices_digest, read_split, resolve_data_dir,
                                        select_pretrain, select_subset, sha256, to_pixel_values, write_subset)
from fedlrm.tools.pretrain.model import (MODEL_SHAPE, WARMUP_FRACTION, WEIGHT_DECAY, build_image_processor,
                                         build_model, quiet_libraries, reload_check, train, zero_shot_logits)
from fedlrm.tools.pretrain.tokenizer import EVAL_TEMPLATE, SPECIAL_TOKENS, TRAIN_TEMPLATES, build_tokenizer

RECIPE_VERSION = 1


def default_out_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("fedlrm") / "assets"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `fedlrm pretrain` options (also used by `python -m fedlrm.tools.pretrain`)."""
    parser.add_argument("--data", metavar="DIR", default=None,
                        help=f"directory holding {TRAIN_FILE} and {TEST_FILE} "
                             "(default: ../shared/datasets, relative to the current directory)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where tiny-clip/ and cifar10-subset/ are written (default: the package's assets)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the pretraining images (default 5)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    parser.add_argument("--pretrain-images", type=int, default=40000,
                        help="CIFAR-10 train images to pretrain on, all outside the shipped subset (default 40000)")
    parser.add_argument("--subset-train-per-class", type=int, default=300,
                        help="train images per class in the shipped subset (default 300)")
    parser.add_argument("--subset-test-per-class", type=int, default=200,
                        help="test images per class in the shipped subset (default 200)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "pretrain_images", "subset_train_per_class",
                 "subset_test_per_class", "threads"):
        if getattr(args, name) < 1:
            raise FedLRMError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise FedLRMError(f"--lr must be positive, got {args.lr}")


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "tokenizers", "datasets", "safetensors", "numpy", "pillow", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    src.rename(dst)


def run(args: argparse.Namespace) -> dict:
    """Run the recipe; returns (and writes to tiny-clip/PRETRAIN.json) its record."""
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict:
    import torch

    started = time.perf_counter()
    _check_args(args)
    progress = not getattr(args, "no_progress", False)
    data = resolve_data_dir(args.data)
    out = Path(args.out).expanduser().resolve() if args.out else default_out_dir()
    torch.set_num_threads(args.threads)
    log = print

    # 1-2. the shipped subset and the pretraining rows
    train_table, train_labels, names = read_split(data / TRAIN_FILE)
    test_table, test_labels, test_names = read_split(data / TEST_FILE)
    if names != test_names:
        raise DataError(f"class names differ between {TRAIN_FILE} ({names}) and {TEST_FILE} ({test_names})")
    if names != CIFAR10_NAMES:
        log(f"note: class names {names} are not CIFAR-10's; the recipe uses them as they are")
    k = len(names)
    subset_train = select_subset(train_labels, args.subset_train_per_class, k, args.seed, 1, "train")
    subset_test = select_subset(test_labels, args.subset_test_per_class, k, args.seed, 2, "test")
    pretrain_rows = select_pretrain(len(train_labels), subset_train, args.pretrain_images, args.seed)
    if np.intersect1d(pretrain_rows, subset_train).size:
        raise RuntimeError("pretraining rows overlap the federated train subset")  # by construction impossible
    log(f"data: {data}; subset {len(subset_train)} train / {len(subset_test)} test images; "
        f"pretraining on {len(pretrain_rows)} other train images")

    # 3-4. tokenizer, processor, random model
    tokenizer = build_tokenizer()
    processor = build_image_processor()
    model = build_model(tokenizer, args.seed)
    n_params = sum(p.numel() for p in model.parameters())

    # 5. pretraining
    t0 = time.perf_counter()
    train_pixels = to_pixel_values(decode_images(train_table, pretrain_rows))
    test_pixels = to_pixel_values(decode_images(test_table, range(len(test_labels))))
    decode_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    history = train(model, tokenizer, train_pixels, train_labels[pretrain_rows], names, args, progress)
    train_seconds = time.perf_counter() - t0
    del train_pixels

    # 7. zero-shot evaluation
    logits = zero_shot_logits(model, tokenizer, test_pixels, names)
    test_y = torch.as_tensor(test_labels)
    pred = logits.argmax(-1)
    acc_full = (pred == test_y).float().mean().item()
    per_class = {names[c]: round((pred[test_y == c] == c).float().mean().item(), 4) for c in range(k)}
    sub_pos = torch.as_tensor(subset_test)
    acc_subset = (pred[sub_pos] == test_y[sub_pos]).float().mean().item()
    log(f"zero-shot accuracy ({EVAL_TEMPLATE!r}): full CIFAR-10 test ({len(test_y)} images) {acc_full:.4f}, "
        f"shipped test subset ({len(sub_pos)} images) {acc_subset:.4f}")

    # write everything into temporary siblings, check, then swap them in
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pretrain-", dir=out))
    keep_staging = False
    try:
        model_dir, subset_dir = staging / "tiny-clip", staging / "cifar10-subset"
        model_dir.mkdir()
        subset_dir.mkdir()
        write_subset(train_table, subset_train, subset_dir / "train.parquet")
        write_subset(test_table, subset_test, subset_dir / "test.parquet")
        source = {
            "description": "A small CIFAR-10 subset the built-in default federates on. Rule: for each class "
                           "(label order), permute that class's rows with numpy.random.default_rng([seed, 1]) "
                           "(train) or default_rng([seed, 2]) (test) and keep the first per_class; rows are "
                           "written in ascending source order. The train rows are disjoint from every image "
                           "used to pretrain ../tiny-clip (see its PRETRAIN.json, pretrain_rows).",
            "seed": args.seed,
            "classes": names,
            "train": {"source_file": TRAIN_FILE, "source_rows": len(train_labels),
                      "source_sha256": sha256(data / TRAIN_FILE), "per_class": args.subset_train_per_class,
                      "indices": subset_train.tolist()},
            "test": {"source_file": TEST_FILE, "source_rows": len(test_labels),
                     "source_sha256": sha256(data / TEST_FILE), "per_class": args.subset_test_per_class,
                     "indices": subset_test.tolist()},
            "disjoint_from_pretraining": True,
            "recipe": "fedlrm.tools.pretrain",
        }
        (subset_dir / "SOURCE.json").write_text(json.dumps(source, indent=1) + "\n")

        with quiet_libraries():
            model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            processor.save_pretrained(model_dir)
        check = reload_check(model_dir, subset_dir / "test.parquet", logits[sub_pos], test_pixels[sub_pos], names)
        log(f"agreement check (reloaded with from_pretrained + AutoImageProcessor + AutoTokenizer): "
            f"subset accuracy {check['accuracy_reloaded']:.4f} vs recipe {check['accuracy_recipe']:.4f}, "
            f"pixel max |diff| {check['pixel_max_abs_diff']:.3g}, logit max |diff| {check['logit_max_abs_diff']:.3g}")
        if not check["agree"]:
            keep_staging = True
            raise RuntimeError(f"the reloaded model disagrees with the recipe: {check}; outputs left in {staging}")

        sizes = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir())}
        record = {
            "recipe": "fedlrm.tools.pretrain", "recipe_version": RECIPE_VERSION,
            "arguments": {"seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                          "pretrain_images": args.pretrain_images, "threads": args.threads,
                          "subset_train_per_class": args.subset_train_per_class,
                          "subset_test_per_class": args.subset_test_per_class},
            "command": "fedlrm pretrain " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in [("seed", args.seed), ("epochs", args.epochs),
                                                           ("batch_size", args.batch_size), ("lr", args.lr),
                                                           ("pretrain_images", args.pretrain_images),
                                                           ("threads", args.threads)]),
            "loss": "prompt classification: cross-entropy of logit_scale * cos(image, text(template(class))) over "
                    "the classes, one template drawn per step from train_templates; both towers trained",
            "optimizer": {"name": "AdamW", "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": WEIGHT_DECAY,
                          "schedule": f"linear warm-up {WARMUP_FRACTION:.0%} of steps, cosine to 0"},
            "augmentation": "random crop of the 4-px zero-padded normalised image, horizontal flip p=0.5",
            "train_templates": TRAIN_TEMPLATES,
            "eval_template": EVAL_TEMPLATE,
            "preprocessing": {"image_size": IMAGE_SIZE, "mean": IMAGE_MEAN, "std": IMAGE_STD,
                              "steps": "JPEG -> RGB -> resize shortest edge 32 (bicubic) -> centre crop 32 -> "
                                       "x/255 -> (x - mean) / std"},
            "model": {**MODEL_SHAPE, "parameters": n_params,
                      "vision_parameters": sum(p.numel() for p in model.vision_model.parameters())
                      + sum(p.numel() for p in model.visual_projection.parameters()),
                      "text_parameters": sum(p.numel() for p in model.text_model.parameters())
                      + sum(p.numel() for p in model.text_projection.parameters()),
                      "logit_scale": round(model.logit_scale.exp().item(), 4),
                      "file_bytes": sizes},
            "tokenizer": {"type": "BPE (end-of-word suffix </w>), lower-cased, '_' -> ' '",
                          "vocab_size": len(tokenizer),
                          "special_tokens": {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS},
                          "corpus": "CORPUS_TEMPLATES + CIFAR-10, CIFAR-100 and Caltech101 class names"},
            "data": {"dir": str(data), "train_file": TRAIN_FILE, "test_file": TEST_FILE, "classes": names},
            "pretrain_rows": {"source_file": TRAIN_FILE, "num_rows": len(train_labels),
                              "count": len(pretrain_rows), "sha256_int64_le": indices_digest(pretrain_rows),
                              "rule": "train rows not in cifar10-subset/train.parquet, permuted with "
                                      "numpy.random.default_rng([seed, 3]), first pretrain_images",
                              "encoding": "base64 of numpy.packbits(bitmap, bitorder='little'); "
                                          "fedlrm.tools.pretrain.pretrain_indices(record) decodes it",
                              "bitmap": encode_indices(pretrain_rows, len(train_labels)),
                              "disjoint_from_subset_train": True},
            "history": history,
            "zero_shot": {"template": EVAL_TEMPLATE,
                          "cifar10_test_full": {"images": len(test_y), "accuracy": round(acc_full, 4),
                                                "per_class": per_class},
                          "cifar10_subset_test": {"images": len(sub_pos), "accuracy": round(acc_subset, 4)},
                          "chance": round(1 / k, 4)},
            "reload_check": check,
            "wall_seconds": {"decode": round(decode_seconds, 1), "train": round(train_seconds, 1),
                             "total": round(time.perf_counter() - started, 1)},
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads()},
            "versions": _versions(),
        }
        (model_dir / "PRETRAIN.json").write_text(json.dumps(record, indent=1) + "\n")
        for d in (model_dir, subset_dir):  # some writers create 0600 temporary files; make them readable
            d.chmod(0o755)
            for f in d.iterdir():
                f.chmod(0o644)
        _replace_dir(subset_dir, out / "cifar10-subset")
        _replace_dir(model_dir, out / "tiny-clip")
    finally:
        if not keep_staging:
            shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote {out / 'tiny-clip'} and {out / 'cifar10-subset'} in {record['wall_seconds']['total']:.0f} s")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlrm.tools.pretrain", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
            run(args)
    except FedLRMError as err:
        print(f"fedlrm pretrain: error: {err}", file=sys.stderr)
        return 2
    return 0

