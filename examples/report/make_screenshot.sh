#!/usr/bin/env bash
# Regenerates examples/report/report.png, the README's screenshot of `ttd report`: open-vocabulary
# segmentation (`ttd segment --classes`) of three of the repository's example world images by the
# embedded default world model, the page opened in headless Chromium (Debian's `chromium`, as
# tests/jobs/test_report.py finds it) at 1000×1200, then reduced to 128 colours to keep it small.
# Image paths are relative to examples/world, so the page shows them as a user's would be:
#   examples/report/make_screenshot.sh            (PYTHON: an interpreter with ttd's install; default python3)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
CHROMIUM=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$CHROMIUM" ]; then
  echo "error: no chromium, chromium-browser or google-chrome on PATH (Debian: apt-get install chromium)" >&2
  exit 2
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1
cd "$ROOT/examples/world"
# one thread, fixed images and model: the same records on every run
"$PYTHON" -m ttd segment --classes red,green,blue,yellow,orange,grass,sand,water,snow --scales 1,2 --pamr \
  --threads 1 images/010002.png images/010005.png images/010007.png -o "$WORK/seg.jsonl"
"$PYTHON" -m ttd report "$WORK/seg.jsonl" --html "$WORK/report.html" --images-root . --max-side 192
"$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$WORK/profile" \
  --virtual-time-budget=2000 --window-size=1000,1200 --screenshot="$WORK/shot.png" "file://$WORK/report.html" \
  2>/dev/null
"$PYTHON" - "$WORK/shot.png" "$ROOT/examples/report/report.png" <<'PY'
import sys
from PIL import Image

Image.open(sys.argv[1]).convert("RGB").quantize(128).save(sys.argv[2], optimize=True)
PY
echo "wrote $ROOT/examples/report/report.png"
