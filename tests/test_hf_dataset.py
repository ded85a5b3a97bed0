"""Prompt sets read from Hugging Face datasets (``task.dataset``), tested on datasets saved
locally: a ``save_to_disk`` folder with train/test splits and a folder of JSONL data files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

datasets = pytest.importorskip("datasets")

from advantageflow.configbase import ConfigError  # noqa: E402
from advantageflow.tasks.prompt_file import PromptFileTask  # noqa: E402
from tests.conftest import REPO  # noqa: E402

ROWS = {
    "train": [{"prompt": "a red cube", "tag": "colors", "include": [{"class": "cube", "count": 1}]},
              {"prompt": "two cats", "tag": "counting", "include": [{"class": "cat", "count": 2}]},
              {"prompt": "a dog left of a tree", "tag": "position", "include": []}],
    "test": [{"prompt": "a blue ball", "tag": "colors", "include": [{"class": "ball", "count": 1}]}],
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "geneval_like"
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in ROWS.items()}).save_to_disk(str(folder))
    return folder


def _task(**kw) -> PromptFileTask:
    cfg = PromptFileTask.Config(**kw)
    cfg.validate()
    return PromptFileTask(cfg)


def test_save_to_disk_folder_gives_prompts_with_their_metadata_and_splits(saved):
    task = _task(dataset=str(saved), test_split="test")
    assert [p.text for p in task.train_prompts()] == [r["prompt"] for r in ROWS["train"]]
    assert [p.text for p in task.test_prompts()] == ["a blue ball"]
    first = task.train_prompts()[0].metadata
    assert first["tag"] == "colors" and first["include"] == [{"class": "cube", "count": 1}]
    assert "prompt" not in first


def test_without_a_test_split_the_tail_of_the_split_is_held_out(saved):
    task = _task(dataset=str(saved), test_fraction=0.34)
    assert [p.text for p in task.test_prompts()] == ["a dog left of a tree"]
    assert len(task.train_prompts()) == 2


def test_a_folder_of_data_files_loads_through_load_dataset(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": r["prompt"], "tag": r["tag"]}) + "\n"
                                                for r in ROWS["train"]))
    task = _task(dataset=str(folder), prompt_column="text")
    assert [p.text for p in task.train_prompts() + task.test_prompts()] == [r["prompt"] for r in ROWS["train"]]
    assert task.train_prompts()[1].metadata == {"tag": "counting"}


@pytest.mark.parametrize("kw,match", [
    ({"split": "tran"}, "no split 'tran'; did you mean 'train'"),
    ({"prompt_column": "promt"}, "did you mean task.prompt_column=prompt"),
    ({"test_split": "validation"}, "no split 'validation'"),
])
def test_bad_split_or_column_is_named(saved, kw, match):
    with pytest.raises(ConfigError, match=match):
        _task(dataset=str(saved), **kw)


def test_missing_folder_and_conflicting_keys_are_config_errors(tmp_path, saved):
    with pytest.raises(ConfigError, match="cannot load the dataset|not a dataset folder"):
        _task(dataset=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="exactly one of 'path', 'prompts' or 'dataset'"):
        _task(dataset=str(saved), path="prompts/pickscore_train.txt")
    with pytest.raises(ConfigError, match="test_split names a split of task.dataset"):
        _task(path="prompts/pickscore_train.txt", test_split="test")


def test_validate_reads_the_dataset_before_any_weights(saved):
    """``advantageflow validate`` builds the task, so a wrong split fails there, not in train."""
    cfg = str(REPO / "configs" / "sd3_tiny_advantageflow.yaml")
    base = [sys.executable, "-m", "advantageflow", "validate", cfg, "task.prompts=[]", f"task.dataset={saved}"]
    good = subprocess.run([*base, "task.test_split=test"], capture_output=True, text=True, cwd=REPO)
    assert good.returncode == 0, good.stderr
    bad = subprocess.run([*base, "task.split=tain"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode != 0 and "did you mean 'train'" in bad.stderr
