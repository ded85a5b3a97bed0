"""CLIP-family scorers on tiny randomly initialised models built and saved here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from advantageflow.rewards import RewardError, build_reward, is_differentiable  # noqa: E402
from advantageflow.rewards.clip_scorers import (  # noqa: E402
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    ImageTransform,
    ScoreHead,
)

SENTENCES = ["a photo of a cat", "a red square on a blue background", "two dogs playing in the park",
             "a sign that says hello", "an astronaut riding a horse"] * 4
PROMPTS = ["a photo of a cat", "two dogs"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=120, special_tokens=[
        "<pad>", "<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=77)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_clip")
    tok = tiny_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, **ids),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reference(clip_dir):
    """The model and processor through transformers' own API, for independent answers."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    return (CLIPModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir),
            CLIPImageProcessor.from_pretrained(clip_dir))


def images(batch=2, size=32, seed=0, lo=0.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(batch, 3, size, size, generator=g)


def hf_logits(reference, x):
    """``logits_per_image`` diagonal from CLIPModel.forward, pixels from CLIPImageProcessor."""
    model, tok, proc = reference
    arrays = list((x * 255).round().byte().permute(0, 2, 3, 1).numpy())
    pixels = proc(images=arrays, return_tensors="pt")["pixel_values"]
    text = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
    return out.logits_per_image.diagonal(), model.logit_scale.exp().item()


def test_transform_matches_clip_image_processor(reference):
    _, _, proc = reference
    x = (images(2, 48, seed=3) * 255).round() / 255  # 8-bit images, non-square resize below
    x = torch.cat([x, x.flip(-1)])[:, :, :, :40]  # 48 x 40 -> shortest side 32
    arrays = list((x * 255).round().byte().permute(0, 2, 3, 1).numpy())
    expected = proc(images=arrays, return_tensors="pt")["pixel_values"]
    got = ImageTransform(32, 32)(x)
    assert got.shape == expected.shape == (4, 3, 32, 32)
    # PIL (8-bit) and torch bicubic resampling differ slightly; normalised units (std ~0.27)
    assert (got - expected).abs().mean() < 0.03
    # at the model's size there is no resampling: exact up to float rounding
    x32 = x[:, :, :32, :32]
    exact = proc(images=list((x32 * 255).round().byte().permute(0, 2, 3, 1).numpy()), return_tensors="pt")
    assert torch.allclose(ImageTransform(32, 32)(x32), exact["pixel_values"], atol=1e-5)


def test_pickscore_hpsv2_clip_score_against_transformers(clip_dir, reference):
    x = (images() * 255).round() / 255
    logits, scale = hf_logits(reference, x)
    pick = build_reward("pickscore", {"path": clip_dir})(x, PROMPTS, [{}, {}])
    assert torch.allclose(pick, logits, atol=1e-4)
    pick26 = build_reward("pickscore", {"path": clip_dir, "divide_by": 26.0})(x, PROMPTS, [{}, {}])
    assert torch.allclose(pick26, logits / 26, atol=1e-5)
    hps = build_reward("hpsv2", {"path": clip_dir})(x, PROMPTS, [{}, {}])
    assert torch.allclose(hps, logits / scale, atol=1e-5)
    assert (hps.abs() <= 1).all()
    clip = build_reward("clip_score", {"path": clip_dir})(x, PROMPTS, [{}, {}])
    assert torch.allclose(clip, 2.5 * (logits / scale).clamp(min=0), atol=1e-5)


def test_clip_score_clamps_at_zero(clip_dir):
    reward = build_reward("clip_score", {"path": clip_dir, "weight": 1.0})
    cos = build_reward("hpsv2", {"path": clip_dir})
    found_negative = False
    for seed in range(2):
        x = images(16, seed=seed)
        c = cos(x, PROMPTS * 8, [{}] * 16)
        s = reward(x, PROMPTS * 8, [{}] * 16)
        assert torch.allclose(s, c.clamp(min=0), atol=1e-6)
        found_negative |= bool((c < 0).any())
    assert found_negative  # the random tiny model does give negative cosines


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_aesthetic_head(clip_dir, reference, tmp_path, fmt):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    head = ScoreHead(16).eval()
    file = tmp_path / f"head.{fmt}"
    if fmt == "safetensors":
        save_file(head.state_dict(), str(file))
    else:  # a checkpoint with a prefix, as some releases store it
        torch.save({f"mlp.{k}": v for k, v in head.state_dict().items()}, file)
    reward = build_reward("aesthetic", {"head_path": str(file), "clip_path": clip_dir})
    x = (images() * 255).round() / 255
    model, _, proc = reference
    pixels = proc(images=list((x * 255).round().byte().permute(0, 2, 3, 1).numpy()), return_tensors="pt")
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=pixels["pixel_values"])
        emb = getattr(emb, "pooler_output", emb)
        expected = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(reward(x, PROMPTS, [{}, {}]), expected, atol=1e-5)
    with pytest.raises(RewardError, match="score head"):
        build_reward("aesthetic", {"head_path": str(file), "clip_path": clip_dir}).__class__(
            head_path=str(tmp_path / "missing.pth"), clip_path=clip_dir)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_blip")
    tok = tiny_tokenizer()
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, encoder_hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         sep_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=0.02),  # BLIP's default is 1e-10
        projection_dim=16,
    )
    BlipForImageTextRetrieval(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    save_file(ScoreHead(32).state_dict(), str(path / "imagereward_head.safetensors"))
    return str(path)


def test_imagereward_head_and_normalisation(blip_dir):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    reward = build_reward("imagereward", {"path": blip_dir})
    x = images()
    got = reward(x, PROMPTS, [{}, {}])
    # independent: transformers' modules called directly, ImageReward's formula
    model = BlipForImageTextRetrieval.from_pretrained(blip_dir).eval()
    tok = AutoTokenizer.from_pretrained(blip_dir)(PROMPTS, padding="max_length", max_length=35,
                                                   truncation=True, return_tensors="pt")
    head = ScoreHead(32).eval()
    head.load_state_dict(load_file(f"{blip_dir}/imagereward_head.safetensors"))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.vision_model(pixel_values=(x - mean) / std).last_hidden_state
        txt = model.text_encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                                 encoder_hidden_states=img).last_hidden_state[:, 0]
        expected = (head(txt) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
    assert torch.allclose(got, expected, atol=1e-5)
    # the [CLS] feature reads the image (cross-attention), not only the prompt
    with torch.no_grad():
        a, b = reward.features(x, PROMPTS), reward.features(images(seed=5), PROMPTS)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "hpsv2", "aesthetic", "imagereward"])
def test_differentiable_path(name, clip_dir, blip_dir, tmp_path):
    from safetensors.torch import save_file

    args = {"path": clip_dir, "dtype": "float64"}
    if name == "aesthetic":
        torch.manual_seed(2)
        save_file(ScoreHead(16).state_dict(), str(tmp_path / "h.safetensors"))
        args = {"clip_path": clip_dir, "head_path": str(tmp_path / "h.safetensors"), "dtype": "float64"}
    if name == "imagereward":
        args = {"path": blip_dir, "dtype": "float64"}
    reward = build_reward(name, args)
    assert is_differentiable(reward)
    # 40 x 40 images: resize to 32 runs through torch's bicubic, so gradients cross it too;
    x = images(2, 40, seed=7, lo=0.3, hi=0.7).double().requires_grad_(True)
    prompts = PROMPTS
    if name == "clip_score":  # prompts with a positive cosine under this seed (no clamp)
        prompts = ["an astronaut riding a horse", "hello"]
    s = reward(x, prompts, [{}, {}])
    assert s.grad_fn is not None and (name != "clip_score" or (s > 0.05).all())
    (grad,) = torch.autograd.grad(s.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # directional derivative against central finite differences
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = 1e-5  # everything in float64
    with torch.no_grad():
        plus, minus = reward(x + h * d, prompts, [{}, {}]), reward(x - h * d, prompts, [{}, {}])
    fd = (plus.double().sum() - minus.double().sum()) / (2 * h)
    assert torch.allclose((grad * d).sum(), fd, rtol=1e-5, atol=1e-9), ((grad * d).sum(), fd)
    # no graph when images need no gradient
    assert reward(x.detach(), prompts, [{}, {}]).grad_fn is None


def test_loader_errors(tmp_path):
    with pytest.raises(RewardError, match="cannot load a CLIP model"):
        build_reward("pickscore", {"path": str(tmp_path)})
    with pytest.raises(ValueError, match="did you mean 'path'"):
        build_reward("hpsv2", {"pth": "x"})


def test_preprocessing_uses_saved_config(clip_dir):
    from advantageflow.rewards.clip_scorers import load_transform

    t = load_transform(clip_dir, 224)
    assert (t.size, t.crop) == (32, 32)
    assert np.allclose(t.mean, [0.48145466, 0.4578275, 0.40821073])
    x = images(1, 64)
    assert t(x).shape == (1, 3, 32, 32)
    assert F.mse_loss(t(x), t(x)) == 0
