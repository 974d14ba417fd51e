#!/usr/bin/env bash
# The GPU check's rehearsal, on this CPU, with the lent GPU machine's versions: Python 3.12 and
# torch 2.11.0 (what the device tool's page lists), nothing else beside torch but what that machine
# has (numpy, scipy, matplotlib, tqdm, pandas, pytest), and the wheels of `make gpu-wheels`
# installed the way `make gpu-check` installs them there (--no-index, --target). Then the check's
# dry run, every stage, writing under an $OUT folder as on the device.
#
#   bash benchmarks/gpu_rehearsal.sh [OUT]        (default OUT: /tmp/hipseg-rehearsal/out)
#
# Needs python3.12 and the package registry. PyPI's torch 2.11.0 for Linux is the CUDA build: about
# 3 GB with its CUDA libraries, downloaded once into $REHEARSAL_DIR/venv (it runs on the CPU here).
# Not part of `make test` (the download); `make test` runs the same dry run on the project's own torch.
# Exit status: the check's (0 when every stage passed).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${REHEARSAL_DIR:-/tmp/hipseg-rehearsal}
OUT_DIR=${1:-$WORK/out}
TORCH_VERSION=${REHEARSAL_TORCH:-2.11.0}
PY312=${PYTHON312:-python3.12}
VENV=$WORK/venv
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" \
    2>/dev/null; then
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION" \
    numpy scipy matplotlib tqdm pandas pytest
fi
ls .gpu-wheels/*.whl >/dev/null 2>&1 || bash benchmarks/gpu_wheels.sh
rm -rf "$OUT_DIR" "$WORK/site"
mkdir -p "$OUT_DIR"
echo "rehearsal: $("$VENV/bin/python" -c 'import sys, torch; print("Python", sys.version.split()[0], "torch", torch.__version__)'), OUT=$OUT_DIR"
# As on the device: its Python, the carried wheels into a fresh folder, no .venv, no registry.
STATUS=0
OUT=$OUT_DIR GPU_PYTHON=$VENV/bin/python GPU_SITE=$WORK/site PIP_NO_INDEX=1 \
  bash benchmarks/gpu_check.sh --dry-run || STATUS=$?
echo "rehearsal: gpu check exited $STATUS; under $OUT_DIR:"
ls -l "$OUT_DIR"
exit "$STATUS"
