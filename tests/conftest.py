"""Shared fixtures: a small, cached toy configuration for fast end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# One thread: the tests' models are tiny, and 2 cores are shared with subprocess tests.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory) -> str:
    """A per-session cache folder for the pretrained toy base model."""
    return str(tmp_path_factory.mktemp("toy-cache"))


@pytest.fixture
def toy_overrides(toy_cache) -> list[str]:
    """Overrides that make configs/toy2d_*.yaml quick: a small, cached base model."""
    return [
        f"model.cache_dir={toy_cache}",
        "model.pretrain_steps=1500",
        "log.tensorboard=false",
        "log.progress=false",
    ]
