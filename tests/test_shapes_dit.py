"""The ShapesDiT policy: tokenizer, CFG, reference copy, decode, asset round trip, and the
shipped checkpoint (loads, samples deterministically, beats chance, better FM loss than init)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from advantageflow.configbase import ConfigError
from advantageflow.models import MODELS, FlowPolicy
from advantageflow.models.dit import (
    ASSET_DIR,
    NULL,
    PAD,
    UNK,
    VOCAB,
    DiTConfig,
    ShapesDiT,
    ShapesDiTPolicy,
    load_asset,
    phrase_segments,
    save_asset,
    tokenize,
)
from advantageflow.rollouts import SamplingSpec, generate, generate_from_noise, sample_noise
from advantageflow.seeding import eval_noise_key
from advantageflow.tasks.base import Prompt
from advantageflow.tasks.shapes.evaluator import asset_sampler, flow_matching_loss, sample_shapes_eval
from advantageflow.tasks.shapes.grammar import all_specs, parse_prompt, to_prompt


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    torch.manual_seed(0)
    net = ShapesDiT(DiTConfig(width=32, depth=2, heads=2))
    with torch.no_grad():  # adaLN-Zero starts at zero output; give it a non-trivial field
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("asset")
    save_asset(net, {"sampling": {"eval_steps": 4, "guidance_scale": 2.0}}, folder)
    return ShapesDiTPolicy.from_config(ShapesDiTPolicy.Config(path=str(folder)))


def test_tokenizer_covers_the_grammar():
    words = {w for s in all_specs() for w in to_prompt(s).split()}
    assert words <= set(VOCAB)
    ids = tokenize(["a red circle", "", "a mauve circle"], 12)
    assert ids.shape == (3, 12) and ids.dtype == torch.long
    assert ids[0, :3].tolist() == [VOCAB.index("a"), VOCAB.index("red"), VOCAB.index("circle")]
    assert ids[0, 3:].eq(PAD).all() and ids[1, 0] == NULL and ids[2, 1] == UNK
    with pytest.raises(ValueError, match="at most"):
        tokenize(["a " * 13], 12)


def test_registered_and_protocol(tiny_policy):
    assert MODELS.get("shapes_dit") is ShapesDiTPolicy
    assert isinstance(tiny_policy, FlowPolicy)
    assert tiny_policy.sample_shape == (3, 32, 32)
    cond = tiny_policy.encode(["a red circle", "two squares"])
    assert cond["tokens"].shape == cond["null"].shape == (2, 12)
    assert cond["null"][:, 0].eq(NULL).all()


def test_cfg_matches_its_formula(tiny_policy):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=gen)
    t = torch.rand(3, generator=gen)
    cond = tiny_policy.encode(["a red circle", "two squares", "a circle above a square"])
    with torch.no_grad():
        v_c = tiny_policy.net(x, t, cond["tokens"])
        v_u = tiny_policy.net(x, t, cond["null"])
        v1 = tiny_policy.velocity(x, t, cond, guidance_scale=1.0)
        v3 = tiny_policy.velocity(x, t, cond, guidance_scale=3.0)
    assert torch.allclose(v1, v_c, atol=1e-6)
    assert torch.allclose(v3, v_u + 3.0 * (v_c - v_u), atol=1e-5)
    assert not torch.allclose(v_c, v_u)


def test_reference_is_a_frozen_copy(tiny_policy):
    x = torch.randn(2, 3, 32, 32)
    t = torch.full((2,), 0.5)
    cond = tiny_policy.encode(["a circle", "a square"])
    with torch.no_grad():
        before = tiny_policy.velocity(x, t, cond)
    snap = tiny_policy.snapshot()
    with torch.no_grad():
        for p in tiny_policy.trainable_parameters():
            p.add_(0.1)
    with torch.no_grad(), tiny_policy.reference():
        ref = tiny_policy.velocity(x, t, cond)
        assert all(not p.requires_grad for p in tiny_policy.ref_net.parameters())
    with torch.no_grad():
        moved = tiny_policy.velocity(x, t, cond)
    assert torch.allclose(ref, before) and not torch.allclose(moved, before)
    tiny_policy.load_trainable_state(dict(zip([n for n, _ in tiny_policy.trainable_named_parameters()], snap)))
    with torch.no_grad():
        assert torch.allclose(tiny_policy.velocity(x, t, cond), before)


def test_decode_range_and_gradient(tiny_policy):
    x = (torch.randn(2, 3, 32, 32) * 2).requires_grad_(True)
    img = tiny_policy.decode(x)
    assert float(img.detach().min()) >= 0 and float(img.detach().max()) <= 1
    img.sum().backward()
    inside = (x.detach().abs() < 1).float()
    assert torch.allclose(x.grad, 0.5 * inside)  # d/dx of (x+1)/2 where not clamped


def test_gradients_reach_every_trainable_parameter(tiny_policy):
    x = torch.randn(2, 3, 32, 32)
    cond = tiny_policy.encode(["a red circle", ""])
    tiny_policy.velocity(x, torch.rand(2), cond, guidance_scale=2.0).pow(2).mean().backward()
    names = [n for n, p in tiny_policy.trainable_named_parameters() if p.grad is None]
    assert not names
    for p in tiny_policy.trainable_parameters():
        p.grad = None


def test_missing_asset_has_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain shapes"):
        ShapesDiTPolicy.from_config(ShapesDiTPolicy.Config(path=str(tmp_path)))


def test_a_shipped_base_is_named_and_a_folder_of_that_name_wins(tmp_path, monkeypatch):
    from advantageflow.models.dit import SHIPPED_ASSETS, asset_folder

    monkeypatch.chdir(tmp_path)
    assert asset_folder("") == ASSET_DIR == SHIPPED_ASSETS["shapes_dit"]
    assert asset_folder("shapes_unet") == SHIPPED_ASSETS["shapes_unet"]
    assert asset_folder("shapes_unet_small") == SHIPPED_ASSETS["shapes_unet_small"]  # made on the AMD EPYC
    (tmp_path / "shapes_unet").mkdir()
    assert asset_folder("shapes_unet").resolve() == (tmp_path / "shapes_unet").resolve()  # the user's own folder
    with pytest.raises(FileNotFoundError, match="shipped base: shapes_dit, shapes_unet"):
        ShapesDiTPolicy.from_config(ShapesDiTPolicy.Config(path="shapes_unet"))  # empty folder


# --------------------------------------------------------------------------- shipped model


@pytest.fixture(scope="module")
def shipped():
    return ShapesDiTPolicy.from_config(ShapesDiTPolicy.Config())


def test_shipped_asset_config_documents_sampling_and_training():
    meta = json.loads((ASSET_DIR / "config.json").read_text())
    assert {"steps", "eval_steps", "guidance_scale", "solver"} <= set(meta["sampling"])
    assert meta["pretrain"]["steps_done"] > 0 and meta["pretrain"]["wall_s"] > 0
    assert (ASSET_DIR / "model.safetensors").stat().st_size < 10 * 2**20


def test_shipped_model_samples_deterministically(shipped):
    specs = [parse_prompt(t) for t in ("a red circle", "two blue squares", "a green triangle left of a yellow circle")]
    sampler = asset_sampler(shipped, steps=6)
    a = sample_shapes_eval(shipped, specs, 1, sampler, seed=7)
    b = sample_shapes_eval(shipped, specs, 1, sampler, seed=7)
    c = sample_shapes_eval(shipped, specs, 1, sampler, seed=8)
    assert a.shape == (3, 3, 32, 32) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def _keyed_images(policy, prompts: list[str], sampler) -> torch.Tensor:
    """``rollouts.generate``'s images of ``prompts`` with evaluation keys 0..B-1."""
    spec = SamplingSpec.for_evaluation(policy, sampler)
    keys = [eval_noise_key(0, i) for i in range(len(prompts))]
    return policy.decode(generate(policy, [Prompt(t) for t in prompts], keys, list(range(len(prompts))), spec).x0)


def test_the_shapes_evaluator_samples_as_rollouts_generate_and_honours_solver_and_shift(shipped):
    specs = [parse_prompt(t) for t in ("a red circle", "two blue squares")]
    noise, _ = sample_noise(tuple(shipped.sample_shape), [eval_noise_key(0, i) for i in range(2)])
    images = {}
    for name, change in {"base": {}, "shift": {"shift": 3.0}, "solver": {"eval_solver": "heun"}}.items():
        sampler = replace(asset_sampler(shipped, steps=4), **change)
        keyed = _keyed_images(shipped, [to_prompt(s) for s in specs], sampler)
        spec = SamplingSpec.for_evaluation(shipped, sampler)
        rollout = generate_from_noise(shipped, [Prompt(to_prompt(s)) for s in specs], noise, [0, 1], spec)
        assert torch.equal(shipped.decode(rollout.x0), keyed)  # one path: generate is built on it
        images[name] = sample_shapes_eval(shipped, specs, 1, sampler)
    assert asset_sampler(shipped).eval_solver == "euler" and asset_sampler(shipped).shift == 1.0
    assert not torch.allclose(images["base"], images["shift"], atol=1e-3)
    assert not torch.allclose(images["base"], images["solver"], atol=1e-3)


def test_the_checkpoint_evaluation_draws_the_trainer_evaluations_noise(shipped):
    """``evaluate_checkpoint`` (end of pretraining) and ``advantageflow eval`` / the trainer score the same images."""
    from advantageflow.evaluation import generate_eval_samples
    from advantageflow.tasks.shapes.grammar import eval_slots

    specs, per = list(eval_slots())[:2], 2
    sampler = asset_sampler(shipped, steps=3)
    ours = sample_shapes_eval(shipped, specs, per, sampler, seed=3)
    spec = SamplingSpec.for_evaluation(shipped, sampler)
    prompts = [Prompt(to_prompt(specs[i // per])) for i in range(len(specs) * per)]
    theirs = generate_eval_samples(shipped, prompts, list(range(len(prompts))), 3, spec, per)
    assert torch.equal(ours, shipped.decode(theirs.x0))


def test_shipped_model_fits_renders_better_than_an_untrained_one(shipped):
    trained = flow_matching_loss(shipped, num_images=32, times=2)
    assert flow_matching_loss(shipped, num_images=32, times=2) == trained  # deterministic
    untrained = ShapesDiTPolicy(ShapesDiT(DiTConfig(**json.loads((ASSET_DIR / "config.json").read_text())["model"])))
    assert trained < 0.7 * flow_matching_loss(untrained, num_images=32, times=2)


@pytest.mark.parametrize("conv,mid", [(0, 0), (8, 0), (8, 8)])
def test_every_architecture_variant_maps_images_to_velocities_and_trains_every_parameter(conv, mid):
    torch.manual_seed(0)
    net = ShapesDiT(DiTConfig(width=32, depth=1, heads=2, conv_channels=conv, mid_channels=mid))
    with torch.no_grad():  # zero-initialised output layers would block gradients to the rest
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 3, 32, 32)
    v = net(x, torch.rand(3), tokenize(["a red circle", "two bars", ""], 12))
    assert v.shape == x.shape
    v.pow(2).mean().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []


def test_phrase_segments_give_each_objects_words_their_own_segment():
    """Over the whole grammar: every word of an object's noun phrase has that object's segment
    (1 for the first, 2 for the second), connectors 3, padding 0, whatever the phrase's length."""
    seen = set()
    for spec in all_specs():
        prompt = to_prompt(spec)
        words = prompt.split()
        seg = phrase_segments(tokenize([prompt], 12))[0].tolist()
        assert seg[len(words):] == [0] * (12 - len(words))
        phrases = " ".join(str(s) for s in seg[: len(words)]).replace("3", "|").split("|")
        assert [set(p.split()) for p in phrases if p.strip()] == [{"1"}, {"2"}][: len(spec.objects)], prompt
        seen.add(len(spec.objects))
    assert seen == {1, 2}
    assert phrase_segments(tokenize(["", "a square left of a circle"], 12)).tolist() == [
        [0] * 12, [1, 1, 3, 3, 2, 2] + [0] * 6]


def test_text_segments_tell_whose_colour_a_word_is_without_word_positions():
    """Without word positions the network cannot tell "a red square and a green ring" from
    "a green square and a red ring" (attention is blind to order); the segment embedding can,
    and a saved asset keeps it."""
    torch.manual_seed(0)
    x, t = torch.randn(1, 3, 32, 32), torch.rand(1)
    swapped = tokenize(["a red square and a green ring", "a green square and a red ring"], 12)
    outputs = {}
    for segments in (False, True):
        net = ShapesDiT(DiTConfig(width=32, depth=1, heads=2, conv_channels=8, text_segments=segments))
        with torch.no_grad():  # weights large enough for attention that is far from uniform
            for p in net.parameters():
                p.add_(0.3 * torch.randn_like(p))
            net.pos.zero_()
            net.tok_pos.zero_()
            if segments:
                net.tok_seg.weight.normal_()  # as large as a trained one, so the effect is plain
        outputs[segments] = net(x.expand(2, -1, -1, -1), t.expand(2), swapped)
    same = (outputs[False][0] - outputs[False][1]).abs().max()
    differ = (outputs[True][0] - outputs[True][1]).abs().max()
    assert same < 1e-4 * outputs[False].abs().max()  # float rounding only
    assert differ > 1e-2 * outputs[True].abs().max()
    assert DiTConfig().text_segments is False  # assets saved before the option load as they were


def test_an_asset_with_text_segments_round_trips(tmp_path):
    torch.manual_seed(0)
    net = ShapesDiT(DiTConfig(width=32, depth=1, heads=2, conv_channels=8, text_segments=True))
    save_asset(net, {}, tmp_path)
    loaded, meta = load_asset(tmp_path)
    assert meta["model"]["text_segments"] is True and loaded.cfg.text_segments
    x, t, tokens = torch.randn(2, 3, 32, 32), torch.rand(2), tokenize(["a red circle", "two bars"], 12)
    torch.testing.assert_close(loaded(x, t, tokens), net.eval()(x, t, tokens))


def test_half_resolution_stage_needs_the_full_resolution_one():
    with pytest.raises(ValueError, match="mid_channels needs conv_channels"):
        ShapesDiT(DiTConfig(conv_channels=0, mid_channels=8))


def test_x_prediction_turns_the_networks_clean_image_into_the_velocity():
    """``prediction: x0``: the network's output is the clean-image estimate; its velocity is
    ``(x_t - x0_hat) / max(t, t_min)``, so an exact x0 gives the exact velocity ``eps - x0``."""
    torch.manual_seed(0)
    net = ShapesDiT(DiTConfig(width=32, depth=1, heads=2, conv_channels=8, prediction="x0"))
    x0, eps = torch.rand(3, 3, 32, 32) * 2 - 1, torch.randn(3, 3, 32, 32)
    t = torch.tensor([0.02, 0.5, 0.9])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    tokens = tokenize(["a red circle", "two bars", ""], 12)
    net._network = lambda x, t, tokens: x0  # an oracle network: the velocity must be exact
    v = net(x_t, t, tokens)
    torch.testing.assert_close(v[1:], (eps - x0)[1:], rtol=1e-5, atol=1e-5)
    # below t_min the division is floored: bounded, and exact again at t = t_min
    torch.testing.assert_close(v[0], (x_t[0] - x0[0]) / 0.05)
    with pytest.raises(ValueError, match="prediction must be"):
        ShapesDiT(DiTConfig(prediction="eps"))


def test_the_checkpoint_evaluation_scores_as_the_trainer_evaluation(shipped):
    """``evaluate_shapes_eval`` (end of pretraining, ``config.json``) gives ``ShapesTask.evaluate``'s
    figures, diversity included, where two evaluation slots share a prompt (8 of the 96 do):
    both pool those slots' samples (it grouped by slot before 2026-12-05: 0.2243 against 0.2276
    for the shipped U-Net)."""
    from advantageflow.tasks.shapes.evaluator import evaluate_shapes_eval
    from advantageflow.tasks.shapes.grammar import eval_slots
    from advantageflow.tasks.shapes.task import ShapesTask

    slots = list(eval_slots())
    texts = [to_prompt(s) for s in slots]
    first = next(i for i, t in enumerate(texts) if texts.count(t) > 1)
    twin = texts.index(texts[first], first + 1)
    specs, per = [slots[first], slots[twin], slots[0 if first else 1]], 2
    sampler = asset_sampler(shipped, steps=3)
    ours = evaluate_shapes_eval(shipped, specs, per, sampler, seed=3)
    images = sample_shapes_eval(shipped, specs, per, sampler, seed=3)
    prompts = [Prompt(to_prompt(specs[i // per]), specs[i // per].to_dict()) for i in range(len(specs) * per)]
    theirs = ShapesTask().evaluate(images, prompts)
    assert set(ours) == set(theirs) and "diversity" in ours
    assert all(ours[k] == theirs[k] for k in ours), {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}


def test_train_only_trains_the_named_parameters_and_freezes_the_rest(tiny_policy):
    net = copy.deepcopy(tiny_policy.net)
    policy = ShapesDiTPolicy(net, tiny_policy.meta, train_only=["blocks.1.*", "pos"])
    names = [n for n, _ in policy.trainable_named_parameters()]
    assert names and all(n.startswith("blocks.1.") or n == "pos" for n in names)
    assert set(policy.trainable_state()) == set(names)  # checkpoints hold the trained subset only
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if n not in names}
    before = {n: p.detach().clone() for n, p in policy.trainable_named_parameters()}
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.1)
    x = torch.randn(2, 3, 32, 32)
    policy.velocity(x, torch.rand(2), policy.encode(["a red circle", "two blue squares"])).pow(2).mean().backward()
    assert all(p.grad is None for n, p in net.named_parameters() if n not in names)  # no wasted gradients
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in net.named_parameters() if n in frozen)
    assert any(not torch.equal(p, before[n]) for n, p in policy.trainable_named_parameters())
    assert all(torch.equal(a, b) for a, b in zip(policy.ref_net.parameters(), tiny_policy.ref_net.parameters()))


def test_train_only_patterns_that_match_nothing_are_refused_with_the_module_names(tiny_policy):
    with pytest.raises(ConfigError, match=r"\['block\.\*'\] match no parameter name;.*'blocks'"):
        ShapesDiTPolicy(copy.deepcopy(tiny_policy.net), tiny_policy.meta, train_only=["blocks.*", "block.*"])
    with pytest.raises(ConfigError, match=r"\['tok'\] match no parameter name \(did you mean 'tok\.\*'\?\)"):
        ShapesDiTPolicy(copy.deepcopy(tiny_policy.net), tiny_policy.meta, train_only=["tok"])


def test_train_only_a_u_net_decoder_block_below_frozen_layers():
    """The U-Net's ``dec2`` alone: its GroupNorms see channels-last inputs that need no gradient
    (every layer below is frozen), the case that crashed ATen's backward (tests/test_fixed_split.py)."""
    from advantageflow.models.unet import ShapesUNet, UNetConfig

    torch.manual_seed(0)
    net = ShapesUNet(UNetConfig(base_channels=8, mid_channels=16, width=32, depth=1, heads=2))
    policy = ShapesDiTPolicy(net, {}, train_only=["dec2.*"])
    x = torch.randn(2, 3, 32, 32)
    policy.velocity(x, torch.rand(2), policy.encode(["a red circle", "two blue squares"])).pow(2).mean().backward()
    trained = {n for n, p in net.named_parameters() if p.grad is not None}
    assert trained and trained == {n for n, _ in policy.trainable_named_parameters()}
    assert all(n.startswith("dec2.") for n in trained)
