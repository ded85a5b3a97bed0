#!/usr/bin/env bash
# Wheels for a GPU machine without network access whose Python already has torch, transformers,
# peft and the rest of our needs but not diffusers (the lent H200's image, .library notes of
# 2026-11): downloads them here into DIR (default .whl/, git-ignored), to carry there and run
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD python3 -m advantageflow.gpu_check --out gpu_check.md
# (scripts/gpu_check.sh would first build .venv from PyPI, which such a machine cannot reach).
# A pure-Python wheel, so any CPython 3 and platform; the version the CPU tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
mkdir -p "$DIR"
# diffusers' other needs (huggingface-hub >= 1.32, regex, safetensors, Pillow, requests, filelock)
# are in that image; importlib_metadata is imported only below Python 3.8.
python3 -m pip download -q --no-deps --only-binary=:all: -d "$DIR" "diffusers==0.42.1"
ls -l "$DIR"
