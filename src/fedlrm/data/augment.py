"""Train-time augmentation on preprocessed image tensors.

A random resized crop (area fraction in `scale`, aspect ratio in `ratio`, as torchvision's
RandomResizedCrop) resampled bilinearly back to the input size, then a horizontal flip
with probability 1/2. Both are one affine resampling per image (`grid_sample`), done for
the whole batch at once; crop and flip commute with per-channel normalisation, so the
tensors may already be normalised. All random numbers come from `generator`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_resized_crop_flip(images: torch.Tensor, generator: torch.Generator | None = None,
                             scale: tuple[float, float] = (0.5, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3),
                             flip_p: float = 0.5) -> torch.Tensor:
    """Augment a batch (b, c, h, w); returns a new tensor of the same shape and dtype.

    The crop is continuous (sub-pixel position and size); where the sampled aspect ratio
    would make a side exceed the image, that side is clipped to the full image."""
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images (b, c, h, w), got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    if b == 0:
        return images.clone()
    draws = torch.rand(5, b, generator=generator, dtype=torch.float64)
    area = scale[0] + (scale[1] - scale[0]) * draws[0]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws[1])  # crop width / height in pixels
    frac_w = torch.sqrt(area * aspect * h / w).clamp(max=1.0)
    frac_h = torch.sqrt(area / aspect * w / h).clamp(max=1.0)
    left = draws[2] * (1 - frac_w)
    top = draws[3] * (1 - frac_h)
    flip = torch.where(draws[4] < flip_p, -1.0, 1.0).to(torch.float64)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    # Output coordinate u in [-1, 1] samples input x = frac * u + centre (normalised coords).
    theta[:, 0, 0] = frac_w * flip
    theta[:, 0, 2] = 2 * left + frac_w - 1
    theta[:, 1, 1] = frac_h
    theta[:, 1, 2] = 2 * top + frac_h - 1
    work = images if images.is_floating_point() else images.float()
    grid = F.affine_grid(theta.to(work.dtype), list(work.shape), align_corners=False)
    out = F.grid_sample(work, grid.to(work.device), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.to(images.dtype)
