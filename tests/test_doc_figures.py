"""The figures the README and docs quote are the ones in their JSON under benchmarks/results: each
quoted table row or sentence below is recomputed from its file (percent, one decimal)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("precision", "recall", "f1", "map", "r_precision")


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _row(page: str, label: str) -> list[str]:
    for line in (ROOT / page).read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"{page}: no table row {label!r}")


BIAS = json.loads((ROOT / "benchmarks/results/bias.json").read_text())["base"]["tags"]


@pytest.mark.parametrize(("label", "scorer"), [
    ("image-tag (base)", "image-tag"),
    ("text-tag (base)", "text-tag"),
    ("pixel-tag, the paper's softmax (base)", "pixel-tag"),
    ("pixel-tag-negatives, the default (base)", "pixel-tag-negatives"),
])
def test_readme_bias_table_is_bias_json(label, scorer):
    assert _row("README.md", label) == [_percent(BIAS[scorer][c]) for c in COLUMNS]


@pytest.mark.parametrize(("label", "scorer"), [("pixel-tag (base)", "pixel-tag"),
                                               ("pixel-tag-negatives (base)", "pixel-tag-negatives")])
def test_benchmarks_bias_table_is_bias_json(label, scorer):
    cells = _row("docs/benchmarks.md", label)
    assert cells[:3] == [_percent(BIAS[scorer][c]) for c in ("precision", "recall", "f1")]
    assert cells[4:6] == [_percent(BIAS[scorer][c]) for c in ("map", "r_precision")]


def test_architecture_quotes_bias_json():
    text = " ".join((ROOT / "docs/architecture.md").read_text(encoding="utf-8").split())
    negatives, softmax = BIAS["pixel-tag-negatives"], BIAS["pixel-tag"]
    quoted = (f"P {_percent(negatives['precision'])}, R {_percent(negatives['recall'])}, "
              f"F1 {_percent(negatives['f1'])} on the base, against {_percent(softmax['f1'])} for softmax")
    assert quoted in text and "benchmarks/results/bias.json" in text


def test_no_comment_cites_an_issue_or_a_design_outside_the_repository():
    cited = [f"{p.relative_to(ROOT)}:{n}" for d in ("ttd", "export", "triton_repo", "tests", "benchmarks")
             for p in sorted((ROOT / d).rglob("*.py")) if p.name != Path(__file__).name
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1)
             if re.search(r"\bissues? \d+\b|DESIGN" r" §", line)]
    assert cited == []


def test_serving_table_is_serve_load_json():
    """docs/serving.md's served-against-direct rows are benchmarks/results/serve_load.json."""
    summary = json.loads((ROOT / "benchmarks/results/serve_load.json").read_text())["summary"]
    no_front = " (tritonserver, no front)"  # benchmarks/serve_load.py --no-front
    for label, side in (("**fused**", summary["fused"]), ("python (BLS)", summary["python"]),
                        ("fused, straight to tritonserver's port (no front)", summary["fused" + no_front]),
                        ("python (BLS), straight to tritonserver's port (no front)", summary["python" + no_front])):
        cells = _row("docs/serving.md", label)
        cpu = side["cpu_ms_per_image_by_process"]
        assert cells[0].replace("*", "").startswith(f"{side['cpu_ms_per_image']:.2f} "
                                                    f"({cpu['front']:.2f} + {cpu['tritonserver']:.2f} + {cpu['stubs']:.2f})")
        assert cells[1].replace("*", "").startswith(f"{side['served_over_direct_by_cpu']:.2f}")
        assert cells[2] == f"{side['images_per_s']:.0f}" and cells[3] == f"{side['served_over_direct_by_wall']:.2f}"
        assert cells[4] == f"{side['p50_ms']:.0f} / {side['p99_ms']:.0f} ms"
        assert cells[6:] == [str(side["errors"]), str(side["mismatches"])]
    assert _row("docs/serving.md", "direct, 1 onnxruntime thread")[0] == f"{summary['direct']['cpu_ms_per_image']:.2f}"


def test_serving_vit_table_is_its_json():
    summary = json.loads((ROOT / "benchmarks/results/serve_load_vit_b_16.json").read_text())["summary"]
    for label, side in (("fused, ViT-B/16", summary["fused"]), ("python (BLS), ViT-B/16", summary["python"])):
        cells = _row("docs/serving.md", label)
        assert cells[0].startswith(f"{side['cpu_ms_per_image']:.0f} (")
        assert cells[1] == f"{side['served_over_direct_by_cpu']:.2f}"
        assert cells[4] == f"{side['p50_ms'] / 1000:.2f} / {side['p99_ms'] / 1000:.2f} s"
        assert cells[6:] == [str(side["errors"]), str(side["mismatches"])]


SCORERS = json.loads((ROOT / "benchmarks/results/scorers.json").read_text())["scorers"]
SCORER_COLUMNS = ("precision", "recall", "f1", "colour recall", "shape recall", "background recall", "absent selected")


def _scorer_rows() -> list[tuple[str, list[str]]]:
    rows = []
    for line in (ROOT / "docs/benchmarks.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        label = re.sub(r" \(`negatives`, the default\)$", "", cells[0])
        if len(cells) == 9 and label in SCORERS:
            rows.append((label, cells[2:]))
    return rows


def test_benchmarks_scorer_table_is_scorers_json():
    rows = _scorer_rows()
    assert len(rows) == len(SCORERS) == 8
    for label, cells in rows:
        held_out = SCORERS[label]["held_out"]
        assert cells == [f"{_percent(held_out[c]['mean'])} ± {_percent(held_out[c]['std'])}" for c in SCORER_COLUMNS], label


LABEL_FREE = json.loads((ROOT / "benchmarks/results/label_free.json").read_text())


def _calibration_rows() -> list[list[str]]:
    return [[c.strip().strip("*") for c in line.strip().strip("|").split("|")]
            for line in (ROOT / "docs/calibration.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| base") or line.startswith("| TTD")]


def _fit_cells(fit: dict) -> list[str]:
    return [f"{fit['margin']:.3f}", f"{fit['precision']:.2f}", f"{fit['recall']:.2f}", f"{fit['f1']:.2f}"]


def test_calibration_table_is_label_free_json():
    rows = _calibration_rows()
    expected = []
    for model in LABEL_FREE["models"]:
        short = "base" if model["model"].startswith("base") else "TTD"
        expected += [(short, "labelled", model["labelled"]), (short, "label-free", model["label_free"]),
                     (short, "label-free + `--choose-negatives`", model["label_free_chosen_prompts"])]
    wrong = LABEL_FREE["wrong_margin"]
    checked = 0
    for model, fit, figures in expected:
        found = [r for r in rows if r[0].split(" (")[0] == model and r[1].split(" (")[0] == fit]
        for row in found[:1]:
            assert row[2:6] == _fit_cells(figures), row
            checked += 1
    wrong_rows = [r for r in rows if r[0] == "base given a wrong margin"]
    assert [r[2:6] for r in wrong_rows] == [_fit_cells(wrong["given"]), _fit_cells(wrong["after_label_free"])]
    assert checked == len(expected) == 6
