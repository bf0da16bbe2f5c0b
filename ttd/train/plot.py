"""A PNG of a run's metrics.jsonl, drawn with PIL alone (matplotlib is not a dependency).

Panels share the step axis: the caption mask against its target and the label-free evidence
(areas and shares ≥ θ), the mask head's w and b, the selection rate, and the losses. Enough to
see a caption-mask collapse at a glance (docs/training.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

# (title, keys, fixed (low, high) or None: scaled to the data)
PANELS: tuple[tuple[str, tuple[str, ...], tuple[float, float] | None], ...] = (
    ("areas", ("caption_area", "caption_above", "target_area", "target_above", "evidence_area"), (0.0, 1.0)),
    ("cosine", ("selected_cos_mean", "selected_cos_max", "mask_midpoint"), (-0.3, 0.6)),
    ("mask head w", ("w",), None),
    ("mask head b", ("b",), None),
    ("selection rate", ("selected",), (0.0, 1.0)),
    ("losses", ("distill", "tag"), None),
)
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
WIDTH, PANEL_HEIGHT, MARGIN = 640, 150, 48


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The lines of a metrics.jsonl, in step order."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["step"])


def _panel(draw: ImageDraw.ImageDraw, top: int, title: str, keys: tuple[str, ...], rows: list[dict],
           fixed: tuple[float, float] | None) -> None:
    left, right, bottom = MARGIN, WIDTH - 10, top + PANEL_HEIGHT - 22
    values = [r[k] for r in rows for k in keys if k in r]
    if not values:
        return
    low, high = fixed if fixed else (min(values), max(values))
    low, high = min(low, min(values)), max(high, max(values))
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    steps = [r["step"] for r in rows]
    first, last = min(steps), max(max(steps), min(steps) + 1)
    draw.rectangle((left, top + 14, right, bottom), outline=(160, 160, 160))
    draw.text((left, top), title, fill=(0, 0, 0))
    draw.text((2, top + 14), f"{high:.3g}", fill=(80, 80, 80))
    draw.text((2, bottom - 10), f"{low:.3g}", fill=(80, 80, 80))
    draw.text((right - 40, bottom + 2), f"step {last}", fill=(80, 80, 80))

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (right - left) * (step - first) / (last - first)
        y = bottom - (bottom - top - 14) * (value - low) / (high - low)
        return x, y

    legend_x = left + 8 * len(title) + 12
    for colour, key in zip(COLOURS, keys):
        points = [xy(r["step"], r[key]) for r in rows if key in r]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        if len(keys) > 1:
            draw.text((legend_x, top), key, fill=colour)
            legend_x += 7 * len(key) + 12


def plot_metrics(metrics: Path, out: Path, title: str = "") -> Path:
    """Write the PNG of `metrics` (a metrics.jsonl) to `out` and return its path."""
    rows = read_metrics(metrics)
    image = Image.new("RGB", (WIDTH, 20 + PANEL_HEIGHT * len(PANELS)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 4), title or str(metrics), fill=(0, 0, 0))
    for index, (name, keys, fixed) in enumerate(PANELS):
        _panel(draw, 20 + index * PANEL_HEIGHT, name, keys, rows, fixed)
    image.save(out)
    return Path(out)


if __name__ == "__main__":
    import sys

    for path in sys.argv[1:]:
        print(plot_metrics(Path(path), Path(path).with_name("metrics.png"), title=str(Path(path).parent.name)))
