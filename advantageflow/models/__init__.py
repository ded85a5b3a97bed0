"""Policy adapters, by name.  Heavy ones (diffusers) import their dependencies lazily.

Each entry is a class with a nested ``Config`` dataclass and
``from_config(cfg, device) -> FlowPolicy``.
"""

from advantageflow.models.base import FlowPolicy, PolicyBase
from advantageflow.registry import Registry

MODELS: Registry = Registry("model")
MODELS.register("toy_mlp", "advantageflow.models.toy:ToyMLPPolicy")
MODELS.register("shapes_dit", "advantageflow.models.dit:ShapesDiTPolicy")
MODELS.register("sd3", "advantageflow.models.diffusers_sd3:SD3Policy")
MODELS.register("flux", "advantageflow.models.diffusers_flux:FluxPolicy")
MODELS.register("qwen_image", "advantageflow.models.diffusers_qwen_image:QwenImagePolicy")
MODELS.register("sana", "advantageflow.models.diffusers_sana:SanaPolicy")
MODELS.register("flux_kontext", "advantageflow.models.diffusers_flux_kontext:FluxKontextPolicy")
MODELS.register("wan", "advantageflow.models.diffusers_wan:WanPolicy")
MODELS.register("flux2", "advantageflow.models.diffusers_flux2:Flux2Policy")

__all__ = ["MODELS", "FlowPolicy", "PolicyBase"]
