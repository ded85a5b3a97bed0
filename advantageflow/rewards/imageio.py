"""Conversions between reward inputs (float tensors in [0, 1]) and 8-bit images / PNG bytes.

All scorers that work on 8-bit pixels quantise the same way as DDPO's reward code:
``uint8 = round(255 * clamp(x, 0, 1))``.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from advantageflow.rewards.base import RewardError


def check_images(images: Tensor, name: str) -> None:
    """Raise a one-line :class:`RewardError` unless ``images`` is ``(B, 3, H, W)``."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise RewardError(f"reward '{name}' needs images shaped (B, 3, H, W) in [0, 1], got {shape}")


def to_uint8(images: Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` floats in [0, 1] -> ``(B, H, W, 3)`` uint8 (DDPO's rounding)."""
    x = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(arrays: np.ndarray) -> Tensor:
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arrays)).permute(0, 3, 1, 2).float() / 255.0


def quantize(images: Tensor) -> Tensor:
    """What a float image looks like after an 8-bit round trip (same shape, [0, 1])."""
    return from_uint8(to_uint8(images)).to(images.device)


def to_pil(images: Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` in [0, 1] -> ``B`` RGB PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def encode_images(images: Tensor, image_format: str) -> list[bytes]:
    """``(B, 3, H, W)`` in [0, 1] -> one file per image in PIL's ``image_format`` (its defaults)."""
    out = []
    for img in to_pil(images):
        buf = io.BytesIO()
        img.save(buf, format=image_format)
        out.append(buf.getvalue())
    return out


def encode_png(images: Tensor) -> list[bytes]:
    """``(B, 3, H, W)`` in [0, 1] -> one PNG (8-bit RGB) per image."""
    return encode_images(images, "PNG")


def decode_png(data: bytes, max_pixels: int) -> np.ndarray:
    """One PNG -> ``(H, W, 3)`` uint8; ``ValueError`` for anything else or too many pixels.

    The header is checked before decoding, so a decompression bomb is refused cheaply.
    """
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not a PNG image")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ValueError(f"image {width}x{height} exceeds the limit of {max_pixels} pixels")
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except ValueError:
        raise
    except Exception as err:  # PIL raises many types for corrupt data
        raise ValueError(f"corrupt PNG: {type(err).__name__}: {err}") from err
