"""A tiny text-conditional pixel-space U-Net for ShapesEval (the alternative to ShapesDiT).

Three resolutions, as the DDPM U-Net that draws CIFAR-10 at 32x32 (Ho et al. 2020, App. B),
with the text read at every level:

- full resolution (``base_channels`` maps) and half resolution (``mid_channels``): residual
  conv blocks FiLM-modulated by the pooled conditioning ``c`` (time + mean prompt embedding),
  and at half resolution a cross-attention from every pixel to the prompt tokens (as
  Stable Diffusion's U-Net, Rombach et al. 2022, Sec. 3.3), so an outline's pixels can read
  the shape word directly instead of through a pooled vector;
- quarter resolution (``width`` channels, 8x8 tokens): the DiT blocks of
  :mod:`advantageflow.models.dit` over the joint sequence ``[prompt tokens; image tokens]``,
  where counts, positions and colours bind.

Skips add each encoder level to its decoder level; the output conv is zero-initialised, so
the untrained network predicts zero velocity.  Same interface as
:class:`~advantageflow.models.dit.ShapesDiT`: ``(B, C, H, W), (B,), (B, L) long -> (B, C, H, W)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advantageflow.models.conv import InvariantConv2d
from advantageflow.models.dit import VOCAB, Block, ConvResBlock, sincos_2d, timestep_embedding
from advantageflow.models.fixed_split import FixedSplitGroupNorm


@dataclass
class UNetConfig:
    """Architecture: ``base_channels`` at full, ``mid_channels`` at half, ``width`` at quarter
    resolution; ``depth`` transformer blocks at the bottom; ``text_heads`` heads of the
    half-resolution cross-attention; ``query_pos``: add fixed 2-D sin-cos position features to
    that cross-attention's pixel queries, so a pixel can read the prompt by where it is (which
    object of "a red circle left of a blue square" belongs at the left); off in the assets made
    before it (their ``config.json`` has no such key)."""

    arch: str = "unet"
    image_size: int = 32
    channels: int = 3
    base_channels: int = 32
    mid_channels: int = 64
    width: int = 128
    depth: int = 3
    heads: int = 4
    text_heads: int = 2
    mlp_ratio: float = 4.0
    max_tokens: int = 12
    vocab_size: int = len(VOCAB)
    query_pos: bool = False


class TextCrossAttention(nn.Module):
    """Residual cross-attention from pixels ``(B, C, H, W)`` to tokens ``(B, L, D)``; the
    output projection is zero-initialised (the block starts as identity).  With ``grid`` > 0
    the queries see each pixel's position (:func:`sincos_2d` of a ``grid x grid`` map, added
    to the normalised pixels before the query projection; ``H = W = grid`` then)."""

    def __init__(self, channels: int, text_width: int, heads: int, grid: int = 0) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError("channels must be divisible by text_heads")
        self.heads = heads
        self.query_pos: Tensor | None
        self.register_buffer("query_pos", sincos_2d(grid, channels)[None] if grid else None, persistent=False)
        self.norm = FixedSplitGroupNorm(math.gcd(8, channels), channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(text_width, 2 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, txt: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n, d = self.heads, c // self.heads
        pixels = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.query_pos is not None:
            pixels = pixels + self.query_pos
        q = self.q(pixels).view(b, h * w, n, d).transpose(1, 2)
        k, v = self.kv(txt).view(b, txt.shape[1], 2, n, d).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        return x + self.proj(out).transpose(1, 2).reshape(b, c, h, w)


class ShapesUNet(nn.Module):
    """``v(x, t, tokens)``: ``(B, C, H, W), (B,), (B, L) long -> (B, C, H, W)`` (see module)."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        if cfg.image_size % 4 or cfg.width % cfg.heads:
            raise ValueError("image_size must be divisible by 4 and width by heads")
        self.cfg = cfg
        c1, c2, w = cfg.base_channels, cfg.mid_channels, cfg.width
        self.grid = cfg.image_size // 4
        self.tok = nn.Embedding(cfg.vocab_size, w)
        nn.init.normal_(self.tok.weight, std=0.02)
        self.tok_pos = nn.Parameter(torch.randn(1, cfg.max_tokens, w) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.text_pool = nn.Linear(w, w)
        self.conv_in = InvariantConv2d(cfg.channels, c1, 3, padding=1)
        self.enc1 = ConvResBlock(c1, w)
        self.down1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.enc2 = ConvResBlock(c2, w)
        half = cfg.image_size // 2 if cfg.query_pos else 0
        self.enc2_text = TextCrossAttention(c2, w, cfg.text_heads, half)
        self.down2 = nn.Conv2d(c2, w, 3, stride=2, padding=1)
        self.register_buffer("pos_fixed", sincos_2d(self.grid, w)[None], persistent=False)
        self.pos = nn.Parameter(torch.zeros(1, self.grid * self.grid, w))
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        # no affine: its weight gradients are an ATen reduction that depends on the thread count
        self.mid_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.up2 = InvariantConv2d(w, c2, 3, padding=1)
        self.dec2 = ConvResBlock(c2, w)
        self.dec2_text = TextCrossAttention(c2, w, cfg.text_heads, half)
        self.up1 = InvariantConv2d(c2, c1, 3, padding=1)
        self.dec1 = ConvResBlock(c1, w)
        self.out_norm = FixedSplitGroupNorm(math.gcd(8, c1), c1)
        self.conv_out = InvariantConv2d(c1, cfg.channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor) -> Tensor:
        b, g = x.shape[0], self.grid
        txt = self.tok(tokens) + self.tok_pos[:, : tokens.shape[1]]  # (B, L, D)
        c = self.t_mlp(timestep_embedding(t, self.cfg.width).to(x.dtype)) + self.text_pool(txt.mean(dim=1))
        skip1 = self.enc1(self.conv_in(x), c)  # (B, C1, H, W)
        skip2 = self.enc2_text(self.enc2(self.down1(F.silu(skip1)), c), txt)  # (B, C2, H/2, W/2)
        img = self.down2(F.silu(skip2)).flatten(2).transpose(1, 2) + self.pos_fixed + self.pos  # (B, g*g, D)
        h = torch.cat([txt, img], dim=1)
        for block in self.blocks:
            h = block(h, c)
        h = self.mid_norm(h[:, tokens.shape[1]:]).transpose(1, 2).reshape(b, -1, g, g)  # (B, D, g, g)
        h = self.up2(F.interpolate(h, scale_factor=2, mode="nearest")) + skip2
        h = self.dec2_text(self.dec2(h, c), txt)
        h = self.up1(F.interpolate(F.silu(h), scale_factor=2, mode="nearest")) + skip1
        h = self.dec1(h, c)
        return self.conv_out(F.silu(self.out_norm(h)))
