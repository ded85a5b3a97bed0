"""FLUX.1 Kontext (image editing) through diffusers, with LoRA (peft) or full fine-tuning.

Everything is :class:`~advantageflow.models.diffusers_flux.FluxPolicy`'s (packing, timestep,
distilled guidance, time grid with ``mu`` from the *state's* token count) plus the source image,
called as ``FluxKontextPipeline.__call__`` calls the transformer (diffusers 0.42.1):

- the source image is resized and normalised by the pipeline's ``image_processor`` and encoded
  by ``_encode_vae_image`` (the VAE posterior's mode, ``(z - shift) * scale``);
- its packed tokens are appended to the state's along the sequence, with rotary ids
  ``(1, row, col)`` (the state's are ``(0, row, col)``);
- the transformer's output is cut back to the state's tokens.

The source image travels with the prompt: ``Prompt.metadata[model.image_key]`` (default
``image``) holds a file path (relative paths are read under ``model.image_root``, else the
working folder) or a PIL image; e.g. a ``.jsonl`` prompt file's
``{"prompt": "make the cat blue", "metadata": {"image": "cats/001.png"}}``, or a dataset
column of paths.  A tiny set ships: ``task.path: edits/shapes/edits.jsonl`` with
``model.image_root: edits/shapes`` (8 edits of 4 shape images, 32 px; ``advantageflow/assets``).
``rollouts.encode_prompts`` hands the whole records to :meth:`encode`
(:attr:`conditions_on_metadata`).  Every source image is resized to ``model.height x
model.width`` (the pipeline with ``_auto_resize=False`` on an image of that size), so a batch
has one sequence length; its latents are cached per path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from advantageflow.configbase import ConfigError
from advantageflow.models.diffusers_common import autocast
from advantageflow.models.diffusers_flux import FluxPolicy, image_ids, pack_latents


class FluxKontextPolicy(FluxPolicy):
    """FLUX.1 Kontext policy (see the module docstring).

    Conditioning (batch-first): FLUX's (``prompt_embeds`` ``(B, L, D)``, ``pooled_prompt_embeds``
    ``(B, P)``, the negative prompt's with ``true_cfg``) plus ``image_latents`` ``(B, C, h, w)``,
    the source image's VAE latents (same shape as the state).
    """

    @dataclass
    class Config(FluxPolicy.Config):
        """FLUX's options plus where the source image is: ``image_key`` (the prompt metadata
        key holding it) and ``image_root`` (folder for relative paths).  ``guidance`` 2.5 as in
        the FLUX.1 Kontext [dev] model card."""

        name: str = "flux_kontext"
        path: str = "black-forest-labs/FLUX.1-Kontext-dev"
        guidance: float = 2.5
        image_key: str = "image"
        image_root: str = ""

        def validate(self) -> None:
            super().validate()
            if not self.image_key:
                raise ConfigError("model.image_key must name the prompt metadata key holding the source image")

    #: ``rollouts.encode_prompts`` passes the prompt records (text and metadata) to :meth:`encode`.
    conditions_on_metadata = True

    def __init__(self, cfg: Config, pipe: Any, device: torch.device | str = "cpu") -> None:
        super().__init__(cfg, pipe, device)
        _, h, w = self.sample_shape
        source_ids = image_ids(h, w, self.device, self.dtype)
        source_ids[:, 0] = 1  # the pipeline's "image ids": latent ids with the first axis set to 1
        self._source_ids = source_ids
        self._image_cache: dict[str, Tensor] = {}

    @classmethod
    def pipeline_class(cls) -> Any:
        from diffusers import FluxKontextPipeline

        return FluxKontextPipeline

    # ------------------------------------------------------------------ conditioning

    def encode(self, prompts: list[Any]) -> dict[str, Tensor]:
        """FLUX's text conditioning plus ``image_latents`` ``(B, C, h, w)`` of each record's source
        image.  ``prompts``: records with ``text`` and ``metadata`` (``tasks.base.Prompt``); a bare
        string has no source image."""
        if isinstance(prompts, str) or hasattr(prompts, "text"):
            prompts = [prompts]
        texts = [p if isinstance(p, str) else p.text for p in prompts]
        cond = super().encode(texts)
        cond["image_latents"] = torch.stack(
            [self._source_latents(t, {} if isinstance(p, str) else p.metadata) for t, p in zip(texts, prompts)]
        )
        return cond

    def _source_latents(self, text: str, metadata: dict) -> Tensor:
        """The VAE latents ``(C, h, w)`` of a prompt's source image (cached per path)."""
        source = metadata.get(self.cfg.image_key)
        if source is None:
            raise ValueError(
                f"prompt {text!r} has no source image: FLUX.1 Kontext edits the image named by the "
                f"prompt's metadata key '{self.cfg.image_key}' (model.image_key)"
            )
        if not isinstance(source, str):
            return self._encode_image(source)
        if source not in self._image_cache:
            self._image_cache[source] = self._encode_image(self._open(source))
        return self._image_cache[source]

    def _open(self, path: str) -> Any:
        from PIL import Image

        full = os.path.join(image_root(self.cfg.image_root), path) if self.cfg.image_root else path
        try:
            with Image.open(os.path.expanduser(full)) as img:
                return img.convert("RGB")
        except OSError as err:
            raise ValueError(
                f"cannot read the source image '{full}' (model.image_root: '{self.cfg.image_root}'): {err}"
            ) from None

    @torch.no_grad()
    def _encode_image(self, image: Any) -> Tensor:
        """``(C, h, w)`` latents of a PIL image, as the pipeline's steps 3 and 4 make them."""
        processor, vae = self.pipe.image_processor, self.pipe.vae
        height, width = self.cfg.height, self.cfg.width
        pixels = processor.preprocess(processor.resize(image, height, width), height, width)
        with autocast(self.device, self.dtype):
            latents = self.pipe._encode_vae_image(pixels.to(self.device, vae.dtype), generator=None)
        return latents[0].to(self.dtype)

    # ------------------------------------------------------------------ velocity

    def _image_tokens(self, x: Tensor, cond: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The state's packed tokens followed by the source image's, ``(B, 2 h/2 w/2, 4C)``,
        and their ids ``(2 h/2 w/2, 3)``."""
        tokens, ids = super()._image_tokens(x, cond, dtype)
        source = pack_latents(cond["image_latents"].to(dtype))
        return torch.cat([tokens, source], dim=1), torch.cat([ids, self._source_ids.to(dtype)])


#: The package's assets: a relative ``model.image_root`` missing from the working folder is read
#: here, as a relative ``task.path`` is (the shipped ``edits/shapes`` set).
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def image_root(root: str) -> str:
    """``root`` itself if it is a folder, else the shipped ``assets/ROOT`` when that exists."""
    local = os.path.expanduser(root)
    shipped = os.path.join(ASSETS, root)
    if not os.path.isdir(local) and not os.path.isabs(local) and os.path.isdir(shipped):
        return shipped
    return local


def build_tiny_pipeline(seed: int = 0) -> Any:
    """A tiny ``FluxKontextPipeline``: the tiny FLUX.1 components (same transformer class)."""
    from diffusers import FluxKontextPipeline

    from advantageflow.models.tiny_pipelines import build_tiny_flux

    pipe = FluxKontextPipeline(**build_tiny_flux(seed).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe
