"""The work of one client and of the server in a round, shared by every runtime.

Nothing here knows which algorithm runs: it builds the model the algorithm asks for,
trains with the algorithm's loss, and moves the state the algorithm names.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedlrm.adapters import (adapter_parameters, get_state, inject_adapters, reset_adapters, set_state,
                             strip_adapters)
from fedlrm.adapters.inject import block_indices
from fedlrm.algorithms import Algorithm, ClientRound, ServerState, State
from fedlrm.config import RunConfig, TrainConfig
from fedlrm.errors import ConfigError
from fedlrm.federation.wire import decode, encode
from fedlrm.models import Backbone, ClipClassifier
from fedlrm.models.backbone import check_fits
from fedlrm.models.frozen_prefix import cacheable_start, prefix_hidden
from fedlrm.seeding import derive_seed


@dataclass
class ModelBundle:
    """A client-side model with the names of its shared and private adapter weights."""

    model: ClipClassifier
    shared_keys: list[str]
    private_keys: list[str]
    adapted_modules: list[str] = field(default_factory=list)
    layout: object = None


def build_model(backbone: Backbone, class_names: list[str], cfg: RunConfig, algorithm: Algorithm) -> ModelBundle:
    """The classifier with the algorithm's adapters on the configured image-encoder layers.
    Settings that do not fit this model are refused here, before a run writes anything."""
    check_fits(backbone, cfg.model, cfg.adapter.rank)
    backbone.set_activation_checkpointing(use_activation_checkpointing(backbone, cfg.train, cfg.model.target_layers))
    bundle = ModelBundle(ClipClassifier(backbone, class_names, cfg.model.prompt), [], [])
    adapt(bundle, algorithm, cfg, algorithm.layout_of({}))
    if algorithm.trains:
        algorithm.check_model(bundle.adapted_modules)
    return bundle


CHECKPOINT_ABOVE_BYTES = 2 * 2**30


def use_activation_checkpointing(backbone: Backbone, cfg: TrainConfig, target_layers: list[int] = ()) -> bool:
    """The setting, or in auto mode whether a step would keep more than 2 GiB of activations
    (unknown sizes count as large: running out of memory is worse than running slower).
    Only blocks from the lowest adapted one up keep activations for the backward pass."""
    if cfg.activation_checkpointing is not None:
        return cfg.activation_checkpointing
    estimate = backbone.activation_bytes(cfg.batch_size)
    if estimate is None:
        return True
    blocks = backbone.blocks()
    if target_layers and blocks:
        lowest = min(block_indices(target_layers, len(blocks)))
        estimate = estimate * (len(blocks) - lowest) / len(blocks)
    return estimate > CHECKPOINT_ABOVE_BYTES


def adapt(bundle: ModelBundle, algorithm: Algorithm, cfg: RunConfig, layout: object) -> None:
    """(Re)place the algorithm's adapters of `layout` on the target layers."""
    model = bundle.model
    strip_adapters(model.image_encoder)
    if model.text_encoder is not None:
        strip_adapters(model.text_encoder)
    bundle.adapted_modules = []
    if algorithm.trains:
        encoders = cfg.model.adapt_encoders
        if "image" in encoders:
            bundle.adapted_modules = inject_adapters(model.image_encoder, cfg.model.target_modules,
                                                     lambda linear: algorithm.make_layer(linear, layout),
                                                     cfg.model.target_layers)
        context = algorithm.make_prompt(model.backbone.text_width(), layout, model.text_features.shape[-1])
        model.live_text("text" in encoders, context)
        if "text" in encoders:  # the same modules (q, v) in every text block
            inject_adapters(model.text_encoder[0], model.backbone.text_target_modules(cfg.model.target_modules),
                            lambda linear: algorithm.make_layer(linear, layout))
        model.to(model.text_features.device)
    keys = list(adapter_parameters(model))
    bundle.shared_keys = [k for k in keys if algorithm.is_shared(k)]
    bundle.private_keys = [k for k in keys if not algorithm.is_shared(k)]
    bundle.layout = layout


def load_client(bundle: ModelBundle, algorithm: Algorithm, cfg: RunConfig, client_id: int, private: State,
                received: State, server_round: int) -> ClientRound:
    """Put one client's state in the model: its private weights, then what it received for
    `server_round`; returns the round as the algorithm's client-side hooks see it.

    If the message implies another adapter layout, the adapters are rebuilt first, and
    private weights the new layout has but the client does not yet (e.g. a router that
    appears after clustering) start from a seed of (run seed, layout, client)."""
    layout = algorithm.layout_of(received)
    if layout != bundle.layout:
        adapt(bundle, algorithm, cfg, layout)
    if any(k not in private for k in bundle.private_keys):
        reset_adapters(bundle.model, derive_seed(cfg.seed, "init", repr(layout), "client", client_id))
    keep = set(bundle.private_keys)
    set_state(bundle.model, {k: v for k, v in private.items() if k in keep})
    ctx = ClientRound(client_id, server_round, received)
    algorithm.receive(bundle.model, ctx)
    return ctx


def initial_private(bundle: ModelBundle, algorithm: Algorithm, cfg: RunConfig, client_id: int) -> State:
    """A client's private weights before its first round: a function of (run seed, client) only,
    so every runtime and a client that lost its state start from the same ones."""
    if bundle.layout != algorithm.layout_of({}):
        adapt(bundle, algorithm, cfg, algorithm.layout_of({}))
    reset_adapters(bundle.model, derive_seed(cfg.seed, "init", "client", algorithm.private_init_key(client_id)))
    return get_state(bundle.model, bundle.private_keys)


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """The torch device a setting names, refused (a ConfigError naming `key` and the devices this
    machine has) when it is not here; ask before loading a model, which can take long."""
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    here = ["auto", "cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(gpus)] if cuda else []) + (["mps"] if mps else [])
    if name == "auto":
        return torch.device("cuda" if cuda else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{key}={name!r} is not a device; this machine has: {', '.join(here)}") from None
    if device.type == "cuda" and not cuda:
        why = "this torch build has no CUDA, or no GPU is visible"
    elif device.type == "cuda" and device.index is not None and device.index >= gpus:
        why = f"there {'is' if gpus == 1 else 'are'} {gpus} GPU(s)"
    elif device.type == "mps" and not mps:
        why = "MPS (Apple GPUs) is not available here"
    elif device.type not in ("cpu", "cuda", "mps"):
        why = f"fedlrm runs on cpu, cuda or mps, not {device.type}"
    else:
        return device
    raise ConfigError(f"{key}={name!r} is not available on this machine ({why}); choose one of {', '.join(here)}")


def autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def lr_at(cfg: TrainConfig, progress: float) -> float:
    """Learning rate at a fraction `progress` of the whole run (cosine decays to zero)."""
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return cfg.lr


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class TrainStats:
    loss: float
    examples: int
    steps: int
    seconds: float
    #: time in forward, backward and optimiser steps (and in filling the frozen-prefix cache)
    compute_seconds: float = 0.0
    #: the image-encoder block training started from (0: the whole encoder ran every step)
    cached_from_block: int = 0


@contextmanager
def training_only(model: nn.Module, keys: list[str]) -> Iterator[None]:
    """Within the block only the adapter weights named in `keys` train, of those trainable now
    (an algorithm's `receive` may have frozen some); the others are frozen, and every weight is
    as trainable as before afterwards. A new client adapts so (`Algorithm.newcomer_trains`)."""
    params = adapter_parameters(model)
    before = {k: p.requires_grad for k, p in params.items()}
    keep = set(keys)
    for k, p in params.items():
        p.requires_grad_(before[k] and k in keep)
    try:
        yield
    finally:
        for k, p in params.items():
            p.requires_grad_(before[k])


def train_step(model: ClipClassifier, algorithm: Algorithm, inputs: torch.Tensor, labels: torch.Tensor,
               ctx: ClientRound, optimizer: torch.optim.Optimizer, cfg: TrainConfig, start_block: int = 0) -> float:
    """One optimiser step on a batch; returns the batch's cross-entropy. `inputs` are images,
    or with `start_block` > 0 the cached hidden states entering that block."""
    device = labels.device
    with autocast(cfg, device):
        logits = model(inputs) if start_block == 0 else model.forward_from(inputs, start_block)
    loss = F.cross_entropy(logits.float(), labels)
    extra = algorithm.regularizer(model, ctx)
    total = loss if extra is None else loss + extra
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return loss.item()


def train_locally(model: ClipClassifier, algorithm: Algorithm, train_set, ctx: ClientRound,
                  cfg: RunConfig, epochs: int | None = None) -> TrainStats:
    """Local epochs of one client in one round. Every random number comes from seeds
    derived from (run seed, round, client), so a resumed run replays a round exactly.

    `epochs` (a new client adapting after the run): that many epochs, with a learning-rate
    schedule of their own from train.lr, rather than train.local_epochs at this round's point
    of the run's schedule (which ends at zero after the last round)."""
    t = cfg.train
    seed = derive_seed(cfg.seed, "train", ctx.server_round, ctx.client_id)
    torch.manual_seed(seed)  # dropout
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in adapter_parameters(model).values() if p.requires_grad]
    optimizer = make_optimizer(params, t)
    steps_per_epoch = math.ceil(len(train_set) / t.batch_size)
    if epochs is None:
        epochs = t.local_epochs
        total_steps = t.rounds * t.local_epochs * steps_per_epoch
        step = (ctx.server_round - 1) * t.local_epochs * steps_per_epoch
    else:
        total_steps, step = epochs * steps_per_epoch, 0
    device = next(model.buffers()).device
    model.train()
    start, compute, loss_sum, seen = time.perf_counter(), 0.0, 0.0, 0
    first = cacheable_start(model, cfg.data.augment) if t.cache_frozen_features else 0
    if first:
        t0 = time.perf_counter()
        hidden = prefix_hidden(model, train_set, first, t.batch_size, t.precision, lambda: autocast(t, device))
        compute += time.perf_counter() - t0
    for _ in range(epochs):
        if first:
            batches = ((hidden[i], train_set.labels[i]) for i in
                       train_set.index_batches(t.batch_size, shuffle=True, generator=generator))
        else:
            batches = train_set.batches(t.batch_size, shuffle=True, generator=generator, augment=cfg.data.augment)
        for inputs, labels in batches:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(t, step / total_steps)
            inputs, labels = inputs.to(device), labels.to(device)
            t0 = time.perf_counter()
            loss = train_step(model, algorithm, inputs, labels, ctx, optimizer, t, first)
            compute += time.perf_counter() - t0
            loss_sum += loss * len(labels)
            seen += len(labels)
            step += 1
    model.eval()
    return TrainStats(loss_sum / max(seen, 1), seen, step, time.perf_counter() - start, compute, first)


@torch.no_grad()
def evaluate(model: nn.Module, image_set, batch_size: int = 256, cfg: TrainConfig | None = None) -> dict:
    """Accuracy and mean cross-entropy over an image set (logits over all classes)."""
    model.eval()
    device = next(model.buffers()).device
    correct, loss_sum, n, forward = 0, 0.0, 0, 0.0
    for images, labels in image_set.batches(batch_size):
        images, labels = images.to(device), labels.to(device)
        t0 = time.perf_counter()
        with autocast(cfg or TrainConfig(), device):
            logits = model(images).float()
        forward += time.perf_counter() - t0
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == labels).sum().item()
        n += len(labels)
    return {"accuracy": correct / n if n else float("nan"), "loss": loss_sum / n if n else float("nan"),
            "correct": correct, "examples": n, "forward_seconds": forward}


@dataclass
class ClientResult:
    upload: bytes  # what the client sends back: the serialised upload
    private: State  # what stays on the client for the next round
    stats: TrainStats


def client_round(bundle: ModelBundle, algorithm: Algorithm, cfg: RunConfig, train_set, private: State,
                 message: bytes, round_index: int, client_id: int) -> ClientResult:
    """One client's round: receive the server's bytes, train, answer with bytes."""
    ctx = load_client(bundle, algorithm, cfg, client_id, private, decode(message), round_index)
    stats = train_locally(bundle.model, algorithm, train_set, ctx, cfg)
    upload = encode({**algorithm.upload(bundle.model, bundle.shared_keys, ctx),
                     **algorithm.client_report(bundle.model, train_set, ctx)})
    return ClientResult(upload, get_state(bundle.model, bundle.private_keys), stats)


def personalize(bundle: ModelBundle, algorithm: Algorithm, cfg: RunConfig, client_id: int, private: State,
                server: ServerState, server_round: int) -> nn.Module:
    """The model a client evaluates with after `server_round`: its private weights plus what the
    server sends it then."""
    message = algorithm.message_for(server, client_id, server_round)
    load_client(bundle, algorithm, cfg, client_id, private, message, server_round)
    return bundle.model
