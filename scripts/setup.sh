#!/usr/bin/env bash
# Create (or refresh) the project's environment in .venv: CPU PyTorch pinned here only,
# the package with every extra, and the Debian tesseract OCR engine.  Idempotent and quick
# when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.setup-stamp
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if ! command -v tesseract >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing tesseract-ocr (Debian)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tesseract-ocr tesseract-ocr-eng >/dev/null) \
      || echo "[setup] warning: could not install tesseract-ocr; OCR tests will be skipped"
  elif command -v sudo >/dev/null 2>&1; then
    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tesseract-ocr tesseract-ocr-eng >/dev/null) \
      || echo "[setup] warning: could not install tesseract-ocr; OCR tests will be skipped"
  fi
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
echo "[setup] creating $VENV (about a minute)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The CPU build of PyTorch, the version CI tests; the package itself only asks for torch>=2.6.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[all]"
# The official HPSv2 (OpenCLIP) and ImageReward (BLIP) code, only for tests/test_rewards_official.py,
# which checks our converters against it (about 10-25 s).  --no-deps into a side folder, never
# the venv: torchvision's PyPI wheel is CUDA-built, cannot load its ops next to the CPU torch and
# then fails to import -- and transformers imports torchvision whenever it is installed.
# image-reward's own pins (timm 0.6, diffusers, ...) would clash with open_clip's; not needed.
REF=$VENV/reference-rewards
rm -rf "$REF"
"$VENV/bin/python" -m pip install -q --no-deps --target "$REF" "torchvision==0.28.0" "open_clip_torch==3.3.0" \
  "timm==1.0.31" "ftfy==6.3.1" "wcwidth==0.2.13" "image-reward==1.5" "fairscale==0.4.13" \
  || echo "[setup] warning: could not install the reference reward packages; tests/test_rewards_official.py will be skipped"
echo "$WANT" > "$STAMP"
echo "[setup] done"
