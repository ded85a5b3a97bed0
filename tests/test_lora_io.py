"""LoRA in and out (tiny SD3 pipeline, CPU): checkpoints that diffusers' ``load_lora_weights``
attaches, ``model.lora.init_from`` in diffusers and PEFT format, ``model.lora.merge_at_end``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from advantageflow.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from advantageflow.config import load_config  # noqa: E402
from advantageflow.configbase import ConfigError  # noqa: E402
from advantageflow.models.export import export_lora, load_policy  # noqa: E402
from advantageflow.models.lora_io import ADAPTER_FILE  # noqa: E402
from advantageflow.trainer import train  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.test_diffusers_adapters import (  # noqa: E402
    PROMPTS,
    SEQ,
    adapter_samples,
    fresh_pipeline,
    make_policy,
    perturb_lora,
    pipeline_latents,
    raw_transformer_velocity,
)
from tests.test_diffusers_training import _one_thread, tiny_overrides  # noqa: E402, F401


def lora_count(transformer) -> tuple[int, int]:
    """(number of LoRA tensors, their elements) attached to a transformer."""
    named = [p for n, p in transformer.named_parameters() if "lora_" in n]
    return len(named), sum(p.numel() for p in named)


def start_velocity(policy, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, t, our velocity) at a fixed random state, for comparing with diffusers."""
    x = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        return x, t, policy.velocity(x, t, policy.encode(PROMPTS))


def test_checkpoints_hold_a_loadable_adapter_and_merge_at_end(tmp_path):
    from diffusers import SD3Transformer2DModel

    cfg = load_config(
        str(REPO / "configs/sd3_tiny_advantageflow.yaml"),
        tiny_overrides("sd3", "advantageflow") + ["model.lora.merge_at_end=true"],
    )
    train(cfg, tmp_path / "run")
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")  # verified: the adapter is in the manifest
    assert (ckpt / ADAPTER_FILE).is_file()
    # Our policy from the checkpoint, with the prompt length the pipeline calls below use.
    policy = load_policy(replace(cfg.model, max_sequence_length=SEQ), load_checkpoint(ckpt).policy)
    assert sum(float(p.detach().abs().sum()) for n, p in policy.trainable_named_parameters() if "lora_B" in n) > 0

    pipe = fresh_pipeline("sd3")
    pipe.load_lora_weights(str(ckpt))  # the plain diffusers call, no weight_name
    assert lora_count(pipe.transformer) == lora_count(policy.transformer)
    noise = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        adapter_samples(policy, noise), pipeline_latents("sd3", pipe, noise, 1.0), atol=2e-5, rtol=1e-4
    )

    merged = SD3Transformer2DModel.from_pretrained(str(tmp_path / "run" / "merged" / "transformer"))
    assert lora_count(merged) == (0, 0)
    x, t, v = start_velocity(policy)
    out = raw_transformer_velocity("sd3", _with_transformer(merged), x, t, 0.0)
    torch.testing.assert_close(out, v, atol=1e-5, rtol=1e-5)


def _with_transformer(transformer):
    pipe = fresh_pipeline("sd3")
    pipe.transformer = transformer
    return pipe


@pytest.mark.parametrize("as_file", [False, True])
def test_init_from_a_diffusers_adapter_starts_where_diffusers_is(tmp_path, as_file):
    source = make_policy("sd3", lora={"rank": 4, "alpha": 8.0})
    perturb_lora(source, seed=3)
    export_lora(source, str(tmp_path / "lora"))
    where = tmp_path / "lora" / ADAPTER_FILE if as_file else tmp_path / "lora"
    policy = make_policy("sd3", lora={"rank": 4, "alpha": 8.0, "init_from": str(where)})
    x, t, v = start_velocity(policy)
    pipe = fresh_pipeline("sd3")
    pipe.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(v, raw_transformer_velocity("sd3", pipe, x, t, 0.0), atol=1e-5, rtol=1e-5)
    with torch.no_grad(), policy.reference():  # the reference stays the base model
        v_ref = policy.velocity(x, t, policy.encode(PROMPTS))
    assert (v - v_ref).abs().max() > 1e-3


def test_init_from_a_peft_adapter_starts_where_peft_is(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=6.0, target_modules=["attn.to_q", "attn.to_v"], init_lora_weights="gaussian")
    model = get_peft_model(fresh_pipeline("sd3").transformer, cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(tmp_path / "peft"))
    assert (tmp_path / "peft" / "adapter_config.json").is_file()

    # Our targets cover more modules than the file's: those start at zero update.
    policy = make_policy("sd3", lora={"rank": 4, "alpha": 6.0, "init_from": str(tmp_path / "peft")})
    x, t, v = start_velocity(policy)
    loaded = PeftModel.from_pretrained(fresh_pipeline("sd3").transformer, str(tmp_path / "peft"))
    pipe = fresh_pipeline("sd3")
    pipe.transformer = loaded.base_model.model
    torch.testing.assert_close(v, raw_transformer_velocity("sd3", pipe, x, t, 0.0), atol=1e-5, rtol=1e-5)


def test_init_from_refuses_what_does_not_fit(tmp_path):
    source = make_policy("sd3", lora={"rank": 4, "alpha": 8.0})
    export_lora(source, str(tmp_path / "lora"))
    lora = str(tmp_path / "lora")
    with pytest.raises(ConfigError, match="does not exist"):
        make_policy("sd3", lora={"rank": 4, "alpha": 8.0, "init_from": str(tmp_path / "nothing")})
    with pytest.raises(ConfigError, match="neither pytorch_lora_weights.safetensors"):
        make_policy("sd3", lora={"rank": 4, "alpha": 8.0, "init_from": str(tmp_path)})
    with pytest.raises(ConfigError, match="has rank 4, model.lora.rank is 2: set model.lora.rank=4"):
        make_policy("sd3", lora={"rank": 2, "alpha": 8.0, "init_from": lora})
    with pytest.raises(ConfigError, match="has alpha 8, model.lora.alpha is 4"):
        make_policy("sd3", lora={"rank": 4, "alpha": 4.0, "init_from": lora})
    with pytest.raises(ConfigError, match=r"adapts \d+ module\(s\) that model.lora.target_modules \(attn.to_q\)"):
        make_policy("sd3", lora={"rank": 4, "alpha": 8.0, "init_from": lora, "target_modules": ["attn.to_q"]})
    with pytest.raises(ConfigError, match="needs lora.enabled=true"):
        make_policy("sd3", lora={"enabled": False, "init_from": lora})
