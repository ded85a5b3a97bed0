"""Typed configs: unknown keys and wrong types are named, every shipped config validates."""

from __future__ import annotations

import glob

import pytest

from advantageflow.config import Config, load_config
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
