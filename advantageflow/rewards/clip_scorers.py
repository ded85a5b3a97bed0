"""Preference and alignment scorers built on CLIP-style (and BLIP) backbones.

All take images ``(B, 3, H, W)`` in ``[0, 1]`` and return ``(B,)`` float32 (float64 with
``dtype="float64"``).  Preprocessing
is done in torch (resize of the shortest side with antialiased bicubic, centre crop,
mean/std normalisation) so gradients reach the images: every scorer here sets
``differentiable = True`` (for DRaFT).  Without ``images.requires_grad`` they run under
``no_grad``.  Model weights are frozen.

| name | score | published source |
|---|---|---|
| ``clip_score`` | ``w * max(cos(img, txt), 0)``, ``w = 2.5`` | CLIPScore, Hessel et al. 2021, Eq. 1 |
| ``pickscore`` | ``exp(logit_scale) * cos(img, txt)`` | PickScore, Kirstain et al. 2023 |
| ``aesthetic`` | ``MLP(img / ||img||)`` on CLIP ViT-L/14 | LAION aesthetic predictor v2 (DDPO's) |
| ``hpsv2`` | ``cos(img, txt)`` | HPSv2, Wu et al. 2023 (``hpsv2.score``) |
| ``imagereward`` | ``(MLP(BLIP_txt[CLS] | img) - 0.16717) / 1.03334`` | ImageReward, Xu et al. 2023 |

Each loader reads a local folder or a hub id (``transformers`` ``from_pretrained``; this
project never downloads in tests).  ``hpsv2`` and ``imagereward`` also take the official
checkpoint files (OpenCLIP / BLIP layouts), converted on load by
:mod:`advantageflow.rewards.convert`; ``docs/rewards.md`` lists what differs from the official
packages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advantageflow.rewards.base import RewardError
from advantageflow.rewards.convert import (
    bert_tokenizer,
    clip_tokenizer,
    imagereward_to_blip,
    openclip_clean,
    openclip_to_clip,
    read_state_dict,
)
from advantageflow.rewards.imageio import check_images

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class ImageTransform:
    """CLIP eval preprocessing in torch: ``(B, 3, H, W)`` in [0, 1] -> ``(B, 3, crop, crop)``.

    Resize so the shortest side is ``size`` (bicubic, antialiased, clamped to [0, 1] as 8-bit
    PIL output is), centre-crop ``crop`` x ``crop``, then ``(x - mean) / std``.  Matches
    ``CLIPImageProcessor`` up to PIL-vs-torch resampling differences and 8-bit rounding.
    """

    size: int
    crop: int
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    def __call__(self, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        if min(h, w) != self.size:
            short, long = (h, w) if h <= w else (w, h)
            new_long = int(self.size * long / short)
            new_hw = (self.size, new_long) if h <= w else (new_long, self.size)
            images = F.interpolate(images, size=new_hw, mode="bicubic", antialias=True, align_corners=False)
            images = images.clamp(0, 1)
        h, w = images.shape[-2:]
        if h < self.crop or w < self.crop:
            raise RewardError(f"image {h}x{w} is smaller than the crop {self.crop}")
        top, left = (h - self.crop) // 2, (w - self.crop) // 2
        images = images[..., top : top + self.crop, left : left + self.crop]
        mean = images.new_tensor(self.mean).view(1, -1, 1, 1)
        std = images.new_tensor(self.std).view(1, -1, 1, 1)
        return (images - mean) / std


def load_transform(path: str, image_size: int) -> ImageTransform:
    """The preprocessing saved with a model (``preprocessor_config.json``), else CLIP's defaults."""
    cfg: dict[str, Any] = {}
    local = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(local):
        with open(local) as f:
            cfg = json.load(f)
    else:
        try:
            from transformers import AutoImageProcessor

            cfg = AutoImageProcessor.from_pretrained(path).to_dict()
        except Exception:  # noqa: BLE001 - no processor saved: CLIP defaults
            cfg = {}

    def _side(value: Any, default: int) -> int:
        if isinstance(value, dict):
            return int(value.get("shortest_edge") or value.get("height") or default)
        return int(value) if value else default

    return ImageTransform(
        size=_side(cfg.get("size"), image_size),
        crop=_side(cfg.get("crop_size"), image_size),
        mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
    )


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}' (one of {sorted(DTYPES)})")
    return DTYPES[name]


class _FrozenScorer:
    """Device/dtype handling and the grad switch shared by the scorers below."""

    differentiable = True
    name = "scorer"
    modules: list[nn.Module]

    def _setup(self, device: str | None, dtype: str) -> None:
        self.dtype = _dtype(dtype)
        self.device = torch.device(device) if device else None
        for module in self.modules:
            module.requires_grad_(False).eval().to(dtype=self.dtype)
            if self.device is not None:
                module.to(self.device)

    def _prepare(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        check_images(images, self.name)
        if prompts is not None and len(prompts) != images.shape[0]:
            raise RewardError(f"reward '{self.name}': {len(prompts)} prompts for {images.shape[0]} images")
        device = self.device or images.device
        for module in self.modules:
            module.to(device)
        return images.to(device, self.dtype)

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        grad = images.requires_grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            return self._out(self.score(self._prepare(images, prompts), prompts), images)

    def _out(self, scores: Tensor, images: Tensor) -> Tensor:
        """float32 scores (float64 when the scorer runs in float64) on the images' device."""
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        return scores.to(images.device, dtype)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class ClipBackbone:
    """A ``transformers`` ``CLIPModel`` + tokenizer + torch preprocessing.

    ``path``: folder or hub id of the model; ``processor_path``: where the tokenizer and
    ``preprocessor_config.json`` live (default: ``path``).  ``clean``: applied to each prompt
    before tokenising (HPSv2 sets OpenCLIP's clean-up), default none.
    """

    clean: Callable[[str], str] | None = None

    def __init__(self, path: str, processor_path: str | None = None) -> None:
        from transformers import AutoTokenizer, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(path)
            self.tokenizer = AutoTokenizer.from_pretrained(processor_path or path)
        except OSError as err:
            raise RewardError(f"cannot load a CLIP model from '{path}': {err}") from err
        self.transform = load_transform(processor_path or path, self.model.config.vision_config.image_size)
        self.max_length = self.model.config.text_config.max_position_embeddings

    @classmethod
    def from_openclip(
        cls, checkpoint: str, tokenizer: str | None = None, model_config: dict | str | None = None
    ) -> ClipBackbone:
        """An OpenCLIP checkpoint file converted on load (:mod:`advantageflow.rewards.convert`),
        with OpenCLIP's eval preprocessing (shortest side to the model's size, centre crop,
        OpenAI CLIP's mean/std) and ``tokenizer`` (see :func:`convert.clip_tokenizer`)."""
        self = cls.__new__(cls)
        self.model = openclip_to_clip(read_state_dict(checkpoint), model_config)
        self.tokenizer = clip_tokenizer(tokenizer)
        size = self.model.config.vision_config.image_size
        self.transform = ImageTransform(size, size)
        self.max_length = self.model.config.text_config.max_position_embeddings
        return self

    def image_embeds(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> ``(B, D)`` unit-norm projected image features."""
        pixels = self.transform(images)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    def text_embeds(self, prompts: list[str], device: torch.device) -> Tensor:
        """``B`` prompts -> ``(B, D)`` unit-norm projected text features."""
        if self.clean is not None:
            prompts = [self.clean(p) for p in prompts]
        tok = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        out = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        pooled = out.pooler_output
        return F.normalize(self.model.text_projection(pooled), dim=-1)

    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        """``(B,)`` cosine similarity of each image with its prompt."""
        return (self.image_embeds(images) * self.text_embeds(prompts, images.device)).sum(-1)


class ClipScore(_FrozenScorer):
    """CLIPScore (Hessel et al. 2021, Eq. 1): ``weight * max(cos(E_img, E_txt), 0)``, ``weight = 2.5``.

    The paper uses ``openai/clip-vit-base-patch32``.  Range ``[0, weight]``.
    """

    name = "clip_score"

    def __init__(
        self,
        path: str = "openai/clip-vit-base-patch32",
        weight: float = 2.5,
        device: str | None = None,
        dtype: str = "float32",
    ) -> None:
        self.backbone = ClipBackbone(path)
        self.weight = float(weight)
        self.modules = [self.backbone.model]
        self._setup(device, dtype)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.weight * self.backbone.cosine(images, prompts).clamp(min=0)


class PickScore(_FrozenScorer):
    """PickScore (Kirstain et al. 2023): ``exp(logit_scale) * cos(E_img, E_txt)`` (about 20-23
    for good images with the released model), divided by ``divide_by`` (Flow-GRPO uses 26).

    Model ``yuvalkirstain/PickScore_v1`` with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
    """

    name = "pickscore"

    def __init__(
        self,
        path: str = "yuvalkirstain/PickScore_v1",
        processor_path: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        divide_by: float = 1.0,
        device: str | None = None,
        dtype: str = "float32",
    ) -> None:
        if os.path.isdir(path) and processor_path == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K":
            processor_path = None  # a local model folder carries its own processor
        self.backbone = ClipBackbone(path, processor_path)
        self.divide_by = float(divide_by)
        self.modules = [self.backbone.model]
        self._setup(device, dtype)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        scale = self.backbone.model.logit_scale.exp()
        return scale * self.backbone.cosine(images, prompts) / self.divide_by


class HPSv2Score(_FrozenScorer):
    """HPSv2 / HPSv2.1 (Wu et al. 2023): ``cos(E_img, E_txt)`` of a CLIP ViT-H/14 fine-tuned on
    HPD v2 (``hpsv2.score`` returns this cosine, about 0.2-0.3).

    ``path``: the official checkpoint file (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``,
    an OpenCLIP state dict, converted on load; ``model_config``: its OpenCLIP config, default
    ViT-H-14; ``processor_path``: the tokenizer, see :func:`convert.clip_tokenizer`), or a
    ``transformers`` ``CLIPModel`` folder (e.g. written by ``advantageflow convert-reward``).
    Prompts get OpenCLIP's clean-up (:func:`convert.openclip_clean`) before tokenising.
    """

    name = "hpsv2"

    def __init__(
        self,
        path: str,
        processor_path: str | None = None,
        model_config: dict | str | None = None,
        device: str | None = None,
        dtype: str = "float32",
    ) -> None:
        if os.path.isfile(path):
            self.backbone = ClipBackbone.from_openclip(path, processor_path, model_config)
        elif model_config is not None:
            raise RewardError("hpsv2: model_config applies to an OpenCLIP checkpoint file, not a folder")
        else:
            self.backbone = ClipBackbone(path, processor_path)
        self.backbone.clean = openclip_clean  # hpsv2.score tokenises with OpenCLIP's SimpleTokenizer
        self.modules = [self.backbone.model]
        self._setup(device, dtype)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.backbone.cosine(images, prompts)


class ScoreHead(nn.Module):
    """The MLP head shared by the LAION aesthetic predictor v2 and ImageReward.

    ``Linear(d, 1024) Dropout(.2) Linear(1024, 128) Dropout(.2) Linear(128, 64) Dropout(.1)
    Linear(64, 16) Linear(16, 1)`` -- no activations, as published.  ``(B, d) -> (B,)``.
    State-dict keys ``layers.{0,2,4,6,7}.{weight,bias}``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x).squeeze(-1)


def load_head(path: str, dim: int) -> ScoreHead:
    """A :class:`ScoreHead` from ``.safetensors`` or a tensors-only ``.pt``/``.pth`` state dict.

    Keys may carry a prefix before ``layers.`` (e.g. ImageReward's ``mlp.layers.0.weight``);
    other keys are ignored.  ``torch.load`` runs with ``weights_only=True``.
    """
    if not os.path.isfile(path):
        raise RewardError(f"score head file not found: '{path}'")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    head_state = {k[k.index("layers.") :]: v for k, v in state.items() if "layers." in k}
    head = ScoreHead(dim)
    try:
        head.load_state_dict(head_state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise RewardError(f"'{path}' is not a score head for {dim}-d features: {first}") from err
    return head


class AestheticScore(_FrozenScorer):
    """LAION aesthetic predictor v2 as DDPO uses it: ``MLP(E_img / ||E_img||)`` with CLIP
    ViT-L/14 image features; scores about 1-10.  Prompts are ignored.

    ``head_path``: the head's weights (e.g. ``sac+logos+ava1-l14-linearMSE.pth``).
    """

    name = "aesthetic"

    def __init__(
        self,
        head_path: str,
        clip_path: str = "openai/clip-vit-large-patch14",
        device: str | None = None,
        dtype: str = "float32",
    ) -> None:
        self.backbone = ClipBackbone(clip_path)
        self.head = load_head(head_path, self.backbone.model.config.projection_dim)
        self.modules = [self.backbone.model, self.head]
        self._setup(device, dtype)

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        grad = images.requires_grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            x = self._prepare(images, None)
            return self._out(self.head(self.backbone.image_embeds(x)), images)


IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072


class ImageRewardScore(_FrozenScorer):
    """ImageReward (Xu et al. 2023): a BLIP image-grounded text encoder reads the prompt with
    cross-attention to the image; the ``[CLS]`` feature goes through :class:`ScoreHead` and is
    standardised: ``(MLP(f) - 0.16717362830052426) / 1.0333394966054072``.

    ``path``: the official ``ImageReward.pt`` (converted on load, :mod:`~advantageflow.rewards.convert`;
    ``med_config``: its ``med_config.json``, default next to it; ``processor_path``: the BERT
    tokenizer, default ``bert-base-uncased``), or a ``transformers`` ``BlipForImageTextRetrieval``
    folder (its ``vision_model`` and ``text_encoder`` are used) with its tokenizer and
    ``head_path``, the MLP (default ``<path>/imagereward_head.safetensors``).  Prompts are
    tokenised to ``max_length`` 35, padded, as ImageReward does.
    """

    name = "imagereward"

    def __init__(
        self,
        path: str,
        head_path: str | None = None,
        processor_path: str | None = None,
        med_config: str | None = None,
        max_length: int = 35,
        device: str | None = None,
        dtype: str = "float32",
    ) -> None:
        if os.path.isfile(path):
            model, self.head, self.tokenizer = self._official(path, head_path, processor_path, med_config)
            size = model.config.vision_config.image_size
            self.transform = ImageTransform(size, size)  # ImageReward's _transform(224)
        else:
            model, self.tokenizer = self._folder(path, processor_path, med_config)
            self.transform = load_transform(processor_path or path, model.config.vision_config.image_size)
            self.head = load_head(
                head_path or os.path.join(path, "imagereward_head.safetensors"), model.config.text_config.hidden_size
            )
        self.vision, self.text = model.vision_model, model.text_encoder
        self.max_length = int(max_length)
        self.modules = [self.vision, self.text, self.head]
        self._setup(device, dtype)

    @staticmethod
    def _official(path: str, head_path: str | None, processor_path: str | None, med_config: str | None):
        """``ImageReward.pt`` -> (BLIP model, head, tokenizer), converted on load."""
        if head_path is not None:
            raise RewardError("imagereward: ImageReward.pt holds its MLP head; head_path applies to a folder")
        med = med_config or os.path.join(os.path.dirname(path), "med_config.json")
        if not os.path.isfile(med):
            raise RewardError(f"imagereward: med_config.json not found at '{med}' (pass med_config)")
        model, head = imagereward_to_blip(read_state_dict(path), med)
        return model, head, bert_tokenizer(processor_path)

    @staticmethod
    def _folder(path: str, processor_path: str | None, med_config: str | None):
        """A ``BlipForImageTextRetrieval`` folder -> (model, tokenizer)."""
        from transformers import AutoTokenizer, BlipForImageTextRetrieval

        if med_config is not None:
            raise RewardError("imagereward: med_config applies to an ImageReward.pt file, not a folder")
        try:
            return BlipForImageTextRetrieval.from_pretrained(path), AutoTokenizer.from_pretrained(
                processor_path or path
            )
        except OSError as err:
            raise RewardError(f"cannot load a BLIP model from '{path}': {err}") from err

    def features(self, images: Tensor, prompts: list[str]) -> Tensor:
        """``(B, hidden)`` text ``[CLS]`` features grounded on the images."""
        image_embeds = self.vision(pixel_values=self.transform(images)).last_hidden_state
        tok = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(images.device)
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=images.device)
        out = self.text(
            input_ids=tok["input_ids"],
            attention_mask=tok["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        )
        return out.last_hidden_state[:, 0, :]

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return (self.head(self.features(images, prompts)) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
