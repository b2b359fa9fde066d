"""The offline pretraining recipe of the built-in tiny CLIP (`builtin:tiny-clip`).

Pretrained CLIP weights cannot be downloaded where this project is developed, so the
package ships a small CLIP-style model that this seeded recipe pretrains from scratch
on offline CIFAR-10 (``../shared/datasets``), together with the small CIFAR-10 subset
that the built-in default federates on. One run writes, under ``--out`` (default: the
package's ``assets/`` folder):

``cifar10-subset/``
    ``train.parquet`` (``--subset-train-per-class`` images per class of the CIFAR-10
    train split), ``test.parquet`` (``--subset-test-per-class`` per class of the test
    split), in the Hugging Face image layout with the ``huggingface`` schema metadata
    (``datasets`` reads the label as a ClassLabel with the class names), and
    ``SOURCE.json``: the selection rule, seed and source row indices.
``tiny-clip/``
    a ``transformers`` CLIPModel directory (``config.json``, ``model.safetensors``),
    its tokenizer and image processor, all loadable offline with ``from_pretrained``,
    and ``PRETRAIN.json``: arguments, seed, wall time, library versions, the rows used
    for pretraining and the zero-shot accuracies.

The recipe, step by step (everything random draws from ``--seed``):

1. Subset. For each class, the train (test) rows of that class are permuted with
   ``numpy.random.default_rng([seed, 1])`` (``[seed, 2]`` for test), classes in label
   order, and the first ``--subset-train-per-class`` (``--subset-test-per-class``)
   are kept.
2. Pretraining images. The train rows NOT in the subset are permuted with
   ``default_rng([seed, 3])`` and the first ``--pretrain-images`` are used, so the
   federated train subset is disjoint from every pretraining image by construction
   (checked again before writing).
3. Tokenizer. A lower-casing BPE (CLIP-style ``</w>`` word ends) learned by a small
   deterministic learner in this file on a word corpus of prompt templates and the
   CIFAR-10, CIFAR-100 and Caltech101 class names, with the letters, digits and
   common punctuation as base symbols: an unseen word falls apart into learned
   sub-words or letters, never into a single unknown token. Special tokens: ``<|pad|>``
   0, ``<|unk|>`` 1, ``<|startoftext|>`` 2, ``<|endoftext|>`` 3 (every text is wrapped
   in bos ... eos). The eos id is deliberately not 2: ``transformers`` treats
   ``eos_token_id == 2`` as the legacy "pool at the largest id" rule; any other id
   pools at the first eos position, which is what we want.
4. Model. A random ``CLIPModel`` (``torch.manual_seed(seed)``): ViT image tower (32 px,
   patch 4, width 128, 4 blocks, 4 heads, MLP 4x), causal text transformer (width
   128, 3 blocks, 4 heads, 32 positions), projection 128, learnable logit scale.
5. Loss: prompt classification. Per step, one prompt template is drawn from
   ``TRAIN_TEMPLATES``; the text tower encodes that template for the 10 class names;
   the loss is the cross-entropy of ``logit_scale * cos(image feature, text feature)``
   against the image labels. Both towers, the projections and the logit scale
   (clamped at 100) are trained. AdamW (weight decay 0.05 on matrices only), linear
   warm-up over the first 5% of steps, cosine decay to zero. Augmentation on the
   normalised tensors: random crop of the 4-pixel zero-padded image (zero is the mean
   colour after normalisation) and horizontal flip.
6. Preprocessing is the one ``preprocessor_config.json`` performs at load time:
   JPEG -> RGB -> (32x32, so resize and centre crop leave it unchanged) -> times
   1/255 in float64, cast to float32 -> (x - mean) / std in float32. After saving,
   the recipe reloads the directory with ``CLIPModel/AutoTokenizer/AutoImageProcessor
   .from_pretrained``, reads the written test subset with ``datasets`` and recomputes
   the zero-shot accuracy, which must agree with the recipe's own number.
7. Zero-shot accuracy with ``"a photo of a {}."`` on the full CIFAR-10 test split and
   on the shipped test subset.

Reproducibility: two runs with the same arguments (including ``--threads``) on the
same machine and library versions give identical weights.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from fedlrm.errors import DataError, FedLRMError

RECIPE_VERSION = 1
TRAIN_FILE = "cifar10-train.parquet"
TEST_FILE = "cifar10-test.parquet"
IMAGE_SIZE = 32
# CIFAR-10 channel statistics (train split); what preprocessor_config.json normalises with.
IMAGE_MEAN = [0.4914, 0.4822, 0.4465]
IMAGE_STD = [0.2470, 0.2435, 0.2616]
MAX_TEXT_LENGTH = 32
PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]  # ids 0, 1, 2, 3
EVAL_TEMPLATE = "a photo of a {}."
TRAIN_TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of the {}.",
    "a cropped photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a pixelated photo of the {}.",
    "a good photo of the {}.",
    "itap of a {}.",
]
# Extra templates (the CLIP ImageNet prompt set) that only feed the tokenizer's corpus.
CORPUS_TEMPLATES = TRAIN_TEMPLATES + [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a rendering of a {}.", "graffiti of a {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a jpeg corrupted photo of a {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "the origami {}.", "a sketch of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of a large {}.", "a photo of a nice {}.", "a photo of a weird {}.", "a cartoon {}.",
    "art of a {}.", "a plushie {}.", "a photo of the small {}.", "this is a photo of an {}.",
    "a centered satellite photo of {}.", "a photo of a {}, a type of animal.", "a photo of a {}, a type of pet.",
    "a photo of a {}, a type of flower.", "a photo of a {}, a type of food.", "a photo of a {}, a type of aircraft.",
    "a photo of a {}, a type of vehicle.", "a photo of a {} texture.", "a photo of a person doing {}.",
]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Copied from the `huggingface` metadata of ../shared/datasets/caltech101-train.parquet, so
# that the tokenizer does not depend on which files a data directory happens to hold.
CALTECH101_NAMES = [
    "BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "Motorbikes", "accordion", "airplanes", "anchor",
    "ant", "barrel", "bass", "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly",
    "camera", "cannon", "car_side", "ceiling_fan", "cellphone", "chair", "chandelier", "cougar_body",
    "cougar_face", "crab", "crayfish", "crocodile", "crocodile_head", "cup", "dalmatian", "dollar_bill",
    "dolphin", "dragonfly", "electric_guitar", "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo",
    "flamingo_head", "garfield", "gerenuk", "gramophone", "grand_piano", "hawksbill", "headphone", "hedgehog",
    "helicopter", "ibis", "inline_skate", "joshua_tree", "kangaroo", "ketch", "lamp", "laptop", "llama",
    "lobster", "lotus", "mandolin", "mayfly", "menorah", "metronome", "minaret", "nautilus", "octopus", "okapi",
    "pagoda", "panda", "pigeon", "pizza", "platypus", "pyramid", "revolver", "rhino", "rooster", "saxophone",
    "schooner", "scissors", "scorpion", "sea_horse", "snoopy", "soccer_ball", "stapler", "starfish",
    "stegosaurus", "stop_sign", "strawberry", "sunflower", "tick", "trilobite", "umbrella", "watch",
    "water_lilly", "wheelchair", "wild_cat", "windsor_chair", "wrench", "yin_yang",
]
CIFAR100_NAMES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl",
    "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair",
    "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin",
    "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp",
    "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck",
    "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]
TOKEN_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.,'-!?&()/:;\"+#%*="
TOKEN_VOCAB_SIZE = 1024
MODEL_SHAPE = dict(
    vision_width=128, vision_layers=4, vision_heads=4, patch_size=4,
    text_width=128, text_layers=3, text_heads=4, projection_dim=128,
)
WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 0.05
MAX_LOGIT_SCALE = 100.0


# ----------------------------------------------------------------------------- CLI


def default_data_dir() -> Path:
    return (Path.cwd() / ".." / "shared" / "datasets").resolve()


def default_out_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("fedlrm") / "assets"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `fedlrm pretrain` options (also used by `python -m fedlrm.pretrain`)."""
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


def resolve_data_dir(data: str | os.PathLike | None) -> Path:
    path = default_data_dir() if data is None else Path(data).expanduser().resolve()
    missing = [f for f in (TRAIN_FILE, TEST_FILE) if not (path / f).is_file()]
    if missing:
        where = "the default ../shared/datasets (relative to the current directory)" if data is None else "--data"
        raise DataError(
            f"{', '.join(missing)} not found in {path} ({where}). Pass --data DIR pointing at the directory "
            f"that holds {TRAIN_FILE} and {TEST_FILE} (Hugging Face image parquet: columns image, label)."
        )
    return path


# ------------------------------------------------------------------------ data


def _class_names(table) -> list[str]:
    meta = (table.schema.metadata or {}).get(b"huggingface")
    if meta is None:
        raise DataError("parquet file has no `huggingface` schema metadata with the class names")
    return list(json.loads(meta)["info"]["features"]["label"]["names"])


def read_split(path: Path):
    """The pyarrow table, the labels (numpy int64) and the class names of a split."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:
        raise DataError(f"cannot read {path}: {err}") from err
    if "image" not in table.column_names or "label" not in table.column_names:
        raise DataError(f"{path} needs columns `image` and `label`, has {table.column_names}")
    labels = table.column("label").to_numpy().astype(np.int64)
    return table, labels, _class_names(table)


def decode_images(table, rows: Iterable[int]) -> np.ndarray:
    """JPEG bytes of the given rows -> uint8 array (N, 32, 32, 3), RGB."""
    from PIL import Image

    column = table.column("image").combine_chunks().field("bytes")
    rows = list(rows)
    out = np.empty((len(rows), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, r in enumerate(rows):
        with Image.open(io.BytesIO(column[int(r)].as_py())) as im:
            im = im.convert("RGB")
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                raise DataError(f"row {r} is {im.size[0]}x{im.size[1]}; the recipe expects 32x32 CIFAR-10 images")
            out[i] = np.asarray(im)
    return out


def to_pixel_values(images: np.ndarray):
    """uint8 (N, H, W, 3) -> normalised float32 (N, 3, H, W), bit for bit what the saved
    CLIPImageProcessor computes for a 32x32 RGB image (rescale in float64, then float32)."""
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float64) * (1 / 255)
    x = x.to(torch.float32)
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def select_subset(labels: np.ndarray, per_class: int, num_classes: int, seed: int, stream: int,
                  split: str) -> np.ndarray:
    """Sorted row indices: `per_class` rows of each class, the first of a seeded permutation."""
    rng = np.random.default_rng([seed, stream])
    chosen = []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        if len(rows) < per_class:
            raise DataError(f"the {split} split has {len(rows)} images of class {c}; the subset needs {per_class}")
        chosen.append(rng.permutation(rows)[:per_class])
    return np.sort(np.concatenate(chosen))


def select_pretrain(num_rows: int, excluded: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted row indices of `count` train rows outside `excluded` (a seeded choice)."""
    pool = np.setdiff1d(np.arange(num_rows), excluded)
    if count > len(pool):
        raise DataError(f"--pretrain-images {count} is more than the {len(pool)} train images outside the subset")
    return np.sort(np.random.default_rng([seed, 3]).permutation(pool)[:count])


def encode_indices(indices: np.ndarray, num_rows: int) -> str:
    """A set of row indices as base64 of a little-endian bitmap (row i -> bit i)."""
    bits = np.zeros(num_rows, dtype=bool)
    bits[indices] = True
    return base64.b64encode(np.packbits(bits, bitorder="little").tobytes()).decode()


def decode_indices(bitmap: str, num_rows: int) -> np.ndarray:
    """The inverse of `encode_indices`: sorted row indices."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(bitmap), dtype=np.uint8), bitorder="little")
    return np.flatnonzero(bits[:num_rows])


def pretrain_indices(pretrain_json: dict) -> np.ndarray:
    """The pretraining train-row indices recorded in a PRETRAIN.json dict."""
    info = pretrain_json["pretrain_rows"]
    return decode_indices(info["bitmap"], info["num_rows"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _indices_digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def write_subset(table, rows: np.ndarray, path: Path) -> None:
    """The given rows, in the source's layout and schema metadata (HF ClassLabel names)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sub = table.take(pa.array(rows, type=pa.int64()))
    sub = sub.replace_schema_metadata(table.schema.metadata)
    pq.write_table(sub, path)


# ------------------------------------------------------------------- tokenizer


def _normalise_text(text: str) -> str:
    import unicodedata

    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return text.lower().replace("_", " ")


def tokenizer_corpus() -> Counter:
    """Word frequencies the BPE is learned from: templates and class-name vocabularies."""
    import re

    words: Counter = Counter()
    pattern = re.compile(r"\w+|[^\w\s]+")
    texts = [t.replace("{}", " ") for t in CORPUS_TEMPLATES]
    texts += CIFAR10_NAMES + CIFAR100_NAMES + CALTECH101_NAMES
    for text in texts:
        for word in pattern.findall(_normalise_text(text)):
            word = "".join(ch for ch in word if ch in TOKEN_ALPHABET)
            if word:
                words[word] += 1
    return words


def learn_bpe(word_freqs: Counter, vocab_size: int = TOKEN_VOCAB_SIZE) -> tuple[dict[str, int], list]:
    """A plain, deterministic BPE learner (ties broken by the pair's text)."""
    vocab = list(SPECIAL_TOKENS)
    for ch in sorted(set(TOKEN_ALPHABET)):
        vocab += [ch, ch + "</w>"]
    known = set(vocab)
    words = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(word_freqs)}
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        counts: Counter = Counter()
        for w, syms in words.items():
            for pair in zip(syms, syms[1:]):
                counts[pair] += word_freqs[w]
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merged = best[0] + best[1]
        merges.append(best)
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        for w, syms in words.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == best[0] and syms[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = tuple(out)
    return {tok: i for i, tok in enumerate(vocab)}, merges


def build_tokenizer():
    """A `PreTrainedTokenizerFast` (bos ... eos, right padding, 32 tokens at most)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = learn_bpe(tokenizer_corpus())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase(), normalizers.Replace("_", " "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B:1 {EOS}:1",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=MAX_TEXT_LENGTH, padding_side="right",
    )


def build_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=IMAGE_MEAN, image_std=IMAGE_STD, do_convert_rgb=True,
    )


# ----------------------------------------------------------------------- model


def build_model(tokenizer, seed: int):
    import torch
    from transformers import CLIPConfig, CLIPModel

    s = MODEL_SHAPE
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=s["text_width"], intermediate_size=4 * s["text_width"],
            num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
            max_position_embeddings=MAX_TEXT_LENGTH, projection_dim=s["projection_dim"],
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=s["vision_width"], intermediate_size=4 * s["vision_width"],
            num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
            image_size=IMAGE_SIZE, patch_size=s["patch_size"], projection_dim=s["projection_dim"],
        ),
        projection_dim=s["projection_dim"],
    )
    torch.manual_seed(seed)
    return CLIPModel(config)


def _pooled(out):
    """`get_*_features` return a tensor (transformers 4) or an output with pooler_output (5)."""
    return out if hasattr(out, "dim") else out.pooler_output


def image_features(model, pixel_values):
    import torch.nn.functional as F

    return F.normalize(_pooled(model.get_image_features(pixel_values=pixel_values)), dim=-1)


def text_features(model, tokens):
    import torch.nn.functional as F

    out = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return F.normalize(_pooled(out), dim=-1)


def zero_shot_logits(model, tokenizer, pixel_values, class_names, template=EVAL_TEMPLATE, batch_size=500):
    import torch

    model.eval()
    with torch.inference_mode():
        tokens = tokenizer([template.format(n) for n in class_names], padding=True, return_tensors="pt")
        text = text_features(model, tokens)
        scale = model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        chunks = [scale * image_features(model, pixel_values[i:i + batch_size]) @ text.T
                  for i in range(0, len(pixel_values), batch_size)]
    return torch.cat(chunks)


def augment(x, generator, pad: int = 4):
    """Random crop of the zero-padded batch and random horizontal flip (per image)."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def _param_groups(model):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def train(model, tokenizer, pixel_values, labels, class_names, args, progress: bool) -> list[dict]:
    """The prompt-classification pretraining loop; returns per-epoch loss and accuracy."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(args.seed)
    labels = torch.as_tensor(labels)
    n = len(labels)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(WARMUP_FRACTION * total))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    optimizer = torch.optim.AdamW(_param_groups(model), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    prompts = [tokenizer([t.format(c) for c in class_names], padding=True, return_tensors="pt")
               for t in TRAIN_TEMPLATES]
    history = []
    model.train()
    bar = tqdm(total=total, desc="pretrain", unit="step", disable=not progress, dynamic_ncols=True)
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=generator)
        loss_sum, correct = 0.0, 0
        for start in range(0, n, args.batch_size):
            idx = order[start:start + args.batch_size]
            x = augment(pixel_values[idx], generator)
            y = labels[idx]
            tokens = prompts[int(torch.randint(len(prompts), (1,), generator=generator))]
            logits = model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * (
                image_features(model, x) @ text_features(model, tokens).T)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(-1) == y).sum())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        history.append({"epoch": epoch + 1, "loss": round(loss_sum / n, 4), "train_accuracy": round(correct / n, 4)})
        bar.write(f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / n:.4f}, "
                  f"train accuracy {correct / n:.4f}, logit scale {model.logit_scale.exp().item():.1f}")
    bar.close()
    model.eval()
    return history


# ------------------------------------------------------------ agreement check


@contextlib.contextmanager
def _quiet_libraries():
    """Hide transformers' and datasets' own progress bars and notices for a moment."""
    import datasets
    from transformers.utils import logging as hf_logging

    verbosity, hf_bars, ds_bars = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
                                   datasets.is_progress_bar_enabled())
    hf_logging.set_verbosity_error()  # e.g. "torchvision missing, using the PIL image processor"
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if hf_bars:
            hf_logging.enable_progress_bar()
        if ds_bars:
            datasets.enable_progress_bar()


def reload_check(model_dir: Path, subset_test: Path, recipe_logits, recipe_pixels, class_names) -> dict:
    """Zero-shot accuracy on the written test subset through from_pretrained + datasets."""
    import datasets
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    with _quiet_libraries(), tempfile.TemporaryDirectory() as cache:
        model = CLIPModel.from_pretrained(str(model_dir)).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        processor = AutoImageProcessor.from_pretrained(str(model_dir))
        ds = datasets.load_dataset("parquet", data_files={"test": str(subset_test)}, cache_dir=cache,
                                   split="test")
        names = ds.features["label"].names
        images = list(ds["image"])  # PIL images, decoded by datasets' Image feature
        labels = torch.tensor(list(ds["label"]))
        del ds
    if names != list(class_names):
        raise RuntimeError(f"the written subset's ClassLabel names {names} differ from {class_names}")
    pixels = torch.cat([processor(images=images[i:i + 500], return_tensors="pt")["pixel_values"]
                        for i in range(0, len(images), 500)]).float()
    logits = zero_shot_logits(model, tokenizer, pixels, names)
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    recipe_accuracy = (recipe_logits.argmax(-1) == labels).float().mean().item()
    return {
        "method": "CLIPModel/AutoTokenizer/AutoImageProcessor.from_pretrained on the saved directory, "
                  "datasets.load_dataset('parquet') on the written test subset",
        "image_processor_class": type(processor).__name__,
        "tokenizer_class": type(tokenizer).__name__,
        "accuracy_reloaded": round(accuracy, 4),
        "accuracy_recipe": round(recipe_accuracy, 4),
        "pixel_max_abs_diff": float((pixels - recipe_pixels).abs().max()),
        "logit_max_abs_diff": float((logits - recipe_logits).abs().max()),
        "same_predictions": int((logits.argmax(-1) == recipe_logits.argmax(-1)).sum()),
        "num_images": len(labels),
        "agree": accuracy == recipe_accuracy,
    }


# ------------------------------------------------------------------------ run


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
                      "source_sha256": _sha256(data / TRAIN_FILE), "per_class": args.subset_train_per_class,
                      "indices": subset_train.tolist()},
            "test": {"source_file": TEST_FILE, "source_rows": len(test_labels),
                     "source_sha256": _sha256(data / TEST_FILE), "per_class": args.subset_test_per_class,
                     "indices": subset_test.tolist()},
            "disjoint_from_pretraining": True,
            "recipe": "fedlrm.pretrain",
        }
        (subset_dir / "SOURCE.json").write_text(json.dumps(source, indent=1) + "\n")

        with _quiet_libraries():
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
            "recipe": "fedlrm.pretrain", "recipe_version": RECIPE_VERSION,
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
                              "count": len(pretrain_rows), "sha256_int64_le": _indices_digest(pretrain_rows),
                              "rule": "train rows not in cifar10-subset/train.parquet, permuted with "
                                      "numpy.random.default_rng([seed, 3]), first pretrain_images",
                              "encoding": "base64 of numpy.packbits(bitmap, bitorder='little'); "
                                          "fedlrm.pretrain.pretrain_indices(record) decodes it",
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
    parser = argparse.ArgumentParser(prog="python -m fedlrm.pretrain", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except FedLRMError as err:
        print(f"fedlrm pretrain: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
