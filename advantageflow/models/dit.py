"""A tiny text-conditional pixel-space DiT for ShapesEval, and its policy adapter.

The network (after DiT, Peebles & Xie 2023, adaLN-Zero blocks, Sec. 3.2) sees one joint
sequence ``[prompt tokens; image patches]`` (in-context conditioning as in U-ViT / SD3's joint
attention), so attributes and positions can bind through attention.  The prompt encoder is
just learned embeddings of the grammar's words (:data:`VOCAB`) plus positions, refined by the
same blocks.  Time enters through adaLN.  The state is the image in pixel space, scaled to
``[-1, 1]``; ``decode`` maps it back to ``[0, 1]``.

Classifier-free guidance (Ho & Salimans 2022) uses the learned embedding of the empty prompt
(``<null>`` followed by padding), which pretraining shows for 10% of the samples.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advantageflow.configbase import ConfigError
from advantageflow.models.base import FrozenCopyPolicy, guided
from advantageflow.models.conv import InvariantConv2d
from advantageflow.models.fixed_split import FixedSplitGroupNorm

ASSETS = Path(__file__).resolve().parent.parent / "assets"
ASSET_DIR = ASSETS / "shapes_dit"  # the main job's base ('' names it)
# Every base shipped in the package, by the name ``model.path`` may give instead of a folder.
SHIPPED_ASSETS: dict[str, Path] = {
    "shapes_dit": ASSET_DIR,
    "shapes_unet": ASSETS / "shapes_unet",
    "shapes_unet_small": ASSETS / "shapes_unet_small",
}

VOCAB: tuple[str, ...] = (
    "<pad>", "<null>", "<unk>", "a", "an", "and", "of", "left", "right", "above", "below",
    "one", "two", "three", "four", "red", "green", "blue", "yellow", "purple", "white",
    "circle", "square", "triangle", "diamond", "ring", "frame", "bar", "pillar",
    "circles", "squares", "triangles", "diamonds", "rings", "frames", "bars", "pillars",
)  # fmt: skip
PAD, NULL, UNK = 0, 1, 2
# Words that join the grammar's noun phrases ("A and B", "A left of B"): the phrase chunker's cut points.
CONNECTORS: tuple[str, ...] = ("and", "of", "left", "right", "above", "below")
CONNECTOR_IDS: tuple[int, ...] = tuple(VOCAB.index(w) for w in CONNECTORS)


def tokenize(prompts: list[str], max_tokens: int, vocab: tuple[str, ...] = VOCAB) -> Tensor:
    """Token ids ``(B, max_tokens)`` long: words -> ids, padded; ``""`` -> ``<null>``.

    Unknown words map to ``<unk>``; prompts longer than ``max_tokens`` raise ``ValueError``.
    """
    index = {w: i for i, w in enumerate(vocab)}
    out = torch.full((len(prompts), max_tokens), PAD, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        words = prompt.lower().replace(",", " ").replace(".", " ").split()
        if len(words) > max_tokens:
            raise ValueError(f"prompt '{prompt}' has {len(words)} words; the model reads at most {max_tokens}")
        ids = [index.get(w, UNK) for w in words] or [NULL]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def phrase_segments(tokens: Tensor, connector_ids: Tensor | None = None) -> Tensor:
    """The phrase of each token ``(B, L)`` long, from the token ids ``(B, L)`` alone: 1 for the
    words before the first connector (:data:`CONNECTORS`), 3 for connectors, 2 for the words
    after one, 0 for padding and ``<null>``.

    A fixed chunker standing in for what a trained text encoder gives a real model: the words
    of one object share a segment whatever the prompt's length ("a square" / "three purple
    diamonds"), so a colour can be bound to its shape, and the first object told from the
    second, without the network first learning to parse (``DiTConfig.text_segments``).
    ``connector_ids``: the connectors' ids in :data:`VOCAB` (:data:`CONNECTOR_IDS`, made here if
    not given; the network keeps them as a buffer so its forward pass makes no tensor).
    """
    if connector_ids is None:
        connector_ids = torch.tensor(CONNECTOR_IDS, device=tokens.device)
    connector = torch.isin(tokens, connector_ids)
    seg = torch.where(connector.long().cumsum(dim=1) > 0, 2, 1)
    seg = torch.where(connector, 3, seg)
    return torch.where((tokens == PAD) | (tokens == NULL), 0, seg)


@dataclass
class DiTConfig:
    """Architecture.  ``image_size`` / ``patch`` pixels; ``width`` channels; ``depth`` blocks."""

    image_size: int = 32
    channels: int = 3
    patch: int = 4
    width: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    max_tokens: int = 12
    vocab_size: int = len(VOCAB)
    conv_channels: int = 0  # > 0: convolutional stem and head at full resolution (see ShapesDiT)
    conv_blocks: int = 1  # residual blocks of the convolutional head
    mid_channels: int = 0  # > 0: a half-resolution convolutional stage around the transformer
    prediction: str = "velocity"  # or "x0": the network predicts the clean image (see ShapesDiT)
    x0_t_min: float = 0.05  # with prediction "x0": v = (x_t - x0) / max(t, x0_t_min)
    text_segments: bool = False  # add a learned embedding of each word's phrase (phrase_segments)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features ``(B, dim)`` of ``t`` ``(B,)`` in ``[0, 1]`` (scaled by 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def sincos_2d(grid: int, dim: int) -> Tensor:
    """Fixed 2-D sin-cos position features ``(grid * grid, dim)``, row-major patches.

    Half the channels encode the row and half the column, each as sines and cosines of
    geometrically spaced frequencies (Vaswani et al. 2017, Sec. 3.5, per axis).
    """
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    pos = torch.arange(grid, dtype=torch.float32)
    ang = pos[:, None] * freqs[None]  # (grid, quarter)
    axis = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)  # (grid, dim / 2)
    rows = axis[:, None, :].expand(grid, grid, -1)
    cols = axis[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, -1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with ``(B, D)`` shift / scale over ``(B, N, D)``."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero modulation (DiT, Sec. 3.2)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``x`` ``(B, N, D)``, ``c`` ``(B, D)`` -> ``(B, N, D)``."""
        s1, g1, a1, s2, g2, a2 = self.ada(F.silu(c)).chunk(6, dim=1)
        b, n, d = x.shape
        h = modulate(self.norm1(x), s1, g1)
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + a1[:, None] * self.proj(h)
        return x + a2[:, None] * self.mlp(modulate(self.norm2(x), s2, g2))


class ConvResBlock(nn.Module):
    """Full-resolution residual block: GroupNorm, SiLU, 3x3 conv, a FiLM of the conditioning
    ``c``, then again, with the last conv zero-initialised (the block starts as identity)."""

    def __init__(self, channels: int, cond_width: int) -> None:
        super().__init__()
        groups = math.gcd(8, channels)
        self.norm1 = FixedSplitGroupNorm(groups, channels)
        self.conv1 = InvariantConv2d(channels, channels, 3, padding=1)
        self.film = nn.Linear(cond_width, 2 * channels)
        self.norm2 = FixedSplitGroupNorm(groups, channels)
        self.conv2 = InvariantConv2d(channels, channels, 3, padding=1)
        for layer in (self.film, self.conv2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``x`` ``(B, C, H, W)``, ``c`` ``(B, D)`` -> ``(B, C, H, W)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        shift, scale = self.film(F.silu(c)).chunk(2, dim=1)
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class ShapesDiT(nn.Module):
    """``v(x, t, tokens)``: ``(B, C, H, W), (B,), (B, L) long -> (B, C, H, W)``.

    With ``cfg.conv_channels = K > 0`` the patches are cut from ``K`` feature maps of a
    convolutional stem (a 3x3 conv at full resolution), the transformer's output is
    unpatchified to ``K`` maps, added to the stem's (a U-Net skip), refined by
    ``cfg.conv_blocks`` residual blocks and projected to the image channels.  Pixel-level
    convolutions give shapes sharp, coherent edges inside and across patches, which a linear
    unpatchify of 4x4 patches learns slowly; the transformer keeps the layout and the text.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch or cfg.width % cfg.heads:
            raise ValueError("image_size must be divisible by patch and width by heads")
        if cfg.prediction not in ("velocity", "x0"):
            raise ValueError(f"prediction must be 'velocity' or 'x0', not {cfg.prediction!r}")
        self.cfg = cfg
        w, p = cfg.width, cfg.patch
        self.grid = cfg.image_size // p
        k = cfg.conv_channels
        if k:
            self.stem_in = InvariantConv2d(cfg.channels, k, 3, padding=1)
            self.head_blocks = nn.ModuleList(ConvResBlock(k, w) for _ in range(cfg.conv_blocks))
            self.head_norm = FixedSplitGroupNorm(math.gcd(8, k), k)
            self.head_out = InvariantConv2d(k, cfg.channels, 3, padding=1)
            nn.init.zeros_(self.head_out.weight)
            nn.init.zeros_(self.head_out.bias)
        m = cfg.mid_channels
        if m:
            if not k or p % 2:
                raise ValueError("mid_channels needs conv_channels > 0 and an even patch")
            self.down = InvariantConv2d(k, m, 3, stride=2, padding=1)
            self.mid_in = ConvResBlock(m, w)
            self.mid_out = ConvResBlock(m, w)
            self.up = InvariantConv2d(m, k, 3, padding=1)
        self.token_patch = p // 2 if m else p  # patch side on the map the transformer reads
        self.patch_embed = InvariantConv2d(m or k or cfg.channels, w, self.token_patch, stride=self.token_patch)
        # fixed 2-D sin-cos positions (DiT, Sec. 3.2) plus a learned correction (zero at start)
        self.register_buffer("pos_fixed", sincos_2d(self.grid, w)[None], persistent=False)
        self.pos = nn.Parameter(torch.zeros(1, self.grid * self.grid, w))
        self.tok = nn.Embedding(cfg.vocab_size, w)
        nn.init.normal_(self.tok.weight, std=0.02)
        self.tok_pos = nn.Parameter(torch.randn(1, cfg.max_tokens, w) * 0.02)
        if cfg.text_segments:
            self.tok_seg = nn.Embedding(4, w)
            nn.init.normal_(self.tok_seg.weight, std=0.02)
            self.register_buffer("connector_ids", torch.tensor(CONNECTOR_IDS), persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.text_pool = nn.Linear(w, w)
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(w, 2 * w)
        self.out = nn.Linear(w, self.token_patch**2 * (m or k or cfg.channels))
        for layer in (self.ada_out, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor) -> Tensor:
        """The velocity ``(B, C, H, W)``, whatever ``cfg.prediction`` the network outputs."""
        out = self._network(x, t, tokens)
        if self.cfg.prediction == "velocity":
            return out
        # x-prediction (Li & He 2025, "Back to Basics", Sec. 3): with x_t = (1 - t) x0 + t eps
        # the velocity eps - x0 is (x_t - x0) / t; t is floored so the map stays bounded near 0
        return (x - out) / t.clamp(min=self.cfg.x0_t_min).view(-1, 1, 1, 1).to(x.dtype)

    def _network(self, x: Tensor, t: Tensor, tokens: Tensor) -> Tensor:
        b, ch, hh, ww = x.shape
        p, g = self.token_patch, self.grid
        txt = self.tok(tokens) + self.tok_pos[:, : tokens.shape[1]]  # (B, L, D)
        if self.cfg.text_segments:
            txt = txt + self.tok_seg(phrase_segments(tokens, self.connector_ids))
        c = self.t_mlp(timestep_embedding(t, self.cfg.width).to(x.dtype)) + self.text_pool(txt.mean(dim=1))
        stem = mid = None
        if self.cfg.conv_channels:
            stem = self.stem_in(x)  # (B, K, H, W)
            x = stem
        if self.cfg.mid_channels:
            mid = self.mid_in(self.down(F.silu(stem)), c)  # (B, M, H/2, W/2)
            x = mid
        img = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_fixed + self.pos  # (B, g*g, D)
        h = torch.cat([txt, img], dim=1)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=1)
        h = self.out(modulate(self.norm_out(h[:, tokens.shape[1]:]), shift, scale))  # (B, g*g, p*p*K)
        k = self.cfg.mid_channels or self.cfg.conv_channels or ch
        h = h.view(b, g, g, p, p, k).permute(0, 5, 1, 3, 2, 4).reshape(b, k, g * p, g * p)
        if stem is None:
            return h
        if mid is not None:
            h = self.mid_out(h + mid, c)
            h = self.up(F.interpolate(F.silu(h), scale_factor=2, mode="nearest"))
        h = h + stem
        for block in self.head_blocks:
            h = block(h, c)
        return self.head_out(F.silu(self.head_norm(h)))


def build_network(model: dict) -> nn.Module:
    """The untrained network of an asset's ``model`` section: a :class:`ShapesDiT`, or a
    :class:`~advantageflow.models.unet.ShapesUNet` when it says ``"arch": "unet"``."""
    arch = model.get("arch", "dit")
    if arch == "unet":
        from advantageflow.models.unet import ShapesUNet, UNetConfig

        return ShapesUNet(UNetConfig(**model))
    if arch != "dit":
        raise ValueError(f"unknown ShapesEval network architecture {arch!r} (known: dit, unet)")
    return ShapesDiT(DiTConfig(**{k: v for k, v in model.items() if k != "arch"}))


def asset_folder(path: str | Path = "") -> Path:
    """The folder ``path`` names: '' the main job's base, a folder that exists, else a name in
    :data:`SHIPPED_ASSETS` (so ``model.path=shapes_unet`` needs no install path)."""
    if not path:
        return ASSET_DIR
    folder = Path(path).expanduser()
    if not folder.exists() and str(path) in SHIPPED_ASSETS:
        return SHIPPED_ASSETS[str(path)]
    return folder


def asset_files(path: str | Path = "") -> tuple[Path, Path]:
    """``(config.json, model.safetensors)`` of an asset (:func:`asset_folder`);
    ``FileNotFoundError`` naming the folder if either is missing."""
    folder = asset_folder(path)
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise FileNotFoundError(
            f"no ShapesDiT checkpoint in '{folder}' (needs config.json and model.safetensors; "
            f"make one with 'advantageflow pretrain shapes --out {folder}', or name a shipped base: "
            f"{', '.join(SHIPPED_ASSETS)})"
        )
    return cfg_file, weights


def load_asset(path: str | Path = "") -> tuple[nn.Module, dict]:
    """The network and its ``config.json`` from an asset folder ('' = the shipped one)."""
    from safetensors.torch import load_file

    cfg_file, weights = asset_files(path)
    meta = json.loads(cfg_file.read_text())
    net = build_network(meta["model"])
    net.load_state_dict(load_file(str(weights)))
    return net.eval(), meta


def save_asset(net: nn.Module, meta: dict, path: str | Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` (``meta`` plus the architecture)."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    meta = {**meta, "model": asdict(net.cfg), "vocab": list(VOCAB)}
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


class ShapesDiTPolicy(FrozenCopyPolicy):
    """The ShapesEval base model as a :class:`~advantageflow.models.base.FlowPolicy`.

    Conditioning (from :meth:`encode`): ``{"tokens": (B, L) long, "null": (B, L) long}``;
    the ``null`` rows are the empty prompt, used as the unconditional branch of CFG.
    Full fine-tuning: every network parameter is trainable unless ``train_only`` names a
    subset; :meth:`reference` switches to a frozen copy of the loaded weights.
    """

    @dataclass
    class Config:
        """Attributes: path: asset folder with config.json + model.safetensors ('' = shipped).
        train_only: shell patterns (``fnmatch``) over the network's parameter names, e.g.
        ``["blocks.*"]``: only the parameters that match one are trained (the rest stay at
        the loaded weights and get no gradient); empty: all of them."""

        name: str = "shapes_dit"
        path: str = ""
        train_only: list[str] = field(default_factory=list)

    sample_shape = (3, 32, 32)

    def __init__(self, net: ShapesDiT, meta: dict | None = None, device: torch.device | str = "cpu",
                 train_only: list[str] | tuple[str, ...] = ()) -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device)
        self.train_only = tuple(train_only)
        if self.train_only:
            # frozen before the reference copy is made, so both hold the same requires_grad
            names = [name for name, _ in self.net.named_parameters()]
            unmatched = [pat for pat in self.train_only if not any(fnmatchcase(n, pat) for n in names)]
            if unmatched:
                tops = sorted({n.split(".")[0] for n in names})
                hints = [f"'{pat}.*'" for pat in unmatched if any(fnmatchcase(n, pat + ".*") for n in names)]
                hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
                raise ConfigError(f"model.train_only: {unmatched} match no parameter name{hint}; patterns match "
                                  f"whole names such as '{names[0]}'; the network's top-level modules are {tops}")
            for name, p in self.net.named_parameters():
                p.requires_grad_(any(fnmatchcase(name, pat) for pat in self.train_only))
        self.meta = meta or {}
        self.ref_net = copy.deepcopy(self.net).requires_grad_(False).eval()
        self._active = self.net
        c = net.cfg
        self.sample_shape = (c.channels, c.image_size, c.image_size)
        self.sampling = dict(self.meta.get("sampling", {}))
        # the words the asset was trained on (its config.json), so ids match its embeddings
        self.vocab = tuple(self.meta.get("vocab", VOCAB))
        if len(self.vocab) != c.vocab_size:
            raise ValueError(f"the asset's vocabulary has {len(self.vocab)} words, its network {c.vocab_size}")

    @classmethod
    def preflight(cls, cfg: Config) -> None:
        """The check :meth:`from_config` makes before loading weights (``validate`` runs it)."""
        try:
            asset_files(cfg.path)
        except FileNotFoundError as err:
            raise ConfigError(f"model.path: {err}") from None

    @classmethod
    def from_config(cls, cfg: Config, device: str = "cpu") -> ShapesDiTPolicy:
        net, meta = load_asset(cfg.path)
        return cls(net, meta, device, train_only=cfg.train_only)

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.net.named_parameters() if p.requires_grad]

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        tokens = tokenize(list(prompts), self.net.cfg.max_tokens, self.vocab).to(self.device)
        null = tokenize([""], self.net.cfg.max_tokens, self.vocab).to(self.device).expand_as(tokens).clone()
        return {"tokens": tokens, "null": null}

    def velocity(self, x: Tensor, t: Tensor, cond: Any, guidance_scale: float = 1.0) -> Tensor:
        """``(B, 3, H, W)`` velocity; CFG ``v_u + s (v_c - v_u)`` in one doubled batch."""
        if not isinstance(cond, dict) or "tokens" not in cond:
            raise TypeError("ShapesDiTPolicy.velocity needs the conditioning from encode()")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if guidance_scale == 1.0:
            return self._active(x, t, cond["tokens"])
        v = self._active(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond["tokens"], cond["null"]]))
        v_c, v_u = v.chunk(2)
        return guided(v_c, v_u, guidance_scale)

    def decode(self, x: Tensor) -> Tensor:
        """Pixel state in ``[-1, 1]`` -> images ``(B, 3, H, W)`` in ``[0, 1]`` (differentiable)."""
        return ((x + 1) / 2).clamp(0, 1)
