"""Shared fixtures: tiny real CLIPModel and VisionTextDualEncoderModel directories and a tiny image
dataset on disk."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Flower must not install packages, look for updates or send telemetry (no network here).
for _flag, _value in (("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                      ("FLWR_TELEMETRY_ENABLED", "0")):
    os.environ.setdefault(_flag, _value)
torch.set_num_threads(min(2, torch.get_num_threads()))

CLASSES = ["red", "green", "blue", "yellow", "white", "black"]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30), (235, 235, 235), (20, 20, 20)]


def make_tiny_clip_dir(path, image_size=16, layers=2, hidden=32):
    """A real transformers CLIPModel with random weights, a word-level tokenizer and an
    image processor, saved like any CLIP checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        PreTrainedTokenizerFast,
    )

    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "a", "photo", "of", "the", "."] + CLASSES
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                        bos_token="[BOS]", eos_token="[EOS]")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=len(words), max_position_embeddings=16,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=image_size, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       ).save_pretrained(path)
    return path


def make_tiny_dual_encoder_dir(path, image_size=16, layers=2, hidden=32, text_pooling="mean"):
    """A real transformers VisionTextDualEncoderModel with random weights: CLIP's ViT beside a BERT
    text model with its own WordPiece tokenizer (the built-in model's classes, in miniature)."""
    from transformers import (BertConfig, BertTokenizerFast, CLIPImageProcessor, CLIPVisionConfig,
                              VisionTextDualEncoderConfig, VisionTextDualEncoderModel)

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "x", "."] + CLASSES
    vocab_file = path / "vocab.txt"
    path.mkdir(parents=True, exist_ok=True)
    vocab_file.write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=2, image_size=image_size, patch_size=8)
    text = BertConfig(vocab_size=len(words), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=2 * hidden, max_position_embeddings=32)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=16)
    config.text_pooling = text_pooling
    VisionTextDualEncoderModel(config).save_pretrained(path)
    vocab_file.unlink()
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       ).save_pretrained(path)
    return path


def jpeg_bytes(colour, rng, size=20):
    noise = rng.integers(-25, 25, size=(size, size, 3))
    arr = np.clip(np.array(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def make_parquet_dataset(folder, per_class_train=12, per_class_test=8, seed=0):
    """Train/test parquet files in the Hugging Face image layout, one colour per class."""
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    paths = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        images, labels = [], []
        for label, colour in enumerate(COLOURS):
            for i in range(per_class):
                images.append({"bytes": jpeg_bytes(colour, rng), "path": f"{CLASSES[label]}_{i}.jpg"})
                labels.append(label)
        ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        paths[split] = str(folder / f"{split}.parquet")
        ds.to_parquet(paths[split])
    return paths


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """A run with train.threads (or a ClientApp) sets torch's thread count for the process; every
    test starts with the count this test process had."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    return str(make_tiny_clip_dir(tmp_path_factory.mktemp("tiny-clip")))


@pytest.fixture(scope="session")
def tiny_dual_dir(tmp_path_factory):
    return str(make_tiny_dual_encoder_dir(tmp_path_factory.mktemp("tiny-dual")))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    return make_parquet_dataset(tmp_path_factory.mktemp("colours"))


@pytest.fixture
def tiny_overrides(tiny_clip_dir, tiny_dataset, tmp_path):
    """Config overrides for a seconds-long federation on the tiny model and data."""
    return [
        f"model.name={tiny_clip_dir}", "data.source=parquet",
        f"data.train={tiny_dataset['train']}", f"data.test={tiny_dataset['test']}",
        "data.num_clients=3", "data.shards_per_client=2", "data.shots=4", "data.test_per_client=8",
        "train.rounds=3", "train.local_epochs=1", "train.batch_size=8", "train.lr=0.01",
        "adapter.rank=4", "fedlrm.local_rank=2", "apfl.local_rank=2", f"output_dir={tmp_path / 'runs'}", "seed=3",
    ]


@pytest.fixture
def round_one(tiny_overrides):
    """Round 1 of a 4-client fedlrm run, trained but not yet checked: the simulation, the server
    state, the messages sent and the clients' honest replies."""
    from fedlrm.algorithms import load_config
    from fedlrm.federation.simulation import Simulation
    from fedlrm.federation.wire import encode

    cfg = load_config(None, tiny_overrides + ["algorithm=fedlrm", "data.num_clients=4", "data.shards_per_client=1"])
    sim = Simulation(cfg, progress=False)
    state = sim.server.initial_state()
    sent = {c: encode(sim.algorithm.message_for(state, c, 1)) for c in range(4)}
    replies = {c: sim.clients[c].train(1, sent[c]) for c in range(4)}
    return sim, state, sent, replies


@pytest.fixture
def cli_logging():
    """Undo what `fedlrm.cli.main` sets up on the fedlrm logger, so later tests see it as before."""
    import logging

    logger = logging.getLogger("fedlrm")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
