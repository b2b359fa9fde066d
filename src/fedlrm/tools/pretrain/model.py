"""The recipe's model: a small transformers CLIPModel, its image processor, the
prompt-classification pretraining loop and the check that the saved model reloads to the
same predictions."""

from __future__ import annotations

import contextlib
import math
import tempfile
from pathlib import Path

from fedlrm.tools.pretrain.data import IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD
from fedlrm.tools.pretrain.tokenizer import EVAL_TEMPLATE, MAX_TEXT_LENGTH, TRAIN_TEMPLATES

MODEL_SHAPE = dict(
    vision_width=128, vision_layers=4, vision_heads=4, patch_size=4,
    text_width=128, text_layers=3, text_heads=4, projection_dim=128,
)
WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 0.05
MAX_LOGIT_SCALE = 100.0


def build_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=IMAGE_MEAN, image_std=IMAGE_STD, do_convert_rgb=True,
    )


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


def reload_check(model_dir: Path, subset_test: Path, recipe_logits, recipe_pixels, class_names) -> dict:
    """Zero-shot accuracy on the written test subset through from_pretrained + datasets."""
    import datasets
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    with quiet_libraries(), tempfile.TemporaryDirectory() as cache:
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
