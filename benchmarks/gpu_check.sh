#!/usr/bin/env bash
# One bounded GPU check of the TTD toolkit: parity of torch on CUDA in fp32 / fp16 / bf16 against
# torch fp32 on the CPU (the export gates), `ttd tag --device cuda` agreement, ViT-B/16 dense
# image-encoding throughput at batch 1/8/64/256, torch.compile with CUDA graphs, `ttd train`/
# `ttd eval` on CUDA, and `ttd tag` in the steady state from a warm torch-free decoding pool: the
# default job (fp32, eager, batch 32) and the tuned one (bf16, batch auto) on 224-px PNGs and
# 500x375 / 1024x768 JPEGs made from real photos, an open vocabulary of thousands of caption
# words, a 1,000-tag vocabulary; per-stage times (CUDA events), the main thread's CPU time, the
# encoder alone in the same step; pipelined vs plain records; nvJPEG decoding behind its
# agreement gate. Every step is bounded and the whole script ends within 8 minutes;
# gpu_check.json + gpu_check.md are rewritten in $OUT (or --out DIR) after every step; exits 1 on
# any failed gate.
#
# Runs with the GPU machine's own python3 (3.12, torch with CUDA; no network) plus the wheels it
# lacks, carried in a folder (default .gpu-wheels/ in the repository root, or $TTD_WHEELS), and
# the real photos the inputs are made from (.gpu-inputs/). Make both on a machine with network:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#       -d .gpu-wheels open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 regex torchvision==0.26.0
#   bash benchmarks/gpu_check.sh --prepare        # scikit-image's photos -> .gpu-inputs/
#   bash benchmarks/gpu_check.sh --dry-run        # every step, and where each import comes from
#
# torchvision 0.26 is torch 2.11's; it is installed only where python3 has no torchvision of its
# own (a build that matches the machine's CUDA wins). 9.6 MiB in all.
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run | --prepare] [gpu_check.py options ...]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WHEELS="${TTD_WHEELS:-$ROOT/.gpu-wheels}"
PYTHON="${PYTHON:-python3}"
SITE="$(mktemp -d)/site"
export TTD_WHEELS="$WHEELS"
# the pipelined and plain jobs' records are compared byte for byte: cuBLAS picks the same kernels
# on every stream only with a fixed workspace (set before torch starts)
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
if [[ " $* " == *" --dry-run "* || " $* " == *" --prepare "* ]]; then
  echo "gpu_check: $([[ " $* " == *" --prepare "* ]] && echo prepare || echo 'dry run'); would install $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) wheels from $WHEELS" >&2
elif [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  wheels=()
  for wheel in "$WHEELS"/*.whl; do
    if [[ "$(basename "$wheel")" == torchvision-* ]] && "$PYTHON" -c "import torchvision" 2>/dev/null; then
      echo "gpu_check: $PYTHON has torchvision already; $(basename "$wheel") not installed" >&2
      continue
    fi
    wheels+=("$wheel")
  done
  # --no-deps --no-index: the machine has no network; everything else comes with its python3
  "$PYTHON" -m pip install -q --no-deps --no-index --target "$SITE" "${wheels[@]}"
else
  echo "gpu_check: no wheels in $WHEELS; relying on $PYTHON's own packages" >&2
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
exec "$PYTHON" "$ROOT/benchmarks/gpu_check.py" "$@"
