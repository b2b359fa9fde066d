"""The recipe's model: a transformers VisionTextDualEncoderModel (CLIP's ViT beside the frozen
all-MiniLM-L6-v2), its image processor and the prompt-classification pretraining loop."""

from __future__ import annotations

import contextlib
import math

#: OpenAI CLIP's channel statistics (the processor normalises with them)
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 0.05
MAX_LOGIT_SCALE = 100.0
PAD = 8  # pixels of zero padding for the random-crop augmentation (at 64 px)
TRAIN_TEMPLATES = [
    "a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of the {}.",
    "a cropped photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.",
    "a bright photo of a {}.", "a pixelated photo of the {}.", "a good photo of the {}.", "itap of a {}.",
]
EVAL_TEMPLATE = "a photo of a {}."


def build_image_processor(image_size: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=IMAGE_MEAN, image_std=IMAGE_STD, do_convert_rgb=True,
    )


def pixel_values(processor, images, chunk: int = 500):
    """What the saved processor makes of PIL images at load time (float32, N x 3 x S x S)."""
    import torch

    return torch.cat([processor(images=images[i:i + chunk], return_tensors="pt")["pixel_values"]
                      for i in range(0, len(images), chunk)]).float()


def build_model(text_dir, shape: dict, seed: int):
    """A VisionTextDualEncoderModel: a random CLIP ViT (seeded), the pretrained text model,
    random projections, `text_pooling: mean` (the sentence-transformers pooling of the text model)."""
    import torch
    from transformers import (
        BertModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    vision_config = CLIPVisionConfig(
        hidden_size=shape["vision_width"], intermediate_size=4 * shape["vision_width"],
        num_hidden_layers=shape["vision_layers"], num_attention_heads=shape["vision_heads"],
        image_size=shape["image_size"], patch_size=shape["patch_size"])
    text_model = BertModel.from_pretrained(str(text_dir), add_pooling_layer=True)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision_config, text_model.config,
                                                                  projection_dim=shape["projection_dim"])
    config.text_pooling = "mean"
    torch.manual_seed(seed)
    vision_model = CLIPVisionModel(vision_config)
    model = VisionTextDualEncoderModel(config, vision_model=vision_model, text_model=text_model)
    model.config.text_pooling = "mean"
    for p in model.text_model.parameters():
        p.requires_grad_(False)
    return model


def text_embeddings(model, tokenizer, templates: list[str], names: list[str]):
    """The frozen text model's mean-pooled outputs, (templates, classes, width), through the
    dual-encoder backbone's own pooling."""
    import torch

    from fedlrm.models.backbone import pooled_text

    model.text_model.eval()
    out = []
    with torch.inference_mode():
        for template in templates:
            tokens = tokenizer([template.format(n) for n in names], padding=True, return_tensors="pt")
            out.append(pooled_text(model.text_model, tokens["input_ids"], tokens["attention_mask"], "mean"))
    return torch.stack(out)


def image_features(model, pixels):
    import torch.nn.functional as F

    pooled = model.vision_model(pixel_values=pixels).pooler_output
    return F.normalize(model.visual_projection(pooled).float(), dim=-1)


def text_features(model, embedded):
    import torch.nn.functional as F

    return F.normalize(model.text_projection(embedded), dim=-1)


def zero_shot_logits(model, pixels, embedded, batch_size: int = 500):
    """Logits of `pixels` against the classes of `embedded` (classes x width), in fp32."""
    import torch

    model.eval()
    with torch.inference_mode():
        text = text_features(model, embedded)
        scale = model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        return torch.cat([scale * image_features(model, pixels[i:i + batch_size]) @ text.T
                          for i in range(0, len(pixels), batch_size)])


def augment(x, generator, pad: int = PAD):
    """Random crop of the zero-padded batch (zero is the mean colour after normalisation) and a
    random horizontal flip, per image."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _param_groups(model):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def train(model, pixels, labels, domain, domain_of_class, embedded, args, progress: bool,
          domain_names: list[str], rows=None) -> list[dict]:
    """The prompt-classification loop. `labels` index the classes of all datasets together;
    `domain` (per image) and `domain_of_class` (per class) keep each image's softmax over its
    own dataset's classes. One template per step (`embedded[t]`). An epoch shows the images
    `rows` (indices into `pixels`, repeats allowed; default: each image once), in a fresh random
    order. Returns per-epoch figures."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(args.seed)
    labels, domain = torch.as_tensor(labels), torch.as_tensor(domain)
    foreign = domain[:, None] != torch.as_tensor(domain_of_class)[None, :]  # (images, classes)
    rows = torch.arange(len(labels)) if rows is None else torch.as_tensor(rows)
    n = len(rows)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(WARMUP_FRACTION * total))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    optimizer = torch.optim.AdamW(_param_groups(model), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    bf16 = args.precision == "bf16"
    history = []
    model.train()
    model.text_model.eval()  # frozen: no dropout
    bar = tqdm(total=total, desc="pretrain", unit="step", disable=not progress, dynamic_ncols=True)
    for epoch in range(args.epochs):
        order = rows[torch.randperm(n, generator=generator)]
        loss_sum = 0.0
        correct = torch.zeros(len(domain_names))
        seen = torch.zeros(len(domain_names))
        for start in range(0, n, args.batch_size):
            idx = order[start:start + args.batch_size]
            x = augment(pixels[idx], generator)
            y = labels[idx]
            template = int(torch.randint(len(embedded), (1,), generator=generator))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                image = image_features(model, x)
            text = text_features(model, embedded[template])
            logits = model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * (image @ text.T)
            logits = logits.masked_fill(foreign[idx], float("-inf"))
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))
            loss_sum += loss.item() * len(idx)
            hit = (logits.argmax(-1) == y).float()
            correct.index_add_(0, domain[idx], hit)
            seen.index_add_(0, domain[idx], torch.ones_like(hit))
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        accuracy = {d: round(float(correct[i] / seen[i].clamp_min(1)), 4) for i, d in enumerate(domain_names)}
        history.append({"epoch": epoch + 1, "loss": round(loss_sum / n, 4), "train_accuracy": accuracy,
                        "logit_scale": round(model.logit_scale.exp().item(), 2)})
        bar.write(f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / n:.4f}, train accuracy "
                  + ", ".join(f"{d} {a:.4f}" for d, a in accuracy.items())
                  + f", logit scale {model.logit_scale.exp().item():.1f}")
    bar.close()
    model.eval()
    return history


@contextlib.contextmanager
def quiet_libraries():
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
