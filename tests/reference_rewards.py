"""Score images with the official HPSv2 (OpenCLIP) and ImageReward (BLIP) code, for the tests.

Run as a separate process by ``tests/test_rewards_official.py``::

    python tests/reference_rewards.py SPEC.json

``SPEC``: ``{"kind": "hpsv2" | "imagereward", "workdir": DIR, "images": [PNG paths],
"prompts": [...], "seed": 0}``.  The script builds a *tiny* randomly initialised model with
the official architecture code, saves it in the official checkpoint format in ``workdir``,
loads that file back the way the official package does and scores each (image, prompt) pair
with the official scoring code.  It prints ``{"scores": [...], ...files...}`` as JSON.

The reference packages live in a side folder (``<venv>/reference-rewards``, installed by
``scripts/setup.sh`` with ``--no-deps``), never in the environment the tests run in:

- torchvision from PyPI is a CUDA build; next to the CPU torch its C++ ops cannot load, and
  torchvision 0.28 then fails to import (``_meta_registrations`` registers fake kernels for
  ``torchvision::nms`` / ``qnms`` unconditionally).  Because ``transformers`` imports
  torchvision whenever it is installed, having it in the venv would break every model import.
  Here the two op *schemas* are declared before the import (no kernels: calling them still
  fails); the image transforms these scorers use are pure Python (PIL).
- ``import ImageReward`` runs its ``__init__``, which imports OpenAI's ``clip`` package (not
  on PyPI) for an unrelated baseline scorer: the BLIP and ``ImageReward`` modules are loaded
  without it.  Its ``med.py`` was written for transformers 4; the four helpers transformers 5
  removed (``apply_chunking_to_forward``, ``find_pruneable_heads_and_indices``,
  ``get_head_mask``, ``invert_attention_mask``, ``init_weights``) are put back with
  transformers 4's code, and the tokenizer gets back ``additional_special_tokens_ids``.
- ``hpsv2`` 1.2.0 on PyPI cannot be imported at all (its wheel lacks the
  ``bpe_simple_vocab_16e6.txt.gz`` its bundled OpenCLIP fork loads at import), so the HPSv2
  reference is upstream ``open_clip_torch`` (the code the fork was taken from) with
  ``hpsv2.img_score.score``'s scoring lines.
- Both official loaders download the backbone / tokenizer from the Hugging Face hub
  (``laion2B-s32B-b79K``, ``bert-base-uncased``); the tiny models are built without them.
"""

from __future__ import annotations

import json
import os
import sys
import types
from importlib.util import find_spec
from pathlib import Path

import torch

REFERENCE_DIR = Path(os.environ.get("ADVANTAGEFLOW_REFERENCE_REWARDS", Path(sys.prefix) / "reference-rewards"))

# Tiny versions of the official architectures (the real ones: ViT-H-14 / BLIP ViT-L + BERT-base).
HPS_TINY_CONFIG = {
    "embed_dim": 32,
    # head_width 48, not OpenCLIP's default 64: ViT-H-14 uses 80, so the converter must read it
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 96, "head_width": 48, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
IR_TINY_VISION = {"patch_size": 32, "embed_dim": 128, "depth": 2, "num_heads": 2}
IR_TINY_MED_CONFIG = {  # BLIP's med_config.json with small sizes (ImageReward's MLP needs width 768)
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 256,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 64,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": None,
    "encoder_width": IR_TINY_VISION["embed_dim"],
    "add_cross_attention": True,
}
WORDS = [
    "a",
    "photo",
    "of",
    "cat",
    "red",
    "square",
    "on",
    "blue",
    "background",
    "two",
    "dogs",
    "playing",
    "in",
    "the",
    "park",
    "sign",
    "that",
    "says",
    "hello",
    "an",
    "astronaut",
    "riding",
    "horse",
    "##s",
    "##ing",
]


def import_torchvision() -> None:
    """Import torchvision; where its CUDA-built ops cannot load, declare the two op schemas
    its import needs first (see the module docstring)."""
    try:
        import torchvision  # noqa: F401

        return
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - schemas only
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import_torchvision.lib = lib  # keep the registration alive
    import torchvision  # noqa: F401


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Add noise to every parameter, so that LayerNorm scales, biases and zero-initialised
    tokens differ from their init and a mis-mapped weight changes the score."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def hpsv2(spec: dict) -> dict:
    """The HPSv2 reference: OpenCLIP model, official checkpoint format, ``hpsv2.img_score.score``."""
    import open_clip
    from PIL import Image

    work = Path(spec["workdir"])
    (work / "tiny-hps.json").write_text(json.dumps(HPS_TINY_CONFIG))
    open_clip.add_model_config(work / "tiny-hps.json")
    kwargs = dict(
        precision="amp",
        device="cpu",
        jit=False,
        force_quick_gelu=False,
        force_custom_text=False,
        force_patch_dropout=False,
        force_image_size=None,
        image_mean=None,
        image_std=None,
        aug_cfg={},
        output_dict=True,
    )  # hpsv2.img_score.initialize_model's arguments
    torch.manual_seed(spec["seed"])
    model, _, _ = open_clip.create_model_and_transforms("tiny-hps", None, **kwargs)
    perturb(model, spec["seed"])
    half = {k: v.half() for k, v in model.state_dict().items()}
    ckpt = work / "HPS_tiny.pt"
    torch.save({"state_dict": half}, ckpt)  # HPS_v2(.1)_compressed.pt's layout: float16 (2 bytes / parameter)
    ddp = work / "HPS_tiny_ddp.pt"  # as the training script saves it (DistributedDataParallel)
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in half.items()}}, ddp)

    # hpsv2.img_score.score, with the model built from the tiny config instead of ViT-H-14
    model, _, preprocess_val = open_clip.create_model_and_transforms("tiny-hps", None, **kwargs)
    checkpoint = torch.load(ckpt, map_location="cpu")
    model.load_state_dict(checkpoint["state_dict"])
    tokenizer = open_clip.get_tokenizer("tiny-hps")
    model.eval()
    scores = []
    for path, prompt in zip(spec["images"], spec["prompts"]):
        with torch.no_grad():
            image = preprocess_val(Image.open(path)).unsqueeze(0)
            text = tokenizer([prompt])
            outputs = model(image, text)
            image_features, text_features = outputs["image_features"], outputs["text_features"]
            logits_per_image = image_features @ text_features.T
            scores.append(float(torch.diagonal(logits_per_image)[0]))
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, default_bpe

    return {
        "scores": scores,
        "tokens": tokenizer(spec["prompts"]).tolist(),
        "checkpoint": str(ckpt),
        "ddp_checkpoint": str(ddp),
        "config": str(work / "tiny-hps.json"),
        "bpe": default_bpe(),
        "context_length": DEFAULT_CONTEXT_LENGTH,
    }


def _transformers4_helpers() -> None:
    """transformers 4's helpers that ImageReward's ``med.py`` imports or calls (gone in 5)."""
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    def find_pruneable_heads_and_indices(*args, **kwargs):  # only used to prune heads
        raise NotImplementedError("head pruning is not needed for scoring")

    for name, fn in [
        ("apply_chunking_to_forward", getattr(pu, "apply_chunking_to_forward", None)),
        ("prune_linear_layer", getattr(pu, "prune_linear_layer", None)),
        ("find_pruneable_heads_and_indices", find_pruneable_heads_and_indices),
    ]:
        if not hasattr(mu, name):
            setattr(mu, name, fn)

    def invert_attention_mask(self, encoder_attention_mask):
        if encoder_attention_mask.dim() == 3:
            extended = encoder_attention_mask[:, None, :, :]
        if encoder_attention_mask.dim() == 2:
            extended = encoder_attention_mask[:, None, None, :]
        extended = extended.to(dtype=self.dtype)
        return (1.0 - extended) * torch.finfo(self.dtype).min

    def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
        assert head_mask is None, "head masks are not used for scoring"
        return [None] * num_hidden_layers

    for name, fn in [("invert_attention_mask", invert_attention_mask), ("get_head_mask", get_head_mask)]:
        if not hasattr(mu.PreTrainedModel, name):
            setattr(mu.PreTrainedModel, name, fn)


def _import_imagereward():
    """The ``ImageReward`` and BLIP modules of the ``image-reward`` package, without the
    package ``__init__`` (it imports OpenAI's ``clip``)."""
    root = Path(find_spec("ImageReward").origin).parent
    for name, sub in [("ImageReward", root), ("ImageReward.models", root / "models")]:
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(sub)]
            sys.modules[name] = module
    _transformers4_helpers()
    from ImageReward.models.BLIP import med

    # transformers 4's init_weights (5's needs post_init(), which med.py's models never call)
    med.BertPreTrainedModel.init_weights = lambda self: self.apply(self._init_weights)
    from ImageReward import ImageReward as image_reward
    from ImageReward.models.BLIP import blip, blip_pretrain, vit

    return image_reward, blip, blip_pretrain, vit


def imagereward(spec: dict) -> dict:
    """The ImageReward reference: ``ImageReward.load``'s steps and ``ImageReward.score``."""
    from transformers import BertTokenizer

    image_reward, blip, blip_pretrain, vit = _import_imagereward()
    work = Path(spec["workdir"])
    vocab = work / "bert-tiny"
    vocab.mkdir(exist_ok=True)
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")

    class LocalBert(BertTokenizer):  # init_tokenizer asks the hub for bert-base-uncased
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):
            return super().from_pretrained(str(vocab), *args, **kwargs)

        @property
        def additional_special_tokens_ids(self):  # transformers 4's name (5: extra_special_tokens)
            return self.convert_tokens_to_ids(list(self.extra_special_tokens))

    def tiny_vit(vit_name, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        v = IR_TINY_VISION  # create_vit knows only 'base' and 'large'
        return vit.VisionTransformer(
            img_size=image_size,
            patch_size=v["patch_size"],
            embed_dim=v["embed_dim"],
            depth=v["depth"],
            num_heads=v["num_heads"],
        ), v["embed_dim"]

    blip.BertTokenizer = LocalBert
    blip_pretrain.create_vit = tiny_vit
    tokenizer = blip.init_tokenizer()
    tokenizer.save_pretrained(work / "tokenizer")
    med = work / "med_config.json"
    med.write_text(json.dumps({**IR_TINY_MED_CONFIG, "vocab_size": len(tokenizer)}))

    torch.manual_seed(spec["seed"])
    model = image_reward.ImageReward(med_config=str(med), device="cpu")
    perturb(model, spec["seed"])
    ckpt = work / "ImageReward_tiny.pt"
    torch.save(model.state_dict(), ckpt)  # ImageReward.pt's layout: the module's state dict

    # ImageReward.load(path, med_config=...), then model.score(prompt, image_path)
    state_dict = torch.load(ckpt, map_location="cpu")
    model = image_reward.ImageReward(device="cpu", med_config=str(med)).to("cpu")
    msg = model.load_state_dict(state_dict, strict=False)
    assert not msg.missing_keys and not msg.unexpected_keys, msg
    model.eval()
    with torch.no_grad():
        scores = [float(model.score(prompt, path)) for path, prompt in zip(spec["images"], spec["prompts"])]
    return {"scores": scores, "checkpoint": str(ckpt), "med_config": str(med), "tokenizer": str(work / "tokenizer")}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    if not REFERENCE_DIR.is_dir():
        raise SystemExit(f"no reference packages at {REFERENCE_DIR} (scripts/setup.sh installs them)")
    sys.path.insert(0, str(REFERENCE_DIR))
    import_torchvision()
    torch.set_num_threads(1)
    out = {"hpsv2": hpsv2, "imagereward": imagereward}[spec["kind"]](spec)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
