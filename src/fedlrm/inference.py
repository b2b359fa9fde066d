"""A client's personalized model in a user's hands: load it, classify images, evaluate it.

    import fedlrm
    model = fedlrm.load_personalized("runs/my-run", client=0)   # or an adapter folder
    model.predict(["cat.jpg", "dog.png"], top_k=3)
    # [[("cat", 0.91), ("dog", 0.06), ("fox", 0.01)], [("dog", 0.88), ...]]

`fedlrm predict` and `fedlrm evaluate` are this module on the command line. Images come
as files, folders (searched recursively) or a Parquet file in the Hugging Face layout (an
image column of {bytes, path} structs); a labelled set is a folder with one subfolder per
class, or a Parquet file with a label column whose class names are the model's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import PIL.Image
import torch
from torch import nn

from fedlrm.errors import DataError, FedLRMError
from fedlrm.federation.export import META_FILE, PEFT_CONFIG_FILE, read_meta, read_personalized

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CLIENT_FOLDER = re.compile(r"client_(\d+)$")

#: one image's answer: (class name, probability) pairs, most probable first
Prediction = list[tuple[str, float]]


class PersonalizedClassifier(nn.Module):
    """One client's personalized CLIP classifier.

    - `predict(images, top_k=3)`: images are PIL images or paths; returns one list per image
      of (class name, probability) pairs, most probable first (probabilities over all classes).
    - `class_names`: the classes, in the order of the logits' columns.
    - `preprocess(images)`: PIL images or paths -> the pixel tensor (n, 3, H, W) the model takes.
    - `logits(pixel_values)` and `model(pixel_values)`: logits (n, classes) of preprocessed images.
    - `info`: what `fedlrm.json` records (algorithm, client, round, base model, ...).
    """

    def __init__(self, model: nn.Module, info: dict, folder: Path):
        super().__init__()
        self.model = model
        self.info = info
        self.folder = folder

    @property
    def class_names(self) -> list[str]:
        return list(self.model.class_names)

    @property
    def device(self) -> torch.device:
        return self.model.text_features.device

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values.to(self.device))

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self(pixel_values)

    def preprocess(self, images: Sequence[PIL.Image.Image | str | Path]) -> torch.Tensor:
        return self.model.preprocess([_as_image(im) for im in images])

    @torch.no_grad()
    def probabilities(self, images: Sequence[PIL.Image.Image | str | Path], batch_size: int = 32) -> torch.Tensor:
        """(n, classes) class probabilities of the images."""
        images = list(images)
        out = [torch.softmax(self(self.preprocess(images[i:i + batch_size])).float(), dim=-1).cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, len(self.class_names))

    def predict(self, images: Sequence[PIL.Image.Image | str | Path] | PIL.Image.Image | str | Path,
                top_k: int = 3, batch_size: int = 32) -> list[Prediction]:
        """For each image, its `top_k` most probable classes as (name, probability), best first
        (top_k larger than the number of classes gives all of them)."""
        if isinstance(images, (PIL.Image.Image, str, Path)):
            images = [images]
        return top_classes(self.probabilities(images, batch_size), self.class_names, top_k)


def top_classes(probs: torch.Tensor, class_names: list[str], top_k: int) -> list[Prediction]:
    if top_k < 1:
        raise FedLRMError(f"top_k must be at least 1, got {top_k}")
    values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [[(class_names[i], float(p)) for p, i in zip(vs.tolist(), ix.tolist())]
            for vs, ix in zip(values, indices)]


def _as_image(image) -> PIL.Image.Image:
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    return open_image(Path(image))


def open_image(path: Path) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"no such image file: {path}") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
        raise DataError(f"cannot read the image {path}: {type(err).__name__}: {err}. "
                        "Repair or remove it") from None


# ----- finding a client's model ------------------------------------------------------------
def adapter_folder(path: str | Path, client: int | None = None) -> Path:
    """The adapter folder of `path`: the folder itself, or a run directory's
    adapters/client_XX for `client`. Refuses what is neither, with what to give instead."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FedLRMError(f"{path}: no such run directory or adapter folder")
    if not path.is_dir():
        raise FedLRMError(f"{path} is a file; give a run directory (with --client) or an adapter folder")
    if (path / META_FILE).is_file() or (path / PEFT_CONFIG_FILE).is_file():
        meta = read_meta(path)
        if client is not None and meta.get("client") is not None and meta["client"] != client:
            raise FedLRMError(f"{path} holds client {meta['client']}'s model, not client {client}'s; "
                              "drop --client or give the run directory")
        return path
    adapters = path / "adapters"
    if not (path / "config.yaml").is_file() and not adapters.is_dir():
        raise FedLRMError(f"{path} is neither a run directory (no config.yaml) nor an adapter folder "
                          f"(no {META_FILE}); give RUN_DIR --client K or RUN_DIR/adapters/client_XX")
    found = {int(m.group(1)): p for p in (sorted(adapters.iterdir()) if adapters.is_dir() else [])
             if p.is_dir() and (m := CLIENT_FOLDER.match(p.name))}
    if not found:
        raise FedLRMError(f"the run directory {path} has no personalized models in {adapters}: zero-shot runs "
                          "train none, and an interrupted run writes them only when it ends "
                          f"(`fedlrm run --resume {path}` finishes it)")
    available = f"clients {min(found)}..{max(found)}" if len(found) == max(found) - min(found) + 1 else \
        "clients " + ", ".join(map(str, sorted(found)))
    if client is None:
        raise FedLRMError(f"{path} is a run directory: say which client's model to use with --client K "
                          f"(client=K in Python); it has {available}")
    if client < 0 or client > max(found):
        raise FedLRMError(f"client {client} is out of range: the run directory {path} has {available}")
    if client not in found:
        raise FedLRMError(f"the run directory {path} has no model of client {client} (it has {available}: its "
                          f"report.export_adapters setting chose whose models it wrote)")
    return found[client]


def load_personalized(path: str | Path, client: int | None = None, *, base_model: str | None = None,
                      device: str | torch.device | None = None) -> PersonalizedClassifier:
    """One client's personalized classifier, in eval mode.

    `path`: an adapter folder (RUN_DIR/adapters/client_XX, or a merged export), or a run
    directory together with `client`. `base_model` replaces the recorded base model (a
    directory or hub id), e.g. after moving it; `device` defaults to the CPU.
    """
    folder = adapter_folder(path, client)
    model, info = read_personalized(folder, base_model)
    classifier = PersonalizedClassifier(model, info, folder).eval()
    return classifier.to(device) if device is not None else classifier


# ----- image inputs --------------------------------------------------------------------------
@dataclass
class Images:
    """Images to classify: a name for each (a path, or `file.parquet#row`), a loader of a
    list of positions, and for labelled sets the class name of each."""

    names: list[str]
    load: Callable[[list[int]], list[PIL.Image.Image]]
    labels: list[str] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def batches(self, batch_size: int) -> Iterable[tuple[list[int], list[PIL.Image.Image]]]:
        for start in range(0, len(self), batch_size):
            positions = list(range(start, min(start + batch_size, len(self))))
            yield positions, self.load(positions)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _files(paths: list[Path], labels: list[str] | None = None) -> Images:
    return Images([str(p) for p in paths], lambda positions: [open_image(paths[i]) for i in positions], labels)


def images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and _is_image(p))


def _read_parquet(path: Path):
    from fedlrm.data.sources import _load

    return _load("parquet", str(path), f"Parquet file {path}", split="train")


def _check_column(ds, column: str, option: str, path: Path) -> None:
    if column not in ds.column_names:
        raise DataError(f"the Parquet file {path} has no column {column!r} (its columns: "
                        f"{', '.join(ds.column_names)}); name the right one with {option}")


def parquet_images(path: Path, image_column: str = "image") -> Images:
    from fedlrm.data.sources import HFSplit

    ds = _read_parquet(path)
    _check_column(ds, image_column, "--image-column", path)
    if len(ds) == 0:
        raise DataError(f"the Parquet file {path} has no rows")
    split = HFSplit(ds, image_column, np.zeros(len(ds), dtype=np.int64), f"Parquet file {path}")
    return Images([f"{path}#{i}" for i in range(len(ds))], lambda positions: split.load(np.asarray(positions)))


def collect_images(inputs: Sequence[str | Path], image_column: str = "image") -> Images:
    """The images of files, folders (recursively) and Parquet files, in the order given."""
    if not inputs:
        raise DataError("give at least one image file, image folder or Parquet file")
    parts: list[Images] = []
    for given in inputs:
        path = Path(given).expanduser()
        if path.is_dir():
            found = images_under(path)
            if not found:
                raise DataError(f"the folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)}), "
                                "in it or in its subfolders")
            parts.append(_files(found))
        elif path.is_file() and path.suffix.lower() == ".parquet":
            parts.append(parquet_images(path, image_column))
        elif path.is_file() and _is_image(path):
            parts.append(_files([path]))
        elif path.is_file():
            raise DataError(f"{path} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a .parquet file")
        else:
            raise DataError(f"{path}: no such image file, folder or Parquet file")
    if len(parts) == 1:
        return parts[0]
    offsets = np.cumsum([0] + [len(p) for p in parts])

    def load(positions: list[int]) -> list[PIL.Image.Image]:
        out = []
        for pos in positions:
            k = int(np.searchsorted(offsets, pos, side="right")) - 1
            out.extend(parts[k].load([pos - int(offsets[k])]))
        return out

    return Images([n for p in parts for n in p.names], load)


def labelled_images(data: str | Path, image_column: str = "image", label_column: str = "label") -> Images:
    """A labelled set: a folder with one subfolder per class (images in it at any depth), or a
    Parquet file whose label column holds class names (a ClassLabel or strings)."""
    path = Path(data).expanduser()
    if path.is_dir():
        loose = [p for p in path.iterdir() if p.is_file() and _is_image(p)]
        if loose:
            raise DataError(f"{path} has images outside class subfolders (e.g. {loose[0].name}); a labelled "
                            "folder holds one subfolder per class, named after it, with that class's images")
        files, labels = [], []
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found = images_under(sub)
            files += found
            labels += [sub.name] * len(found)
        if not files:
            raise DataError(f"the folder {path} holds no images in class subfolders "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        return _files(files, labels)
    if path.is_file() and path.suffix.lower() == ".parquet":
        from fedlrm.data.sources import _from_hf

        ds = _read_parquet(path)
        _check_column(ds, image_column, "--image-column", path)
        _check_column(ds, label_column, "--label-column", path)
        if len(ds) == 0:
            raise DataError(f"the Parquet file {path} has no rows")
        source = _from_hf(ds, ds, image_column, label_column, f"Parquet file {path}", f"Parquet file {path}")
        split = source.test
        return Images([f"{path}#{i}" for i in range(len(ds))], lambda positions: split.load(np.asarray(positions)),
                      [source.class_names[i] for i in split.labels.tolist()])
    if path.exists():
        raise DataError(f"{path} is neither a folder of class subfolders nor a .parquet file")
    raise DataError(f"{path}: no such labelled image folder or Parquet file")


def map_labels(labels: list[str], class_names: list[str], where: str) -> list[int]:
    """The model's class index of each label (as prompts spell names: underscores are spaces;
    case is ignored where that is unambiguous). Refuses labels the model does not know."""
    from fedlrm.data.sources import readable

    exact = {c: i for i, c in enumerate(class_names)}
    folded: dict[str, int | None] = {}
    for i, c in enumerate(class_names):
        folded[c.casefold()] = None if c.casefold() in folded else i
    index: dict[str, int] = {}
    unknown = []
    for label in dict.fromkeys(labels):
        name = readable(label)
        i = exact.get(label, exact.get(name, folded.get(name.casefold())))
        if i is None:
            unknown.append(label)
        else:
            index[label] = i
    if unknown:
        from fedlrm.data.sources import _short

        raise DataError(f"the classes {_short(unknown)} of {where} are not classes of the model "
                        f"({_short(class_names)}); the labels must name the model's classes")
    return [index[label] for label in labels]


# ----- predicting and evaluating -------------------------------------------------------------
@torch.no_grad()
def predict_images(model: PersonalizedClassifier, images: Images, batch_size: int = 32) -> torch.Tensor:
    """(n, classes) probabilities of every image."""
    out = []
    for _, batch in images.batches(batch_size):
        out.append(torch.softmax(model(model.preprocess(batch)).float(), dim=-1).cpu())
    return torch.cat(out)


def prediction_rows(names: list[str], predictions: list[Prediction]) -> list[dict]:
    rows = []
    for name, pred in zip(names, predictions):
        row: dict = {"image": name}
        for k, (cls, p) in enumerate(pred, 1):
            row[f"class_{k}"], row[f"prob_{k}"] = cls, round(p, 6)
        rows.append(row)
    return rows


def evaluation(true: list[int], probs: torch.Tensor, class_names: list[str]) -> dict:
    """Accuracy, per-class accuracy and the confusion matrix (rows: true class, columns:
    predicted), over the classes that occur as a label or a prediction, in the model's order."""
    predicted = probs.argmax(dim=-1).tolist()
    n = len(class_names)
    matrix = np.zeros((n, n), dtype=np.int64)
    for t, p in zip(true, predicted):
        matrix[t, p] += 1
    shown = [i for i in range(n) if matrix[i].sum() or matrix[:, i].sum()]
    per_class = [{"class": class_names[i], "images": int(matrix[i].sum()), "correct": int(matrix[i, i]),
                  "accuracy": float(matrix[i, i] / matrix[i].sum())} for i in shown if matrix[i].sum()]
    correct = int(np.trace(matrix))
    return {"images": len(true), "correct": correct, "accuracy": correct / len(true), "per_class": per_class,
            "confusion": {"classes": [class_names[i] for i in shown],
                          "matrix": matrix[np.ix_(shown, shown)].tolist()},
            "true": list(true), "predicted": predicted}


def plot_confusion(path: Path, classes: list[str], matrix: list[list[int]], title: str) -> None:
    """The confusion matrix as a heat map, class names on both axes and each cell's count."""
    from matplotlib.figure import Figure

    m = np.asarray(matrix)
    size = max(4.0, 0.5 * len(classes) + 2.0)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.subplots()
    im = ax.imshow(m, cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="images")
    ax.set_xticks(range(len(classes)), labels=classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(classes)), labels=classes)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    threshold = m.max() / 2 if m.size else 0
    for (r, c), value in np.ndenumerate(m):
        ax.text(c, r, str(value), ha="center", va="center", fontsize=8 if len(classes) > 20 else 10,
                color="white" if value > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def write_evaluation(out: Path, result: dict, images: Images, probs: torch.Tensor, class_names: list[str],
                     about: dict) -> dict[str, Path]:
    """metrics.json, per_class.csv, confusion_matrix.csv and .png, predictions.csv under `out`."""
    from fedlrm.reporting import write_csv

    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in ("metrics.json", "per_class.csv", "confusion_matrix.csv",
                                           "confusion_matrix.png", "predictions.csv")}
    metrics = {**about, **{k: v for k, v in result.items() if k not in ("true", "predicted")}}
    files["metrics.json"].write_text(json.dumps(metrics, indent=2))
    write_csv(files["per_class.csv"], result["per_class"])
    classes, matrix = result["confusion"]["classes"], result["confusion"]["matrix"]
    write_csv(files["confusion_matrix.csv"],
              [{"true \\ predicted": c, **dict(zip(classes, row))} for c, row in zip(classes, matrix)])
    plot_confusion(files["confusion_matrix.png"], classes, matrix,
                   f"{about['algorithm']}, client {about['client']}: accuracy {100 * result['accuracy']:.1f}% "
                   f"({result['images']} images)")
    write_csv(files["predictions.csv"], [
        {"image": name, "label": label, "predicted": class_names[p], "probability": round(float(probs[i, p]), 6),
         "correct": int(label_i == p)}
        for i, (name, label, label_i, p) in enumerate(zip(images.names, images.labels, result["true"],
                                                           result["predicted"]))])
    return files


def model_about(model: PersonalizedClassifier) -> dict:
    info = model.info
    return {"model": str(model.folder), "algorithm": info.get("algorithm"), "client": info.get("client"),
            "round": info.get("round"), "format": info.get("kind")}


def check_out_file(path: Path) -> None:
    if path.is_dir():
        raise FedLRMError(f"--out {path} is a directory; give the CSV file to write")


def check_out_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise FedLRMError(f"--out {path} is a file; give the folder to write the evaluation into")


__all__ = ["IMAGE_EXTENSIONS", "Images", "PersonalizedClassifier", "Prediction", "adapter_folder",
           "collect_images", "evaluation", "labelled_images", "load_personalized", "map_labels",
           "plot_confusion", "predict_images", "prediction_rows", "top_classes", "write_evaluation"]
