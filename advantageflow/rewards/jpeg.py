"""DDPO's JPEG compressibility rewards (Black et al., "Training Diffusion Models with
Reinforcement Learning", ICLR 2024, Sec. 6.1).

The size of each image saved as JPEG at quality 95, in kilobytes (``bytes / 1000``), after
DDPO's 8-bit quantisation ``round(255 * x)``:

* ``jpeg_incompressibility``: ``+size_kB`` (rewards detail / noise);
* ``jpeg_compressibility``: ``-size_kB`` (rewards flat, simple images).

Not differentiable.
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torch import Tensor

from advantageflow.rewards.imageio import check_images, to_uint8


def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B,)`` JPEG sizes in kB (1 kB = 1000 bytes)."""
    sizes = []
    for arr in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegIncompressibility:
    """Reward = JPEG size in kB at ``quality`` (DDPO: 95).  ``(B, 3, H, W)`` -> ``(B,)``."""

    differentiable = False
    builds_cheaply = True  # validate builds it: the constructor's checks run before training
    sign = 1.0
    name = "jpeg_incompressibility"
    arg_ranges = {"quality": ((">=", 1), ("<=", 100))}

    def __init__(self, quality: int = 95) -> None:
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"{self.name}: quality must be in 1..100, got {quality}")
        self.quality = int(quality)

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        check_images(images, self.name)
        return (self.sign * jpeg_size_kb(images, self.quality)).to(images.device)


class JpegCompressibility(JpegIncompressibility):
    """Reward = minus the JPEG size in kB at ``quality`` (DDPO: 95)."""

    sign = -1.0
    name = "jpeg_compressibility"
