"""Official HPSv2 / HPSv2.1 and ImageReward checkpoints -> the ``transformers`` models our scorers run.

- HPSv2 / HPSv2.1 (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``, hub ``xswu/HPSv2``):
  an OpenCLIP ViT-H-14 state dict under ``"state_dict"`` (``module.`` prefixes, as DDP training
  saves them, are dropped) -> ``CLIPModel``.  OpenCLIP's fused ``in_proj`` attention weights are
  split into q/k/v; ``proj`` / ``text_projection`` are transposed into ``Linear`` weights.
- ImageReward (``ImageReward.pt`` + ``med_config.json``, hub ``THUDM/ImageReward``): the state
  dict of the ``ImageReward`` module -- BLIP's ViT (``blip.visual_encoder``), BLIP's BERT with
  cross-attention (``blip.text_encoder``, the same key names as transformers' ``BlipTextModel``)
  and the MLP (``mlp.layers``) -> ``BlipForImageTextRetrieval`` + :class:`ScoreHead`.

The scorers convert on load when ``path`` is a checkpoint file; ``advantageflow convert-reward``
writes a folder they load like any other (``main`` below).  Files are read with
``torch.load(weights_only=True)`` (or safetensors): nothing in them is executed.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import html
import json
import os
import tempfile
from collections.abc import Callable
from importlib.util import find_spec
from typing import Any

import torch
from torch import Tensor

from advantageflow.rewards.base import RewardError

# open_clip/model_configs/ViT-H-14.json: the architecture of HPSv2 and HPSv2.1
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
CLIP_TOKENIZER_HUB = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the same BPE as OpenCLIP's tokenizer
BERT_TOKENIZER_HUB = "bert-base-uncased"  # what ImageReward's init_tokenizer loads


def read_state_dict(path: str) -> dict[str, Tensor]:
    """Tensors of a checkpoint file (``.pt``/``.pth``/``.bin`` or ``.safetensors``), unwrapped from
    a ``"state_dict"`` / ``"model"`` entry, with a ``module.`` prefix on every key removed."""
    if not os.path.isfile(path):
        raise RewardError(f"checkpoint not found: '{path}'")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj: Any = load_file(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - pickled objects other than tensors
            raise RewardError(f"cannot read '{path}' as a tensors-only checkpoint: {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise RewardError(f"'{path}' holds no state dict")
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


class _Taker:
    """Moves tensors out of a source state dict under new names; what is left was not converted."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        self.left = dict(state)
        self.out: dict[str, Tensor] = {}

    def pop(self, src: str) -> Tensor:
        if src not in self.left:
            raise RewardError(f"checkpoint has no '{src}'")
        return self.left.pop(src)

    def __call__(self, src: str, dst: str, fn: Callable[[Tensor], Tensor] | None = None) -> None:
        value = self.pop(src)
        self.out[dst] = fn(value) if fn else value

    def pair(self, src: str, dst: str) -> None:
        """``weight`` and ``bias`` of a Linear / LayerNorm."""
        self(f"{src}.weight", f"{dst}.weight")
        self(f"{src}.bias", f"{dst}.bias")

    def layers(self, prefix: str, marker: str) -> int:
        """How many ``prefix.<i>.marker`` keys there are (the depth of a tower)."""
        return sum(1 for k in self.left if k.startswith(prefix) and k.endswith(marker))


def _load_config(config: dict | str | None, default: dict) -> dict:
    if config is None:
        return default
    if isinstance(config, dict):
        return config
    if not os.path.isfile(config):
        raise RewardError(f"model config not found: '{config}'")
    with open(config) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# HPSv2: OpenCLIP -> CLIPModel


def _openclip_block(take: _Taker, src: str, dst: str) -> None:
    """One OpenCLIP ``ResidualAttentionBlock`` -> one ``CLIPEncoderLayer``."""
    take.pair(f"{src}.ln_1", f"{dst}.layer_norm1")
    for part in ("weight", "bias"):
        q, k, v = take.pop(f"{src}.attn.in_proj_{part}").chunk(3)
        take.out.update(
            {
                f"{dst}.self_attn.q_proj.{part}": q,
                f"{dst}.self_attn.k_proj.{part}": k,
                f"{dst}.self_attn.v_proj.{part}": v,
            }
        )
    take.pair(f"{src}.attn.out_proj", f"{dst}.self_attn.out_proj")
    take.pair(f"{src}.ln_2", f"{dst}.layer_norm2")
    take.pair(f"{src}.mlp.c_fc", f"{dst}.mlp.fc1")
    take.pair(f"{src}.mlp.c_proj", f"{dst}.mlp.fc2")


def openclip_to_clip(state: dict[str, Tensor], model_config: dict | str | None = None):
    """An OpenCLIP CLIP state dict -> ``transformers`` ``CLIPModel`` (eval mode).

    ``model_config``: the OpenCLIP model config (dict or JSON file, ``model_configs/<name>.json``
    format); default ViT-H-14's, HPSv2's.  Depths and widths are read from the tensors; the head
    counts (``head_width``, ``heads``), which shapes do not show, from the config.
    """
    from transformers import CLIPConfig, CLIPModel

    cfg = _load_config(model_config, VIT_H_14)
    vcfg, tcfg = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    take = _Taker(state)
    if "visual.conv1.weight" not in state or "token_embedding.weight" not in state:
        raise RewardError("not an OpenCLIP ViT CLIP state dict (no visual.conv1 / token_embedding)")
    v_width, _, patch, _ = state["visual.conv1.weight"].shape
    if vcfg.get("width", v_width) != v_width:
        raise RewardError(
            f"vision width {v_width} in the checkpoint, {vcfg['width']} in the model config "
            "(pass the OpenCLIP model config of this checkpoint)"
        )
    vocab, t_width = state["token_embedding.weight"].shape
    if tcfg.get("width", t_width) != t_width:
        raise RewardError(
            f"text width {t_width} in the checkpoint, {tcfg['width']} in the model config "
            "(pass the OpenCLIP model config of this checkpoint)"
        )
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    vision = dict(
        hidden_size=v_width,
        patch_size=patch,
        image_size=grid * patch,
        hidden_act=act,
        num_hidden_layers=take.layers("visual.transformer.resblocks.", ".ln_1.weight"),
        num_attention_heads=v_width // vcfg.get("head_width", 64),
        intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
    )
    text = dict(
        vocab_size=vocab,
        hidden_size=t_width,
        hidden_act=act,
        max_position_embeddings=state["positional_embedding"].shape[0],
        num_hidden_layers=take.layers("transformer.resblocks.", ".ln_1.weight"),
        num_attention_heads=tcfg.get("heads", 8),
        intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        # OpenCLIP pools the text at argmax(token id), i.e. the first <end_of_text> (the last id)
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
    )
    config = CLIPConfig(vision_config=vision, text_config=text, projection_dim=state["visual.proj"].shape[1])

    take("visual.class_embedding", "vision_model.embeddings.class_embedding")
    take("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight")
    take("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight")
    take.pair("visual.ln_pre", "vision_model.pre_layrnorm")
    for i in range(vision["num_hidden_layers"]):
        _openclip_block(take, f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}")
    take.pair("visual.ln_post", "vision_model.post_layernorm")
    take("visual.proj", "visual_projection.weight", lambda w: w.t().contiguous())
    take("token_embedding.weight", "text_model.embeddings.token_embedding.weight")
    take("positional_embedding", "text_model.embeddings.position_embedding.weight")
    for i in range(text["num_hidden_layers"]):
        _openclip_block(take, f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}")
    take.pair("ln_final", "text_model.final_layer_norm")
    take("text_projection", "text_projection.weight", lambda w: w.t().contiguous())
    take("logit_scale", "logit_scale")
    take.left.pop("attn_mask", None)  # a buffer in old OpenCLIP versions
    if take.left:  # attentional pooling, layer scale, logit_bias, ...: not a plain CLIP ViT
        raise RewardError(f"OpenCLIP keys with no CLIPModel counterpart: {sorted(take.left)[:5]}")
    return _build(CLIPModel, config, take.out)


def _no_init():
    """transformers' context that skips random weight init (the weights are loaded right after;
    for ViT-H-14 the init alone takes about a minute on a CPU)."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _build(model_cls, config, state: dict[str, Tensor], may_miss: tuple[str, ...] = ()):
    """``model_cls(config)`` with ``state`` loaded, strictly except for buffers
    (``position_ids``) and the ``may_miss`` prefixes, whose parameters are zeroed; eval mode."""
    with _no_init():
        model = model_cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.endswith("position_ids") and not k.startswith(may_miss)]
    if bad or unexpected:
        raise RewardError(f"conversion mismatch: missing {bad[:5]}, unexpected {unexpected[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in missing:
            if key in params:  # not uninitialised memory
                params[key].zero_()
    return model.eval()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table (OpenCLIP's tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_tokenizer_from_bpe(bpe_path: str):
    """A ``transformers`` ``CLIPTokenizer`` with OpenCLIP's vocabulary, built from its
    ``bpe_simple_vocab_16e6.txt.gz`` (ships in ``open_clip_torch``): the vocabulary and merges
    ``SimpleTokenizer`` derives from that file, ``<|startoftext|>`` / ``<|endoftext|>`` last."""
    from transformers import CLIPTokenizer

    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump({token: i for i, token in enumerate(vocab)}, f)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(vocab=vocab_file, merges=merges_file, model_max_length=77)


def openclip_clean(text: str) -> str:
    """OpenCLIP's (and OpenAI CLIP's) prompt clean-up before BPE: ``ftfy.fix_text`` (when
    ``ftfy`` is installed: ``pip install 'advantageflow[official-rewards]'``; it e.g. straightens
    curly quotes), HTML entities unescaped twice, whitespace runs collapsed.  Lower-casing is
    left to the tokenizer."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return " ".join(html.unescape(html.unescape(text)).split())


def openclip_bpe_file() -> str | None:
    """The BPE file of an installed ``open_clip_torch``, found without importing it."""
    spec = find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    return path if os.path.isfile(path) else None


def clip_tokenizer(source: str | None):
    """The tokenizer for a converted OpenCLIP model: ``source`` is an OpenCLIP BPE file
    (``*.txt.gz``), a tokenizer folder or hub id; default: the installed ``open_clip_torch``'s
    BPE file, else ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (same vocabulary)."""
    from transformers import AutoTokenizer

    source = source or openclip_bpe_file() or CLIP_TOKENIZER_HUB
    if source.endswith(".gz"):
        return clip_tokenizer_from_bpe(source)
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise RewardError(f"cannot load a CLIP tokenizer from '{source}': {err}") from err


# ----------------------------------------------------------------------------------------------
# ImageReward: BLIP (LAVIS / salesforce BLIP layout) -> BlipForImageTextRetrieval


def _blip_vit(take: _Taker, src: str, depth: int) -> None:
    """BLIP's ``VisionTransformer`` (timm layout) -> ``BlipVisionModel`` (``vision_model.*``)."""
    take(f"{src}.cls_token", "vision_model.embeddings.class_embedding")
    take(f"{src}.pos_embed", "vision_model.embeddings.position_embedding")
    take.pair(f"{src}.patch_embed.proj", "vision_model.embeddings.patch_embedding")
    for i in range(depth):
        s, d = f"{src}.blocks.{i}", f"vision_model.encoder.layers.{i}"
        take.pair(f"{s}.norm1", f"{d}.layer_norm1")
        take.pair(f"{s}.attn.qkv", f"{d}.self_attn.qkv")  # the same (3, heads, dim) layout
        take.pair(f"{s}.attn.proj", f"{d}.self_attn.projection")
        take.pair(f"{s}.norm2", f"{d}.layer_norm2")
        take.pair(f"{s}.mlp.fc1", f"{d}.mlp.fc1")
        take.pair(f"{s}.mlp.fc2", f"{d}.mlp.fc2")
    take.pair(f"{src}.norm", "vision_model.post_layernorm")


def imagereward_to_blip(state: dict[str, Tensor], med_config: dict | str, vision_heads: int | None = None):
    """ImageReward's state dict -> (``BlipForImageTextRetrieval``, :class:`ScoreHead`), eval mode.

    ``med_config``: BLIP's ``med_config.json`` (dict or file) for the text encoder; the ViT's
    sizes are read from the tensors, its head count is ``width // 64`` (BLIP's ViT-B and ViT-L)
    unless ``vision_heads`` is given.  ``itm_head`` (not part of ImageReward) is zero.
    """
    from transformers import BlipConfig, BlipForImageTextRetrieval

    from advantageflow.rewards.clip_scorers import ScoreHead

    med = _load_config(med_config, {})
    vit = "blip.visual_encoder"
    if f"{vit}.cls_token" not in state or "mlp.layers.0.weight" not in state:
        raise RewardError("not an ImageReward state dict (no blip.visual_encoder.cls_token / mlp.layers)")
    take = _Taker(state)
    width = state[f"{vit}.cls_token"].shape[-1]
    patch = state[f"{vit}.patch_embed.proj.weight"].shape[-1]
    grid = round((state[f"{vit}.pos_embed"].shape[1] - 1) ** 0.5)
    depth = take.layers(f"{vit}.blocks.", ".norm1.weight")
    vision = dict(
        hidden_size=width,
        patch_size=patch,
        image_size=grid * patch,
        num_hidden_layers=depth,
        num_attention_heads=vision_heads or width // 64,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        intermediate_size=state[f"{vit}.blocks.0.mlp.fc1.weight"].shape[0],
    )
    keys = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "layer_norm_eps",
        "hidden_act",
        "pad_token_id",
    )
    text = {k: med[k] for k in keys if k in med}
    text["encoder_hidden_size"] = med.get("encoder_width", width)
    config = BlipConfig(
        vision_config=vision, text_config=text, projection_dim=state["blip.vision_proj.weight"].shape[0]
    )

    _blip_vit(take, vit, depth)
    for key in [k for k in take.left if k.startswith("blip.text_encoder.")]:
        if key.endswith("position_ids"):
            take.left.pop(key)
        else:
            take(key, key[len("blip.") :])
    take.pair("blip.vision_proj", "vision_proj")
    take.pair("blip.text_proj", "text_proj")
    head_state = {k[len("mlp.") :]: take.left.pop(k) for k in [k for k in take.left if k.startswith("mlp.")]}
    if take.left:
        raise RewardError(f"ImageReward keys with no counterpart: {sorted(take.left)[:5]}")
    model = _build(BlipForImageTextRetrieval, config, take.out, may_miss=("itm_head.",))
    head = ScoreHead(text["hidden_size"] if "hidden_size" in text else 768)
    head.load_state_dict(head_state)
    return model, head.eval()


def bert_tokenizer(source: str | None):
    """ImageReward's tokenizer: ``bert-base-uncased`` (or the folder ``source``) with the two
    special tokens BLIP's ``init_tokenizer`` adds (``[DEC]`` as BOS, ``[ENC]``)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source or BERT_TOKENIZER_HUB)
    except OSError as err:
        raise RewardError(f"cannot load a BERT tokenizer from '{source or BERT_TOKENIZER_HUB}': {err}") from err
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


# ----------------------------------------------------------------------------------------------
# advantageflow convert-reward


def _save_processor(out: str, size: int) -> None:
    """The official preprocessing as a CLIP processor config: shortest side to ``size`` (bicubic),
    centre crop, OpenAI CLIP's mean/std (what :func:`clip_scorers.load_transform` reads)."""
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out)


def convert_hpsv2(checkpoint: str, out: str, model_config: str | None = None, tokenizer: str | None = None) -> None:
    """Write ``out``: ``CLIPModel`` + tokenizer + processor config, loadable by the ``hpsv2`` reward."""
    model = openclip_to_clip(read_state_dict(checkpoint), model_config)
    model.save_pretrained(out)
    clip_tokenizer(tokenizer).save_pretrained(out)
    _save_processor(out, model.config.vision_config.image_size)


def convert_imagereward(checkpoint: str, out: str, med_config: str | None = None, tokenizer: str | None = None) -> None:
    """Write ``out``: ``BlipForImageTextRetrieval`` + ``imagereward_head.safetensors`` + tokenizer +
    processor config, loadable by the ``imagereward`` reward."""
    from safetensors.torch import save_file

    med = med_config or os.path.join(os.path.dirname(checkpoint), "med_config.json")
    model, head = imagereward_to_blip(read_state_dict(checkpoint), med)
    model.save_pretrained(out)
    save_file(
        {k: v.contiguous() for k, v in head.state_dict().items()}, os.path.join(out, "imagereward_head.safetensors")
    )
    bert_tokenizer(tokenizer).save_pretrained(out)
    _save_processor(out, model.config.vision_config.image_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="advantageflow convert-reward",
        description="Convert an official HPSv2 / HPSv2.1 or ImageReward checkpoint into a folder the "
        "hpsv2 / imagereward rewards load (the rewards also take the checkpoint file directly).",
    )
    parser.add_argument("kind", choices=["hpsv2", "imagereward"])
    parser.add_argument("checkpoint", help="HPS_v2(.1)_compressed.pt or ImageReward.pt")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--model-config", help="hpsv2: OpenCLIP model config JSON (default: ViT-H-14)")
    parser.add_argument("--med-config", help="imagereward: med_config.json (default: next to the checkpoint)")
    parser.add_argument(
        "--tokenizer",
        help="tokenizer folder / hub id, or (hpsv2) OpenCLIP's bpe_simple_vocab_16e6."
        f"txt.gz (defaults: open_clip's BPE or {CLIP_TOKENIZER_HUB}; {BERT_TOKENIZER_HUB})",
    )
    args = parser.parse_args(argv)
    if args.kind == "hpsv2":
        convert_hpsv2(args.checkpoint, args.out, args.model_config, args.tokenizer)
    else:
        convert_imagereward(args.checkpoint, args.out, args.med_config, args.tokenizer)
    print(f"[advantageflow] wrote {args.kind} model to {args.out}")
    return 0
