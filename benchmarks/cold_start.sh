#!/usr/bin/env bash
# Size and cold start of the base install (no torch) against the full install, for docs/benchmarks.md
# ("The base install"). Each figure: the best of 5 runs (wall, user+sys CPU, peak RSS via GNU time).
#   benchmarks/cold_start.sh BASE_VENV FULL_VENV
# BASE_VENV: `python3 -m venv B && B/bin/pip install .`; FULL_VENV: the README's install.
set -euo pipefail
BASE=$1 FULL=$2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
head -1 "$ROOT/examples/world/annotations.jsonl" | sed "s#\"images/#\"$ROOT/examples/world/images/#" > "$WORK/one.jsonl"
export HF_HUB_OFFLINE=1
measure() {  # LABEL CMD...
  local label=$1; shift
  for _ in 1 2 3 4 5; do
    rm -rf "$WORK/out.jsonl" "$WORK/m"
    /usr/bin/time -f "%e %U %S %M" -o "$WORK/t" "$@" >/dev/null 2>"$WORK/err" || { tail -3 "$WORK/err"; exit 1; }
    cat "$WORK/t"
  done | awk -v l="$label" '{c=$2+$3; if(NR==1||$1<w)w=$1; if(NR==1||c<mc)mc=c; if(NR==1||$4<mr)mr=$4}
    END{printf "| %s | %.2f | %.2f | %d |\n", l, w, mc, mr/1024}'
}
lscpu | grep "Model name"
echo "base venv: $(du -sh "$BASE" | cut -f1); full venv: $(du -sh "$FULL" | cut -f1)"
"$BASE/bin/python" -c "import torch" 2>/dev/null && echo "warning: torch imports in the base venv"
echo "| command | wall s | CPU s | peak RSS MB |"
echo "|---|---|---|---|"
one=(tag --captions "$WORK/one.jsonl" -o "$WORK/out.jsonl" --quiet)
measure "base: ttd tag --help" "$BASE/bin/ttd" tag --help
measure "full: ttd tag --help" "$FULL/bin/ttd" tag --help
measure "base: one-image ttd tag" "$BASE/bin/ttd" "${one[@]}"
measure "base: one-image ttd tag --masks-dir" "$BASE/bin/ttd" "${one[@]}" --masks-dir "$WORK/m"
measure "full: one-image ttd tag (torch)" "$FULL/bin/ttd" "${one[@]}"
measure "full: one-image ttd tag --backend onnxruntime" "$FULL/bin/ttd" "${one[@]}" --backend onnxruntime
