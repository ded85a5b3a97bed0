"""Packaging: license metadata, and the wheel (built offline from an sdist) ships the configs
that ``advantageflow configs`` then finds in an installed copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import advantageflow
from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "advantageflow", "configs"]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_license_is_an_spdx_expression_with_its_text():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0"  # not the deprecated {text = ...} table
    assert project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_version_has_one_source():
    data = _pyproject()
    assert "version" not in data["project"] and "version" in data["project"]["dynamic"]
    assert data["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "advantageflow.__version__"}


def test_no_dependency_on_packages_nothing_imports():
    extras = _pyproject()["project"]["optional-dependencies"]["diffusers"]
    assert not any(d.startswith("accelerate") for d in extras)
    imports = [p for p in (REPO / "advantageflow").rglob("*.py") if "import accelerate" in p.read_text()]
    assert imports == []


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built without network the way ``python -m build`` does: source -> sdist -> wheel
    (so MANIFEST.in and setup.py's config copy are both exercised), from a copy of the sources."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("building needs setuptools >= 77 (PEP 639 license metadata)")
    pytest.importorskip("pip")
    root = tmp_path_factory.mktemp("build")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "_configs"))
        else:
            shutil.copy2(REPO / name, src / name)
    backend = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    sdist = root / "sdist" / _run([sys.executable, "-c", backend, str(root / "sdist")], src).stdout.split()[-1]
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        tar.extractall(root / "unpacked", filter="data")
    top = names[0].split("/")[0]
    assert {f"{top}/configs/{c}" for c in CONFIGS} <= set(names) and f"{top}/LICENSE" in names
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    _run([*pip, "-w", str(root / "wheel"), str(root / "unpacked" / top)], root)
    (found,) = (root / "wheel").glob("advantageflow-*.whl")
    return found


def test_wheel_ships_the_configs_and_license_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = zf.read(meta).decode()
        for config in CONFIGS:
            assert zf.read(f"advantageflow/_configs/{config}") == (REPO / "configs" / config).read_bytes()
        for arch in sorted((REPO / "advantageflow" / "assets" / "arch").glob("*.json")):  # estimate-memory's
            assert zf.read(f"advantageflow/assets/arch/{arch.name}") == arch.read_bytes()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    assert f"Version: {advantageflow.__version__}" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert requires and not [r for r in requires if "accelerate" in r]  # (the README may mention its launcher)


def test_installed_wheel_lists_and_copies_its_configs(wheel, tmp_path):
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site)]
    _run([*install, str(wheel)], tmp_path)
    # cwd and PYTHONPATH away from the checkout: only the installed copy can answer.
    cli = [sys.executable, "-c", "import sys, advantageflow.cli as c; print(c.__file__); sys.exit(c.main())"]
    listed = _run([*cli, "configs"], tmp_path, PYTHONPATH=str(site)).stdout.splitlines()
    assert Path(listed[0]).resolve().is_relative_to(site.resolve())
    assert [line.split()[0] for line in listed[1:]] == [Path(c).stem for c in CONFIGS]
    _run([*cli, "configs", "toy2d_awm", "--to", str(tmp_path / "mine")], tmp_path, PYTHONPATH=str(site))
    assert (tmp_path / "mine" / "toy2d_awm.yaml").read_bytes() == (REPO / "configs" / "toy2d_awm.yaml").read_bytes()
