"""A task from a prompt list: a ``.txt`` file (one prompt per line), a ``.jsonl`` file
(``{"prompt": ..., "metadata": {...}}`` per line), a Hugging Face dataset
(:mod:`advantageflow.tasks.hf_dataset`), or prompts given inline.

A relative path that does not exist in the working folder is looked up among the package's
shipped sets (``advantageflow/assets/prompts``, made by :mod:`advantageflow.prompts.generate`),
so ``prompts/pickscore_train.txt`` works from a source checkout and from an installed package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from advantageflow.configbase import ConfigError
from advantageflow.registry import closest
from advantageflow.tasks.base import Prompt, TaskBase
from advantageflow.tasks.hf_dataset import read_hf_dataset

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SHIPPED = ASSETS / "prompts"


def shipped_prompt_sets() -> list[str]:
    """``prompts/NAME`` of every shipped prompt file."""
    return sorted(f"prompts/{p.name}" for p in SHIPPED.glob("*") if p.suffix in (".txt", ".jsonl"))


def resolve_prompt_path(path: str, key: str = "task.path") -> Path:
    """``path`` itself if it is a file, else the shipped file at ``assets/PATH`` (relative paths
    only); a ``ConfigError`` naming ``key`` (with the closest shipped set) if neither exists."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise ConfigError(f"{key}: prompt file '{path}' is a folder, not a file")
    if not p.is_absolute() and (ASSETS / p).is_file():
        return ASSETS / p
    hint = closest(path, shipped_prompt_sets()) if not p.is_absolute() else None
    more = f"; did you mean the shipped '{hint}'?" if hint else ""
    raise ConfigError(f"{key}: prompt file '{path}' does not exist{more} (shipped: {', '.join(shipped_prompt_sets())})")


def read_prompt_file(path: str, key: str = "task.path") -> list[Prompt]:
    """Prompts of a ``.txt`` or ``.jsonl`` file, with a one-line error naming a bad line."""
    p = resolve_prompt_path(path, key)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"prompt file '{path}' is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"prompt file '{path}' cannot be read: {err.strerror or err}") from None
    if "\x00" in text:
        raise ConfigError(f"prompt file '{path}' is binary (holds NUL bytes)")
    prompts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if p.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except RecursionError:
                raise ConfigError(f"{path}:{lineno}: nested too deeply") from None
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ConfigError(f"{path}:{lineno}: each line needs a string 'prompt'")
            meta = row.get("metadata", {})
            if not isinstance(meta, dict):
                raise ConfigError(f"{path}:{lineno}: 'metadata' must be an object")
            prompts.append(Prompt(row["prompt"], meta))
        else:
            prompts.append(Prompt(line))
    if not prompts:
        raise ConfigError(f"prompt file '{path}' holds no prompts")
    return prompts


class PromptFileTask(TaskBase):
    """Train/test split of a prompt list: the last ``test_fraction`` of it is held out
    (at least one prompt when there are two or more; all prompts when there is one).

    ``test_path``: a separate test file (e.g. ``prompts/pickscore_test.txt``); then every
    prompt of ``path`` trains and ``test_fraction`` is not used.  ``dataset``: a Hugging Face
    dataset id or folder instead of ``path``: ``split`` trains, and ``test_split`` (when set)
    is the held-out set, else the last ``test_fraction`` of ``split``.
    """

    @dataclass
    class Config:
        name: str = "prompts"
        path: str = ""
        prompts: list[str] = field(default_factory=list)
        test_fraction: float = 0.1
        test_path: str = ""
        dataset: str = ""  # Hugging Face dataset id or folder (instead of path)
        split: str = "train"
        test_split: str = ""
        prompt_column: str = "prompt"

        def validate(self) -> None:
            if sum(map(bool, (self.path, self.prompts, self.dataset))) != 1:
                raise ConfigError("task 'prompts' needs exactly one of 'path', 'prompts' or 'dataset'")
            if self.test_path and self.dataset:
                raise ConfigError("task.test_path goes with task.path; with task.dataset use task.test_split")
            if self.test_split and not self.dataset:
                raise ConfigError("task.test_split names a split of task.dataset, which is not set")
            if not 0.0 <= self.test_fraction < 1.0:
                raise ConfigError("task.test_fraction must be in [0, 1)")

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        if cfg.dataset:
            items = read_hf_dataset(cfg.dataset, cfg.split, cfg.prompt_column)
        else:
            items = read_prompt_file(cfg.path) if cfg.path else [Prompt(p) for p in cfg.prompts]
        if cfg.test_path or cfg.test_split:
            self._train = items
            self._test = (read_prompt_file(cfg.test_path, "task.test_path") if cfg.test_path
                          else read_hf_dataset(cfg.dataset, cfg.test_split, cfg.prompt_column, "task.test_split"))
            return
        n_test = int(round(len(items) * cfg.test_fraction))
        if len(items) > 1:
            n_test = min(max(n_test, 1), len(items) - 1)
        self._train = items[: len(items) - n_test] if n_test else items
        self._test = items[len(items) - n_test :] if n_test else items

    def train_prompts(self) -> list[Prompt]:
        return self._train

    def test_prompts(self) -> list[Prompt]:
        return self._test
