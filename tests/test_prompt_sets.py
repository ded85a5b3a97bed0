"""The shipped prompt sets: the generator reproduces them, train and test are disjoint, the
GenEval metadata is what a detector-based checker needs, and configs find them from any folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from advantageflow.configbase import ConfigError
from advantageflow.prompts import generate, vocab
from advantageflow.tasks.prompt_file import PromptFileTask, read_prompt_file, resolve_prompt_path
from tests.conftest import REPO


def shipped(name: str) -> str:
    return (generate.SHIPPED_DIR / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(generate.SETS))
def test_regenerating_gives_the_shipped_file(name):
    """After changing the generator: python -m advantageflow.prompts.generate all advantageflow/assets/prompts"""
    assert generate.render(name) == shipped(name)


@pytest.mark.parametrize("kind", ["geneval", "ocr", "pickscore"])
def test_train_and_test_are_disjoint_and_sized(kind):
    ext = "jsonl" if kind == "geneval" else "txt"
    train = read_prompt_file(str(generate.SHIPPED_DIR / f"{kind}_train.{ext}"))
    test = read_prompt_file(str(generate.SHIPPED_DIR / f"{kind}_test.{ext}"))
    assert 1000 <= len(train) <= 3000 and 200 <= len(test) <= 600
    train_text, test_text = {p.text for p in train}, {p.text for p in test}
    assert len(train_text) == len(train) and len(test_text) == len(test)  # no duplicates
    assert not train_text & test_text
    maker = {"geneval": generate.geneval_sets, "ocr": generate.ocr_sets, "pickscore": generate.pickscore_sets}[kind]
    test_c, train_c = maker()
    assert not {c.key for c in train_c} & {c.key for c in test_c}  # not even a reworded prompt


def _check_geneval_record(prompt: str, meta: dict) -> None:
    include, exclude = meta["include"], meta["exclude"]
    assert meta["tag"] in generate.GENEVAL_SIZES
    for item in include:
        assert item["class"] in vocab.OBJECTS and item["count"] >= 1
        assert item.get("color", "red") in vocab.COLORS
        noun = generate.plural(item["class"]) if item["count"] > 1 else generate.singular(item["class"]).split(" ")[-1]
        assert noun in prompt
        if "color" in item:
            assert f"{item['color']} " in prompt
        if "position" in item:
            rel, ref = item["position"]
            assert rel in vocab.POSITIONS and 0 <= ref < len(include) and include[ref] is not item
            assert rel in prompt
    if meta["tag"] == "counting":
        (item,) = include
        assert exclude == [{"class": item["class"], "count": item["count"] + 1}]
        assert vocab.COUNT_WORDS[item["count"]] in prompt
    else:
        assert exclude == []
    assert len(include) == (2 if meta["tag"] in ("two_object", "position", "color_attr") else 1)


def test_geneval_metadata_is_what_a_detector_checks():
    for name in ("geneval_train.jsonl", "geneval_test.jsonl"):
        prompts = read_prompt_file(str(generate.SHIPPED_DIR / name))
        tags = {p.metadata["tag"] for p in prompts}
        assert tags == set(generate.GENEVAL_SIZES)
        for p in prompts:
            _check_geneval_record(p.text, p.metadata)
    assert generate.singular("apple") == "an apple" and generate.plural("person") == "people"
    assert generate.with_color("orange", "skis") == "an orange pair of skis"


def test_ocr_prompts_quote_one_target_and_test_words_are_new():
    def targets(name):
        out = []
        for line in shipped(name).splitlines():
            found = re.findall(r'"([^"]+)"', line)
            assert len(found) == 1, line
            out.append(found[0].lower())
        return set(out)

    train, test = targets("ocr_train.txt"), targets("ocr_test.txt")
    assert not train & test
    assert len(train) > 250 and len(test) == 60


def test_generate_command_writes_a_set_and_refuses_an_unknown_name(tmp_path):
    out = tmp_path / "ocr.txt"
    cmd = [sys.executable, "-m", "advantageflow.prompts.generate"]
    done = subprocess.run([*cmd, "ocr_test", str(out)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.read_text(encoding="utf-8") == shipped("ocr_test.txt")
    bad = subprocess.run([*cmd, "ocr_tset", str(out)], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown prompt set 'ocr_tset'" in bad.stderr


def test_a_shipped_path_resolves_from_any_folder_and_a_local_file_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_prompt_path("prompts/pickscore_test.txt") == generate.SHIPPED_DIR / "pickscore_test.txt"
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "pickscore_test.txt").write_text("mine\n")
    assert [p.text for p in read_prompt_file("prompts/pickscore_test.txt")] == ["mine"]
    with pytest.raises(
        ConfigError,
        match=r"task.path: .*'prompts/ocr_trian.txt' does not exist; did you mean "
        r"the shipped 'prompts/ocr_train.txt'",
    ):
        resolve_prompt_path("prompts/ocr_trian.txt")
    with pytest.raises(ConfigError, match="is a folder"):
        resolve_prompt_path("prompts")


def test_test_path_gives_the_test_split():
    cfg = PromptFileTask.Config(path="prompts/geneval_train.jsonl", test_path="prompts/geneval_test.jsonl")
    task = PromptFileTask(cfg)
    assert len(task.train_prompts()) == 2964 and len(task.test_prompts()) == 456
    assert task.test_prompts()[0].metadata["tag"] in generate.GENEVAL_SIZES
    with pytest.raises(ConfigError, match="task.test_path: prompt file 'nope.txt' does not exist"):
        PromptFileTask(PromptFileTask.Config(path="prompts/ocr_train.txt", test_path="nope.txt"))


def test_jsonl_records_keep_their_key_order():
    first = json.loads(shipped("geneval_test.jsonl").splitlines()[0])
    assert list(first) == ["prompt", "metadata"] and list(first["metadata"]) == ["tag", "include", "exclude"]
