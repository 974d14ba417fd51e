#!/usr/bin/env bash
# `make gpu-check`: benchmarks/gpu_check.py with the GPU machine's own Python (no .venv is built
# there). Wheels carried in .gpu-wheels/ (from benchmarks/gpu_wheels.sh) are installed into a
# folder on PYTHONPATH first; the repository itself is on PYTHONPATH, so hipseg_lib needs no install.
set -euo pipefail
cd "$(dirname "$0")/.."
# On a lent GPU machine only $OUT comes back: the log goes there beside the results.
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2> >(tee -a "$OUT/gpu_check.log" >&2)
fi
PY=${GPU_PYTHON:-}
if [ -z "$PY" ]; then
  for cand in /opt/torch/.venv/bin/python3 .venv/bin/python python3; do
    if [ -x "$cand" ] || command -v "$cand" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
if ! "$PY" -c "import papermill, nibabel, ipykernel, monai, skimage" >/dev/null 2>&1 && ls .gpu-wheels/*.whl >/dev/null 2>&1; then
  SITE=${GPU_SITE:-${TMPDIR:-/tmp}/hipseg-gpu-site}
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$SITE" .gpu-wheels/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
