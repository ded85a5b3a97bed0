"""Shared fixtures: a small, cached toy configuration for fast end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# One thread: the tests' models are tiny, and 2 cores are shared with subprocess tests.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Tests marked ``two_cores`` (2 processes, or 2 threads) form one xdist group and come
    first: under ``pytest -n 2 --dist loadgroup`` (scripts/test.sh) one worker runs them one
    after another from the start while the other fills both cores' gaps with one-thread tests,
    so two of them never share the 2 cores (each would take twice as long)."""
    heavy = [item for item in items if item.get_closest_marker("two_cores")]
    for item in heavy:
        item.add_marker(pytest.mark.xdist_group("two_cores"))
    light = [item for item in items if not item.get_closest_marker("two_cores")]
    items[:] = heavy + light


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
