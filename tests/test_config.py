"""Typed configs: unknown keys and wrong types are named, every shipped config validates."""

from __future__ import annotations

import glob

import pytest

from advantageflow.config import Config, advantage_clip, load_config
from advantageflow.configbase import ConfigError
from tests.conftest import REPO

TOY = str(REPO / "configs" / "toy2d_advantageflow.yaml")


def test_unknown_key_suggests_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rate'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"did you mean 'train.epochs'"):
        load_config(None, ["train.epoch=3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"'train.group_size' must be an integer"):
        load_config(None, ["train.group_size=abc"])
    with pytest.raises(ConfigError, match=r"'sampler.solver' must be one of .*did you mean 'euler'"):
        load_config(None, ["sampler.solver=eular"])


def test_algorithm_section_is_typed_and_tied_to_algo():
    cfg = load_config(None, ["advantageflow.gamma=2.0"])
    assert cfg.algorithm.gamma == 2.0
    with pytest.raises(ConfigError, match=r"unknown config key 'advantageflow.gama'.*'advantageflow.gamma'"):
        load_config(None, ["advantageflow.gama=2.0"])
    with pytest.raises(ConfigError, match=r"unknown algorithm 'advantagefow'.*did you mean 'advantageflow'"):
        load_config(None, ["algo=advantagefow"])


def test_tagged_union_model_options():
    cfg = load_config(TOY, ["model.hidden=64"])
    assert cfg.model.hidden == 64
    with pytest.raises(ConfigError, match=r"'model.name'.*unknown model 'toy_mpl'.*did you mean 'toy_mlp'"):
        load_config(None, ["model.name=toy_mpl"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model.hiden'"):
        load_config(TOY, ["model.hiden=3"])


def test_impossible_combinations_rejected():
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        load_config(None, ["train.group_size=1"])
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        load_config(None, ["train.prompts_per_epoch=3", "train.group_size=3", "train.steps_per_epoch=2"])


def test_overrides_parse_yaml_values():
    cfg = load_config(TOY, ["train.lr=1e-4", "log.tensorboard=false", "task.rewarded_modes=[1,2]"])
    assert cfg.train.lr == 1e-4 and cfg.log.tensorboard is False and cfg.task.rewarded_modes == [1, 2]


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(str(REPO / "configs" / "toy2d_advantageflow.yaml"), ["train.epochs=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(str(path))
    assert again.to_dict() == cfg.to_dict()
    assert isinstance(again, Config)


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs" / "*.yaml"))), ids=lambda p: p.split("/")[-1])
def test_every_shipped_config_validates(path):
    load_config(path)


def test_main_job_config_is_the_default():
    """`advantageflow train` with no arguments runs exactly configs/shapes_advantageflow.yaml."""
    assert load_config(str(REPO / "configs" / "shapes_advantageflow.yaml")).to_dict() == load_config(None).to_dict()


def test_the_long_config_is_the_main_job_before_2026_12_04_run_long():
    """configs/shapes_advantageflow_long.yaml differs from the main job only where its header says."""
    long = load_config(str(REPO / "configs" / "shapes_advantageflow_long.yaml"))
    earlier = ["advantageflow.target_radius=0.1", "train.prompts_per_epoch=16", "train.group_size=8", "train.lr=1e-4"]
    again = load_config(None, [*earlier, "train.epochs=300", "eval.every=30"])
    assert long.to_dict() == again.to_dict()
    assert long.algorithm.lambda_ref == load_config(None).algorithm.lambda_ref == 0.001


def _cfg(name: str):
    return load_config(str(REPO / "configs" / name))


def test_flow_grpo_presets_are_the_released_ones():
    """yifan123/flow_grpo config/grpo.py: pickscore_sd3 (beta 0.01, CFG 4.5, clip 1e-4) and
    the Fast no-CFG configs (CPS, noise level 0.8, a 3-step window inside [0, N // 2), clip
    1e-5, beta 0); both evaluate an EMA (0.9) and encode 128 T5 tokens."""
    full, fast = _cfg("sd3_5m_flow_grpo.yaml"), _cfg("sd3_5m_flow_grpo_fast.yaml")
    a = full.algorithm
    released = ("sde", 0.7, 1e-4, 0.01, 4.5)
    assert (a.stochastic, a.noise_level, a.clip_range, a.beta, full.sampler.guidance_scale) == released
    f = fast.algorithm
    assert (f.stochastic, f.noise_level, f.clip_range, f.beta, f.fast_window) == ("cps", 0.8, 1e-5, 0.0, 3)
    assert f.fast_window_range == [0, fast.sampler.steps // 2]
    assert fast.sampler.guidance_scale == 1.0 and fast.model.cfg is False
    for cfg in (full, fast):
        assert cfg.eval.ema_decay == 0.9 and cfg.model.max_sequence_length == 128


def test_awm_and_nft_configs_follow_the_released_ones():
    for name in ("sd3_5m_awm.yaml", "flux_dev_awm.yaml", "sd3_tiny_awm.yaml", "flux_tiny_awm.yaml", "toy2d_awm.yaml"):
        a = _cfg(name).algorithm
        assert a.clip_range == 1.0 and a.weighting == "ghuber", name  # every released AWM config
    for name in ("sd3_5m_awm.yaml", "flux_dev_awm.yaml"):  # PickScore: indices 0..11, no SA noise
        cfg = _cfg(name)
        assert (cfg.algorithm.timestep_low, cfg.algorithm.timestep_high, cfg.algorithm.sa_tau) == (0, 11, 0.0)
        assert cfg.algorithm.solver == "sa_solver" and cfg.eval.ema_decay == 0.99
    for name in ("sd3_5m_diffusion_nft.yaml", "flux_dev_diffusion_nft.yaml"):
        cfg = _cfg(name)
        assert cfg.eval.ema_decay == 0.9
        assert (cfg.algorithm.old_update, cfg.algorithm.rollout_policy) == ("epoch", "old")
    for name in ("sd3_5m_awm.yaml", "sd3_5m_diffusion_nft.yaml"):
        assert _cfg(name).model.max_sequence_length == 128


def test_eval_ema_decay_is_checked():
    with pytest.raises(ConfigError, match="eval.ema_decay"):
        load_config(TOY, ["eval.ema_decay=1.0"])


def test_the_advantage_clip_has_one_owner():
    # Every shipped config clips at 5, as the released codes.
    for path in sorted(glob.glob(str(REPO / "configs" / "*.yaml"))):
        assert advantage_clip(load_config(path)) == 5.0, path
    awm = str(REPO / "configs" / "toy2d_awm.yaml")
    # An algorithm with its own clip (adv_clip, which its loss divides by) owns it ...
    assert advantage_clip(load_config(awm, ["advantage.clip=null", "awm.adv_clip=3"])) == 3.0
    assert advantage_clip(load_config(awm, ["advantage.clip=3", "awm.adv_clip=3"])) == 3.0
    with pytest.raises(ConfigError, match=r"advantage.clip is 3.0 but awm.adv_clip is 5.0.*set only awm.adv_clip"):
        load_config(awm, ["advantage.clip=3"])
    # ... the others take advantage.clip (5 unless set).
    epg = str(REPO / "configs" / "toy2d_epg.yaml")
    assert advantage_clip(load_config(epg, ["advantage.clip=3"])) == 3.0
    assert advantage_clip(load_config(epg, ["advantage.clip=null"])) == 5.0

