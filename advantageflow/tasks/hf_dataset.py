"""Prompts from a Hugging Face dataset: a hub id (``"owner/name"``, read through the
``datasets`` cache: offline once cached, ``HF_DATASETS_OFFLINE=1``), a folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a folder of data files that
``datasets.load_dataset`` reads (``.jsonl``, ``.csv``, ``.parquet``).

Each row gives one :class:`~advantageflow.tasks.base.Prompt`: the text from ``prompt_column``
and, as metadata, every other column whose value is plain data (text, numbers, booleans,
lists and dicts of them), so a GenEval-style set carries its ``tag`` / ``include`` fields to
the reward exactly as a ``.jsonl`` prompt file does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from advantageflow.configbase import ConfigError
from advantageflow.registry import closest
from advantageflow.tasks.base import Prompt


def _plain(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _load(source: str, split: str, key: str) -> Any:
    """The ``datasets.Dataset`` of ``split`` from ``source``; ``ConfigError`` naming ``key``."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{key}: reading a Hugging Face dataset needs 'datasets' (pip install datasets)") from None
    folder = Path(source).expanduser()
    try:
        if folder.is_dir() and any((folder / f).exists() for f in ("dataset_dict.json", "dataset_info.json")):
            data = datasets.load_from_disk(str(folder))  # a save_to_disk folder
        elif folder.exists() or source.startswith((".", "/", "~")):
            if not folder.is_dir():
                raise ConfigError(f"{key}: '{source}' is not a dataset folder")
            data = datasets.load_dataset(str(folder))  # a folder of data files
        else:
            data = datasets.load_dataset(source)  # a hub id (through the local cache when offline)
    except ConfigError:
        raise
    except Exception as err:  # datasets raises many kinds (FileNotFoundError, ConnectionError, DatasetNotFoundError)
        raise ConfigError(f"{key}: cannot load the dataset '{source}': {type(err).__name__}: {err}") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            hint = closest(split, list(data))
            more = f"; did you mean '{hint}'?" if hint else ""
            raise ConfigError(f"{key}: dataset '{source}' has no split '{split}'{more} (splits: {', '.join(data)})")
        return data[split]
    return data


def read_hf_dataset(source: str, split: str, prompt_column: str, key: str = "task.dataset") -> list[Prompt]:
    """Prompts of one split of a dataset (see the module docstring); a ``ConfigError`` naming
    ``key`` for a missing dataset, split or column, or a non-text prompt."""
    data = _load(source, split, key)
    columns = list(data.column_names)
    if prompt_column not in columns:
        hint = closest(prompt_column, columns)
        more = f"; did you mean task.prompt_column={hint}?" if hint else ""
        listed = ", ".join(columns)
        raise ConfigError(f"{key}: dataset '{source}' has no column '{prompt_column}'{more} (columns: {listed})")
    prompts = []
    for i, row in enumerate(data):
        text = row[prompt_column]
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{key}: row {i} of '{source}' [{split}] has no text in '{prompt_column}'")
        meta = {k: v for k, v in row.items() if k != prompt_column and _plain(v)}
        prompts.append(Prompt(text.strip(), meta))
    if not prompts:
        raise ConfigError(f"{key}: split '{split}' of '{source}' holds no rows")
    return prompts
