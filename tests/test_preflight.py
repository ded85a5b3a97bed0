"""``advantageflow validate`` refuses, in one line naming the key, every config that ``train``
would refuse before loading weights; ``train`` refuses it with the same words (one check)."""

from __future__ import annotations

import glob

import pytest
import torch

from advantageflow.cli import main
from advantageflow.config import ConfigError, load_config, preflight
from advantageflow.trainer import train
from tests.conftest import REPO

SD3 = str(REPO / "configs" / "sd3_tiny_awm.yaml")
SD3_5M = str(REPO / "configs" / "sd3_5m_flow_grpo.yaml")
SHAPES = str(REPO / "configs" / "shapes_advantageflow.yaml")
TOY_DRAFT = str(REPO / "configs" / "toy2d_draft.yaml")
JPEG_AND_SMOOTH = "reward.components=[{name: toy2d_smooth}, {name: jpeg_compressibility}]"

BAD = [
    ([SD3, "reward.name=hpsv3"], "'reward.name': unknown reward 'hpsv3'; did you mean 'hpsv2'?"),
    (
        [SD3, "reward.args.qualty=80"],
        "'reward.args': reward 'jpeg_compressibility': unknown argument 'qualty'; did you mean 'quality'?",
    ),
    ([SD3, "reward.name=hpsv2"], "'reward.args': reward 'hpsv2': missing required argument(s) ['path']"),
    (
        [SD3, "reward.name=ocr", "reward.args.backend=tesseract", "reward.args.tesseract_cmd=no-such-tesseract"],
        "'reward.args': reward 'ocr': ocr reward: the 'no-such-tesseract' executable was not found",
    ),
    (
        [SD3, "reward.name=remote", "reward.args.url=ftp://host"],
        "'reward.args': reward 'remote': remote reward: url must",
    ),
    ([SD3, "task.name=promps"], "'task.name': unknown task 'promps'; did you mean 'prompts'?"),
    (
        [SD3, "task.prompts=[]", "task.path=prompts/pickscore_trian.txt"],
        "task.path: prompt file 'prompts/pickscore_trian.txt' does not exist; did you mean the shipped "
        "'prompts/pickscore_train.txt'?",
    ),
    (
        [SD3, "task.test_path=/nonexistent/test.txt"],
        "task.test_path: prompt file '/nonexistent/test.txt' does not exist",
    ),
    ([SD3, "model.path=/nonexistent/sd3"], "model.path '/nonexistent/sd3' is not a folder"),
    ([SD3, "model.path=stable-diffusion"], "model.path 'stable-diffusion' is neither an existing folder nor a hub id"),
    ([SD3, "model.path=owner/name/extra"], "model.path 'owner/name/extra' is not a folder"),
    ([SD3, "model.path=tiny:sd4"], "model.path 'tiny:sd4': expected tiny:sd3 or tiny:flux"),
    ([SD3_5M, "device=cpu", "model.path=stabilityai"], "model.path 'stabilityai' is neither"),
    ([SHAPES, "model.path=/nonexistent/dit"], "model.path: no ShapesDiT checkpoint in '/nonexistent/dit'"),
    (
        [SD3, "algo=draft"],
        "'reward.name': algo 'draft' back-propagates through the reward, but reward "
        "'jpeg_compressibility' is not differentiable",
    ),
    ([TOY_DRAFT, "reward.name=", JPEG_AND_SMOOTH], "'reward.components[1].name': algo 'draft' back-propagates"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a[1:]) for a, _ in BAD])
def test_validate_and_train_refuse_alike(argv, message, capsys, tmp_path):
    assert main(["validate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    # train stops on the same line before any weights load (the check is shared, not copied)
    assert main(["train", *argv, "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == err
    assert not (tmp_path / "run").exists()


def cpu_overrides(path: str) -> list[str]:
    """GPU configs validate here on the CPU (the device check is the only one that needs CUDA)."""
    device = load_config(path).device
    return ["device=cpu"] if device.startswith("cuda") and not torch.cuda.is_available() else []


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs" / "*.yaml"))), ids=lambda p: p.split("/")[-1])
def test_every_shipped_config_passes_validate(path, capsys):
    assert main(["validate", path, *cpu_overrides(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("ok: ")


def test_gpu_configs_read_the_shipped_prompt_sets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the source checkout: the package's own files are found
    cfg = load_config(SD3_5M, ["device=cpu"])
    assert (cfg.task.path, cfg.task.test_path) == ("prompts/pickscore_train.txt", "prompts/pickscore_test.txt")
    preflight(cfg)


def undeclared_reward_factory():
    """A user's factory function: whether its reward is differentiable is known once built."""

    class Plain:
        def __call__(self, images, prompts, metadata):
            return images.sum(dim=1)

    return Plain()


def test_the_trainer_runs_the_same_check_on_built_rewards(tmp_path, toy_overrides, capsys):
    args = [
        TOY_DRAFT,
        *toy_overrides,
        f"reward.name={__name__}:undeclared_reward_factory",
        "reward.args={}",
        "train.epochs=1",
        "eval.every=0",
    ]
    assert main(["validate", *args]) == 0
    capsys.readouterr()
    with pytest.raises(ConfigError, match="'reward.name': algo 'draft' .* reward '.*undeclared_reward_factory' is not"):
        train(load_config(args[0], args[1:]), tmp_path / "run")
