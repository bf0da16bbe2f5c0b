#!/usr/bin/env bash
# One bounded GPU check of the TTD toolkit (issue 15): parity of torch on CUDA in fp32 / fp16 /
# bf16 against torch fp32 on the CPU (the export gates), `ttd tag --device cuda` agreement,
# ViT-B/16 dense image-encoding throughput at batch 1/8/64/256 (CUDA-synchronised, warmed up,
# peak memory), torch.compile with CUDA graphs, `ttd train`/`ttd eval` on CUDA, and (issue 21) the
# pipelined `ttd tag` in the steady state: 32,768 images per run from a warm torch-free decoding
# pool, world PNGs and camera-sized JPEGs, a 1,000-tag vocabulary, per-stage times from CUDA events,
# beside the encoder alone in the same step, pipelined vs plain records.
# Every step is bounded and the whole script ends within 8 minutes; gpu_check.json + gpu_check.md
# are rewritten in $OUT (or --out DIR) after every step; exits 1 on any failed gate.
#
# Runs with the GPU machine's own python3 (3.12, torch with CUDA; no network) plus the wheels it
# lacks, carried in a folder (default .gpu-wheels/ in the repository root, or $TTD_WHEELS).
# Make that folder on a machine with network, for Python 3.12 on x86-64:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#       -d .gpu-wheels open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 regex
#
# (nvidia-pytriton, 55 MB, and a numpy<2 wheel for its Python-backend stub do not fit beside
# these in one 64 MiB transfer: the served GPU path needs a call of its own.)
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [gpu_check.py options ...]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WHEELS="${TTD_WHEELS:-$ROOT/.gpu-wheels}"
PYTHON="${PYTHON:-python3}"
SITE="$(mktemp -d)/site"
if [[ " $* " == *" --dry-run "* ]]; then
  echo "gpu_check: dry run; would install $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) wheels from $WHEELS" >&2
elif [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  # --no-deps --no-index: the machine has no network; everything else comes with its python3
  "$PYTHON" -m pip install -q --no-deps --no-index --target "$SITE" "$WHEELS"/*.whl
else
  echo "gpu_check: no wheels in $WHEELS; relying on $PYTHON's own packages" >&2
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
exec "$PYTHON" "$ROOT/benchmarks/gpu_check.py" "$@"
