"""The figures the README and docs quote are the ones in their JSON under benchmarks/results: each
quoted table row or sentence below is recomputed from its file (percent, one decimal)."""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
from decimal import ROUND_HALF_UP, Decimal
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
BIAS_CAPTION = json.loads((ROOT / "benchmarks/results/bias.json").read_text())["base"]["caption_mask"]


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
                        ("fused, coalescing on (`--coalesce 2`)", summary["fused:coalesce=2"]),
                        ("fused, straight to tritonserver's port (no front)", summary["fused" + no_front]),
                        ("**fused, 8 images a request**", summary["fused:images_per_request=8"]),
                        ("fused, 8 images a request, straight to tritonserver's port (no front)",
                         summary["fused:images_per_request=8" + no_front]),
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


def _table(page: str, header: str) -> list[list[str]]:
    """The rows (cells without bold marks) of the first table in `page` whose header row starts with `header`."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    assert start is not None, f"{page}: no table with header {header!r}"
    return _table_from(lines[start:])


def _table_after(page: str, marker: str) -> list[list[str]]:
    """The rows of the first table after the line that starts with `marker`."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(marker))
    header = next(line for line in lines[at:] if line.startswith("|"))
    return _table_from(lines[lines.index(header, at):])


def _table_from(lines: list[str]) -> list[list[str]]:
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().replace("*", "") for c in line.strip().strip("|").split("|")])
    return rows


def _results(name: str) -> dict:
    return json.loads((ROOT / "benchmarks/results" / name).read_text())


def _benchmark_module(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rendered_rows_missing(rendered: str, page: str) -> list[str]:
    quoted = {line.strip() for line in (ROOT / page).read_text(encoding="utf-8").splitlines()}
    return [line for line in rendered.splitlines()
            if line.startswith("| ") and not line.startswith("|---") and line.strip() not in quoted]


def test_every_bias_and_ttd_table_is_bias_json_as_its_script_renders_it():
    rendered = _benchmark_module("bias").markdown(_results("bias.json"))
    assert rendered.count("\n| ") >= 30 and _rendered_rows_missing(rendered, "docs/benchmarks.md") == []


@pytest.mark.parametrize("name", ["bench_world_base", "bench_vit_b_16"])
def test_bench_tables_are_bench_json_as_ttd_bench_renders_them(name):
    from export.bench import to_markdown
    result = _results(f"{name}.json")
    rendered = to_markdown(result)
    assert rendered.count("\n| ") == len(result["rows"]) + len(result["refused"]) + 1
    assert _rendered_rows_missing(rendered, "docs/benchmarks.md") == []
    assert (ROOT / f"benchmarks/results/{name}.md").read_text(encoding="utf-8") == rendered


@pytest.mark.parametrize(("marker", "name"), [("**ViT-B/16** (the figure", "export_vit_b_16.json"),
                                              ("**world-base** (the embedded model; its gates", "export_world.json")])
def test_export_tables_are_export_speed_json(marker, name):
    rows = {r[0]: r[1:] for r in _table_after("docs/benchmarks.md", marker)}
    measured = _results(name)["rows"]
    assert list(rows) == list(measured)
    for label, r in measured.items():
        cells = rows[label]
        if "refused" in r:
            assert cells[0].startswith("refused: ") and "bf16" in r["refused"], label
            continue
        quality = (["reference" if r["image_speedup"] == 1.0 else "—", "—", "—"] if label.startswith("torch") else
                   [f"{r['min_cosine']:.5f}", f"{100 * r['tag_agreement']:.1f} %", f"{r['encoder_mb']:.0f}"])
        speed = [f"{r['images_per_s']:.1f}", f"{r['image_speedup']:.2f}", f"{r['texts_per_s']:.0f}", f"{r['text_speedup']:.2f}"]
        assert cells == quality + speed, label


def _range(values: list[float], digits: int) -> str:
    return f"{min(values):.{digits}f}–{max(values):.{digits}f}"


def _p5_cells(p5: dict, digits: int) -> list[str]:
    runs = p5["runs"]
    return [str(p5["batch"]), _range([r["encoder_img_s"] for r in runs], digits) + " img/s",
            _range([r["job_img_s"] for r in runs], digits) + " img/s",
            f"{p5['p5_median']:.2f} ({p5['p5_min']:.2f}–{p5['p5_max']:.2f})"]


def test_p5_table_is_tag_throughput_json():
    rows = {r[0]: r[1:] for r in _table("docs/benchmarks.md", "| model | batch | encoder alone |")}
    for label, name, digits in (("world (embedded default), before this round's changes", "p5_world_before.json", 0),
                                ("world (embedded default)", "p5_world.json", 0),
                                ("ViT-B/16 (random weights)", "p5_vit_b_16.json", 1)):
        assert rows[label][:4] == _p5_cells(_results(name), digits), label


def test_p5_before_and_after_table_is_its_json():
    rows = {r[0]: r[1:] for r in _table("docs/benchmarks.md", "| tree | encoder alone | `ttd tag` | P5 (wall")}
    for label, name in (("before, run 1", "p5_issue21_before_1.json"), ("after, run 1", "p5_issue21_after_1.json"),
                        ("before, run 2", "p5_issue21_before_2.json"), ("after, run 2", "p5_issue21_after_2.json")):
        p5 = _results(name)
        cpu_s = sorted(r["job_cpu_s"] for r in p5["runs"])[len(p5["runs"]) // 2]
        assert rows[label] == _p5_cells(p5, 0)[1:] + [f"{p5['p5_cpu_median']:.2f}", f"{cpu_s:.2f}"], label


SEGMENTATION_COLUMNS = ("", "_target_mask", "_stage1_minmax_target_mask", "", "_stage1_minmax")


@pytest.mark.parametrize("labelling", ["colours", "shapes"])
def test_segmentation_tables_are_segmentation_json(labelling):
    rows = _table("docs/benchmarks.md", f"| world classes: {labelling}")
    runs = [_results(f"segmentation_{labelling}{suffix}.json")["rows"] for suffix in SEGMENTATION_COLUMNS]
    assert [r[0].replace("whole image", "whole") for r in rows] == [r["setting"] for r in runs[0]]
    for row, *measured in zip(rows, *runs):
        figures = [m["base" if column == 0 else "ttd"] for column, m in enumerate(measured)]
        assert row[1:] == [f"{f['miou']} / {f['mfpr']} / {f['mfnr']}" for f in figures], row[0]


def _seed_cells(run: dict, columns: list[str]) -> list[str]:
    return [str(run[c]) if c in run else "" for c in columns]


def test_training_protocol_tables_are_seeds_json():
    for header, name in (("| run | caption IoU | FPR | FNR | negatives F1 | colour mIoU θ 0.5 | colour mIoU θ 0.9 | train s | guard",
                          "seeds_share75.json"),
                         ("| run (share 0.5) |", "seeds.json")):
        lines = (ROOT / "docs/training.md").read_text(encoding="utf-8").splitlines()
        head = next(line for line in lines if line.startswith(header))
        columns = [c.strip() for c in head.strip().strip("|").split("|")][1:]
        columns = [c for c in columns if c != "guard"]
        report = _results(name)
        rows = {r[0]: r[1:] for r in _table("docs/training.md", header)}
        for run_name, run in report["runs"].items():
            cells = [c.rstrip("*") for c in rows[run_name][:len(columns)]]
            assert cells == _seed_cells(run, columns), run_name
        assert len([r for r in rows if r.startswith("data ")]) == len(report["runs"])
        if "base" in rows:
            assert rows["base"][:6] == _seed_cells(report["base"], columns[:6])
        summary = report["summary"]
        if any(r.startswith("worst") for r in rows):
            worst = next(v for k, v in rows.items() if k.startswith("worst"))
            assert worst[:6] == _seed_cells(report["runs"][summary["worst"]], columns[:6])
            assert rows["mean ± std"][:6] == [f"{summary['mean'][c]} ± {summary['std'][c]}" for c in columns[:6]]


def test_every_training_candidate_row_is_a_run_in_its_json():
    seeds = _benchmark_module("seeds")
    header = "| candidate | `--set` | pair |"
    lines = (ROOT / "docs/training.md").read_text(encoding="utf-8").splitlines()
    head = next(line for line in lines if line.startswith(header))
    columns = [c.strip() for c in head.strip().strip("|").split("|")]
    reports = [r for r in (_results(p.name) for p in sorted((ROOT / "benchmarks/results").glob("seeds*.json")))
               if "overrides" in r]
    checked = 0
    starts = [i for i, line in enumerate(lines) if line.startswith(header)]
    for row in [row for i in starts for row in _table_from(lines[i:])]:
        cells = dict(zip(columns, row))
        if not cells.get("caption IoU", "").replace(".", "").isdigit():
            continue  # a run stopped before its evaluation says so in words
        overrides = dict(seeds.parse_setting(s) for s in cells["`--set`"].strip("`").split())
        data, seed = cells["pair"].split("/")
        figures = [c for c in columns[3:] if c != "guard"]
        candidates = [r["runs"].get(f"data {data} / seed {seed}") for r in reports if r["overrides"] == overrides
                      or (not overrides and r["overrides"] == {"target_mask_share": 0.75})]
        matching = [run for run in candidates if run and _seed_cells(run, figures) == [cells[c] for c in figures]]
        assert matching, f"docs/training.md: no run in benchmarks/results/seeds*.json for {row[0]!r} on {cells['pair']}"
        guard = matching[0].get("guard") or {}
        assert cells["guard"].startswith("FLAGGED") == bool(guard.get("flagged")), row[0]
        checked += 1
    assert checked >= 25


def test_choice_table_is_every_candidates_runs_as_choose_default_renders_them():
    rendered = _benchmark_module("choose_default").table()
    assert rendered.count("\n| ") >= 15 and _rendered_rows_missing(rendered, "docs/training.md") == []


def test_training_memory_table_is_train_memory_json():
    report = _results("train_memory_vit_b_16.json")
    rows = _table("docs/training.md", "| variant | batch 2 (GB)")
    labels = {"before": "before", "trim": "text trimmed", "trim+checkpointing": "text trimmed + gradient checkpointing"}
    by_variant: dict[str, list[dict]] = {}
    for r in report["rows"]:
        by_variant.setdefault(r["variant"], []).append(r)
    assert len(rows) == len(by_variant)
    for row, (variant, measured) in zip(rows, by_variant.items()):
        assert row[0].startswith(labels[variant]), row[0]
        batches = [r["batch"] for r in measured]
        peaks = [r["peak_gb"] for r in measured]
        mean_b, mean_p = sum(batches) / len(batches), sum(peaks) / len(peaks)
        slope = (sum((b - mean_b) * (p - mean_p) for b, p in zip(batches, peaks))
                 / sum((b - mean_b) ** 2 for b in batches))
        assert row[1:] == [f"{p:.2f}" for p in peaks] + [f"{slope:.2f}",
                                                         " / ".join(f"{r['cpu_s_per_step']}" for r in measured)], variant


def _flat(page: str) -> str:
    return " ".join((ROOT / page).read_text(encoding="utf-8").split())


def _mean_std_cell(cell: str, values: list[float]) -> None:
    """A 'mean ± std (worst W; …)' cell: the mean ± std as benchmarks/bias.py writes it, the worst the lowest."""
    bias = _benchmark_module("bias")
    assert cell.split(" (")[0] == bias._mean_std(values), cell
    worst = re.search(r"worst (\d+\.\d)", cell)
    assert worst is None or worst.group(1) == f"{min(values):.1f}", cell


def _ttd_runs(name: str, stage1: str) -> list[dict]:
    return _benchmark_module("bias")._stage1_runs(_results(name))[stage1]


def test_readme_ttd_row_and_caption_sentence_are_the_default_targets_json():
    runs = _ttd_runs("bias_minmax_default_targets.json", "minmax")
    cells = _row("README.md", "pixel-tag-negatives + TTD (the defaults)")
    for cell, column in zip(cells, COLUMNS, strict=True):
        _mean_std_cell(cell, [100 * r["tags"]["pixel-tag-negatives"][column] for r in runs])
    ious = [100 * r["caption_mask"]["iou"] for r in runs]
    mean_std = _benchmark_module("bias")._mean_std(ious)
    assert f"base {_percent(BIAS_CAPTION['iou'])} → TTD {mean_std}, worst seed {min(ious):.1f}" in _flat("README.md")
    seeds = " / ".join(f"{v:.1f}" for v in ious)
    assert f"Caption mask IoU {mean_std} (seeds {seeds}; base {_percent(BIAS_CAPTION['iou'])})" in _flat("docs/benchmarks.md")



def test_mixed_targets_tables_are_their_reruns_json():
    minmax = _ttd_runs("bias_minmax_default_targets.json", "minmax")
    for row in _table("docs/benchmarks.md", "| scorer + TTD (Stage 1: minmax, mixed targets)"):
        for cell, column in zip(row[1:], ("precision", "recall", "f1", "map"), strict=True):
            _mean_std_cell(cell, [100 * r["tags"][row[0]][column] for r in minmax])
    rerun = {s: _ttd_runs("bias_softmax_negatives_rerun.json", s) for s in ("softmax", "negatives")}
    rows = {r[0]: r[1:] for r in _table("docs/benchmarks.md", "| scorer + TTD, mixed targets |")}
    for scorer in ("text-tag", "pixel-tag", "pixel-tag-negatives"):
        for cell, stage1 in zip(rows[scorer][:2], ("softmax", "negatives")):
            _mean_std_cell(cell, [100 * r["tags"][scorer]["f1"] for r in rerun[stage1]])
    for cell, stage1 in zip(rows["caption mask"][2:], ("softmax", "negatives")):
        _mean_std_cell(cell, [100 * r["caption_mask"]["iou"] for r in rerun[stage1]])


def test_calibration_stability_table_is_label_free_json():
    rows = {r[0]: r[1:] for r in _table("docs/calibration.md", "| model | margins | margin spread")}
    for model in LABEL_FREE["models"]:
        cells = rows["base" if model["model"].startswith("base") else "TTD"]
        assert cells == [", ".join(f"{s['margin']:.3f}" for s in model["subsets"]), f"{model['subset_margin_spread']:.2f}",
                         ", ".join(f"{s['f1']:.2f}" for s in model["subsets"]), f"{model['subset_f1_spread']:.2f}"]


def _gpu_run(name: str) -> dict:
    return _results(f"gpu_h200/{name}/gpu_check.json")["steps"]


def _half_up(value: float, digits: int) -> str:
    """Rounded as the docs round by hand: halves up (594.5 -> 595), not to even."""
    return str(Decimal(repr(value)).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def _thousands(value: float) -> str:
    return f"{int(_half_up(value, 0)):,}"


def test_gpu_tables_are_the_h200_reports():
    full, final = _gpu_run("run2_full"), _gpu_run("run3_final")
    agreement = {r[0]: r[4] for r in _table("docs/gpu.md", "| precision | world-base min cosine")}
    for dtype, row in full["tag_cli"]["result"]["rows"].items():
        if dtype.startswith("cuda "):
            assert agreement[dtype.split()[1]] == f"{100 * row['agreement']:.1f} %", dtype
    speed = {r[0]: r[1:] for r in _table("docs/gpu.md", "| dtype | batch 1 | batch 8")}
    measured = full["throughput"]["result"]["rows"]
    for dtype in ("float32", "float16", "bfloat16"):
        rates = [_thousands(measured[f"{dtype} b{b}"]["images_per_s"]) for b in (1, 8, 64, 256)]
        rates[0] += " img/s" if dtype == "float32" else ""
        b256 = measured[f"{dtype} b256"]
        assert speed[dtype] == rates + [f"{b256['peak_memory_mib'] / 1024:.1f} GiB", f"{100 * b256['of_bf16_peak']:.1f} %"]
    end_to_end = {r[0]: r[1:] for r in _table("docs/gpu.md", "| run | images/s | ÷ encoder only")}
    rows = final["tag_end_to_end"]["result"]["rows"]
    captions, vocabulary = rows["ttd tag end-to-end, captions"], rows["ttd tag end-to-end, vocabulary (all world words)"]
    assert end_to_end["+ 15 decoding worker processes overlapping the model"] == [
        f"{_thousands(captions['images_per_s'])} / {_thousands(vocabulary['images_per_s'])}",
        f"{captions['ratio_to_encoder_only']:.2f} / {vocabulary['ratio_to_encoder_only']:.2f}"]
    assert f"÷ encoder only ({_thousands(captions['encoder_only_images_per_s'])})" in _flat("docs/gpu.md")


def test_front_soak_and_huge_tag_tables_are_their_json():
    front = _results("front_overhead.json")
    rows = {r[0]: r[1:] for r in _table("docs/serving.md", "| load (2,000 requests per path)")}
    for label, key in (("`ttd_tagger` (world image + caption)", "tagger"), ("one-row `ttd_text_encoder` (little model time)", "light")):
        load = front[key]
        assert rows[label] == [f"{_half_up(load[side]['throughput_rps'], 0)}, {_half_up(load[side]['p50_ms'], 0)} / "
                               f"{_half_up(load[side]['p99_ms'], 0)} ms" for side in ("front", "direct")] + [
                               f"{_half_up(load['front_cpu_ms_per_request'], 2)} ms"], label
    soak = _results("soak_serve.json")
    row = {r[0]: r[1:] for r in _table("docs/serving.md", "| requests | malformed | crashes")}["10,000 (behind the front)"]
    statuses = ", ".join(f"{n} × {code}" for code, n in soak["malformed_statuses"].items())
    assert row[:8] == [str(soak["malformed"]), f"{soak['crashes']} / {soak['restarts']}",
                       f"{soak['lost']} of {soak['good']:,}", str(soak["mismatched"]),
                       f"{soak['malformed_4xx_with_reason']} of {soak['malformed']} ({statuses})",
                       f"{soak['throughput_rps']:.0f} req/s", f"{soak['p50_ms']:.0f} / {soak['p99_ms']:.0f} ms",
                       f"{soak['rss_after_warmup_mib']:.0f} MiB after 500 requests → {soak['rss_end_mib']:.0f} MiB at the end "
                       f"(+{100 * soak['rss_growth']:.1f} %; the front alone {soak['front_rss_after_warmup_mib']:.0f} → "
                       f"{soak['front_rss_end_mib']:.0f} MiB)"]
    huge = [c for c in _results("huge_tags_memory.json")["cases"] if c["answer"]]
    quoted = _table("docs/serving.md", "| request | answer | peak | resident after |")
    assert len(quoted) == len(huge)
    for row, case in zip(quoted, huge):
        assert row[0].split()[0].strip("`") == case["case"].split(",")[0], row[0]
        assert row[1].split()[0] == case["answer"].split()[0], row[0]
        assert row[2] == f"{_half_up(case['peak_mib'], 0)} MiB", row[0]
        assert row[3].split(" (")[0] == f"{_half_up(case['resident_after_mib'], 0)} MiB", row[0]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


@pytest.mark.parametrize(("label", "name"), [
    ("decoding fixes, run 1", "p5_decode_gil_run1"), ("decoding fixes, run 2", "p5_decode_gil_run2"),
    ("decoding fixes, alternating 1", "p5_decode_gil_alt1"), ("decoding fixes, alternating 2", "p5_decode_gil_alt2"),
    ("final, alternating 1", "p5_final_alt1"), ("final, alternating 2", "p5_final_alt2"),
    ("final, alternating 3", "p5_final_alt3")])
def test_p5_round_rows_are_their_json(label, name):
    p5 = _results(f"{name}.json")
    runs = p5["runs"]
    assert _row("docs/benchmarks.md", label) == [
        _range([r["encoder_img_s"] for r in runs], 0) + " img/s", _range([r["job_img_s"] for r in runs], 0) + " img/s",
        f"{_median([r['job_cpu_s'] for r in runs]):.2f}",
        f"{p5['p5_median']:.3f} ({p5['p5_min']:.2f}–{p5['p5_max']:.2f})", f"{p5['p5_cpu_median']:.2f}"]


def test_compare_versions_p5_table_is_its_summary():
    trees = _results("compare_versions_p5_summary.json")["trees"]
    rows = _table("docs/benchmarks.md", "| tree | encoder alone | `ttd tag` | job CPU s / 512 img | P5 wall (median, range)")
    assert len(rows) == len(trees)
    for row, tree in zip(rows, trees.values()):
        assert tree["commit"] in row[0]
        assert row[1:5] == [f"{tree['encoder_img_s_median']:.0f} img/s", f"{tree['job_img_s_median']:.0f} img/s",
                            f"{tree['job_cpu_s_median']:.2f}",
                            f"{tree['p5_median']:.2f} ({tree['p5_min']:.2f}–{tree['p5_max']:.2f})"], row[0]
        assert row[5].split(" (")[0] == f"{tree['p5_cpu_median']:.2f}", row[0]


def test_compare_versions_records_and_eval_tables_are_its_json():
    report = _results("compare_versions.json")
    rows = _table("docs/benchmarks.md", "| command | decisions | flips | max \\|Δscore\\|")
    assert len(rows) == len(report["cases"])
    for row, case in zip(rows, report["cases"]):
        words = case["case"].split(" (")[0].split()
        assert all(w in row[0] for w in words), (row[0], case["case"])
        assert row[1:4] == [f"{case['decisions']:,}", str(case["flips"]),
                            "0" if case["max_abs_score_diff"] == 0 else f"{case['max_abs_score_diff']:.0e}".replace("e-0", "e-")]
    tables = {which: {line.split()[0]: line.split()[1:] for line in report["eval"][f"table_{which}"].splitlines()[1:7]}
              for which in ("old", "new")}
    quoted = _table_after("docs/benchmarks.md", "the largest difference in their `--json` metrics")
    for row in quoted:
        scorer = row[0].replace("pixel-tag (softmax)", "pixel-tag")
        for cell, column in zip(row[1:], (0, 1, 2, 4), strict=True):
            assert cell == f"{tables['old'][scorer][column]} / {tables['new'][scorer][column]}", (scorer, cell)


# Every table of measured figures in the README and docs is read by a test above, or listed here with why it
# cannot be: a new table of figures must do one or the other.
CHECKED_TABLES = {
    ("README.md", "| scorer | P | R | F1 | mAP | R-prec |"),
    ("docs/benchmarks.md", "| scorer | δ |"), ("docs/benchmarks.md", "| scorer | P | R | F1 | Acc |"),
    ("docs/benchmarks.md", "| caption mask | IoU |"), ("docs/benchmarks.md", "| scorer + TTD (Stage 1: minmax"),
    ("docs/benchmarks.md", "| scorer + TTD, mixed targets"), ("docs/benchmarks.md", "| recall by kind"),
    ("docs/benchmarks.md", "| ablation (seed 0)"), ("docs/benchmarks.md", "| world classes: colours"),
    ("docs/benchmarks.md", "| world classes: shapes"), ("docs/benchmarks.md", "| variant | min cosine vs fp32"),
    ("docs/benchmarks.md", "| backend | precision | batch |"), ("docs/benchmarks.md", "| model | batch | encoder alone"),
    ("docs/benchmarks.md", "| tree | encoder alone | `ttd tag` | P5 (wall"),
    ("docs/benchmarks.md", "| command | decisions | flips"), ("docs/benchmarks.md", "| scorer | P | R | F1 | mAP |"),
    ("docs/benchmarks.md", "| tree | encoder alone | `ttd tag` | job CPU s / 512 img"),
    ("docs/benchmarks.md", "| run | encoder alone | `ttd segment --captions`"),
    ("docs/benchmarks.md", "| run | P9 wall (segment / tag whole)"), ("docs/benchmarks.md", "| texts-ahead run | P9 wall"),
    ("docs/benchmarks.md", "| traced-encoders run |"),
    ("docs/benchmarks.md", "| core-share run |"),
    ("docs/calibration.md", "| model | fit | margin"), ("docs/calibration.md", "| model | margins"),
    ("docs/gpu.md", "| precision | world-base"), ("docs/gpu.md", "| dtype | batch 1"), ("docs/gpu.md", "| run | images/s"),
    ("docs/serving.md", "| side |"), ("docs/serving.md", "| side (ViT-B/16)"), ("docs/serving.md", "| load (2,000"),
    ("docs/serving.md", "| requests | malformed"), ("docs/serving.md", "| request | answer | peak"),
    ("docs/training.md", "| run | caption IoU | FPR | FNR | negatives F1"), ("docs/training.md", "| run (share 0.5)"),
    ("docs/training.md", "| candidate | `--set` | pair"), ("docs/training.md", "| variant | batch 2 (GB)"),
    ("docs/training.md", "| candidate | runs (of the protocol's 8)"),
}
NOT_FIGURES = {  # tables of names, commands and code, no measurement
    ("README.md", "| page |"), ("docs/api.md", "| `ttd.load` argument"), ("docs/architecture.md", "| file |"),
    ("docs/calibration.md", "| you have |"), ("docs/edge.md", "| command | on the base install"),
    ("docs/formats.md", "| column | type"), ("docs/formats.md", "| file |"), ("docs/gpu.md", "| command | what it does"),
    ("docs/gpu.md", "| part | code"), ("docs/gpu.md", "| change | code"), ("docs/gpu.md", "| part | status"),
    ("docs/reliability.md", "| item | found"),
}
WITHOUT_JSON = {  # measured before their runs kept a JSON; the command that re-measures is beside each table
    ("docs/benchmarks.md", "| tree | encoder alone | `ttd segment --captions`"): "P9 rows: p9_whole_images_*.json "
                                                                                 "hold runs, not the table's medians",
    ("docs/benchmarks.md", "| graph | on the host"): "export.int8_portability prints, writes no JSON",
    ("docs/benchmarks.md", "| | base install"): "benchmarks/cold_start.sh prints, writes no JSON",
    ("docs/benchmarks.md", "| command | wall s"): "benchmarks/cold_start.sh prints, writes no JSON",
    ("docs/benchmarks.md", "| command (idle cores)"): "benchmarks/cold_start.sh prints, writes no JSON",
    ("docs/benchmarks.md", "| tree | P5 wall, median (min–max) of 5 | P5 by CPU time |"): "runs of an earlier round, not kept",
    ("docs/benchmarks.md", "| model | batch | tags per image"): "a one-off proxy count in a session, not kept",
    ("docs/reliability.md", "| recovery after tritonserver"): "benchmarks/serve_recovery.py prints, writes no JSON",
    ("docs/training.md", "| run | caption IoU | FPR | FNR | fitted margin"): "runs of the collapse study, not kept",
    ("docs/training.md", "| | start | good (seed 1)"): "per-step diagnostics of runs not kept",
    ("docs/training.md", "| Stage 2 on the collapsing seeds"): "runs of the collapse study, not kept",
    ("docs/training.md", "| run on 4711/3"): "per-step diagnostics of the screening runs, not kept",
    ("docs/training.md", "| run | caption mask ≥ θ"): "per-step diagnostics of the screening runs, not kept",
}


def _tables_with_figures() -> list[tuple[str, str]]:
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
                found.append((str(page.relative_to(ROOT)), line))
    return found


def test_every_table_of_figures_is_checked_or_says_why_not():
    known = CHECKED_TABLES | NOT_FIGURES | set(WITHOUT_JSON)
    unknown = [f"{page}: {header}" for page, header in _tables_with_figures()
               if not any(page == p and header.startswith(prefix) for p, prefix in known)]
    assert unknown == []
    stale = [k for k in known if not any(page == k[0] and header.startswith(k[1]) for page, header in _tables_with_figures())]
    assert stale == []


def test_p9_texts_ahead_table_is_its_json():
    rows = _table("docs/benchmarks.md", "| texts-ahead run | P9 wall")
    assert len(rows) == 6
    for row in rows:
        report = _results(f"p9_whole_images_idle_{row[0]}.json")
        cells = [[f"{report[f'{p}{kind}_median']:.3f}" for p in ("p9_segment", "p9_tag_whole", "p5_centre")]
                 for kind in ("", "_by_cpu")]
        record = statistics.median(r["stages_segment_s"]["record_cpu"] for r in report["runs"])
        assert row[1:] == [" / ".join(cells[0][:2]), cells[0][2], " / ".join(cells[1]), f"{record:.3f}"], row[0]


def _p9_run_cells(report: dict) -> list[str]:
    """A P9 run's row: encoder alone img/s, segment windows/s, P9 wall, P5 wall, by the job's CPU."""
    runs = report["runs"]
    cells = [[f"{report[f'{p}{kind}_median']:.3f}" for p in ("p9_segment", "p9_tag_whole", "p5_centre")]
             for kind in ("", "_by_cpu")]
    return [f"{statistics.median(r['encoder_img_s'][0] for r in runs):.0f}",
            f"{statistics.median(r['segment_windows_s'] for r in runs):.0f}",
            " / ".join(cells[0][:2]), cells[0][2], " / ".join(cells[1])]


def test_p9_traced_encoders_table_is_its_json():
    rows = _table("docs/benchmarks.md", "| traced-encoders run |")
    assert len(rows) == 14
    for row in rows:
        report = _results(f"p9_whole_images_{row[0]}.json")
        record_cpu = statistics.median(r["stages_segment_s"]["record_cpu"] for r in report["runs"])
        assert row[1:] == [*_p9_run_cells(report), f"{record_cpu:.3f}"], row[0]
    after = [_results(f"p9_whole_images_r6-after-{n}.json") for n in range(1, 7)]
    for key, median, worst in (("p9_segment_median", "0.865", "0.836"), ("p9_tag_whole_median", "0.856", "0.825")):
        values = [report[key] for report in after]
        assert (f"{statistics.median(values):.3f}", f"{min(values):.3f}") == (median, worst)


def test_p9_core_share_table_is_its_json():
    rows = _table("docs/benchmarks.md", "| core-share run |")
    assert [row[0] for row in rows] == [f"r7-{side}-{n}" for n in range(1, 9)
                                        for side in (("after", "before") if n % 2 else ("before", "after"))]
    for row in rows:
        report = _results(f"p9_whole_images_{row[0]}.json")
        assert row[1:] == [*_p9_run_cells(report), report["load_average"][0]], row[0]
    text = " ".join(Path("docs/benchmarks.md").read_text().split())
    for side, runs in (("after", range(1, 9)), ("before", range(2, 9))):  # before-1: not on idle cores
        reports = [_results(f"p9_whole_images_r7-{side}-{n}.json") for n in runs]
        figures = {}
        for key in ("p9_segment_median", "p9_tag_whole_median", "p5_centre_median"):
            values = [report[key] for report in reports]
            figures[key] = (f"{statistics.median(values):.3f}", f"{min(values):.3f}",
                            f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}")
        segment, tag_whole, centre = figures.values()
        if side == "after":
            claims = [f"segment median {segment[0]}, worst {segment[1]} (mean {segment[2]})",
                      f"tag whole median {tag_whole[0]}, worst {tag_whole[1]} ({tag_whole[2]})",
                      f"P5 (the centre crop, the same runner): median {centre[0]}, worst {centre[1]} after"]
        else:
            claims = [f"segment median {segment[0]}, worst {segment[1]} ({segment[2]}); tag whole {tag_whole[0]}, "
                      f"worst {tag_whole[1]} ({tag_whole[2]})", f"{centre[0]}, worst {centre[1]} before"]
        for claim in claims:
            assert claim in text, claim


def test_p9_core_share_paired_figures_are_their_json():
    text = " ".join(Path("docs/benchmarks.md").read_text().split())
    one, two = (_results(name) for name in ("core_share_paired.json", "core_share_paired_2.json"))

    def ratio(report, kind, side):
        figures = report["world_ratio"][kind][side]
        return f"{figures['median']:.3f} ({figures['worst']:.3f})"

    def pairs(report, kind, unit=""):
        sides = report["photo_seconds"][kind]
        values = [a / b for a, b in zip(sides["share"]["values"], sides["no_share"]["values"])]
        return f"{statistics.median(values):.3f} ({len(values)}{unit})"

    claims = [f"`ttd segment --captions` {ratio(one, 'segment', 'share')} and {ratio(two, 'segment', 'share')} with "
              f"the share against {ratio(one, 'segment', 'no_share')} and {ratio(two, 'segment', 'no_share')} without",
              f"`ttd tag --crop whole` {ratio(one, 'tag_whole', 'share')} and {ratio(two, 'tag_whole', 'share')} against "
              f"{ratio(one, 'tag_whole', 'no_share')} and {ratio(two, 'tag_whole', 'no_share')}",
              f"the decoding-bound centre crop {pairs(one, 'centre', ' pairs')} and {pairs(two, 'centre')}",
              f"side) {pairs(one, 'segment')} and {pairs(two, 'segment')}"]
    for claim in claims:
        assert claim in text, claim


def test_p9_second_round_table_is_its_json():
    rows = _table("docs/benchmarks.md", "| run | encoder alone | `ttd segment --captions` | `ttd tag --crop whole`")
    assert rows
    for row in _table("docs/benchmarks.md", "| run | P9 wall (segment / tag whole) | P5 wall (centre)"):
        report = _results(f"p9_whole_images_idle_{row[0].split()[-1]}.json")
        cells = [[f"{report[f'{p}{kind}_median']:.3f}" for p in ("p9_segment", "p9_tag_whole", "p5_centre")]
                 for kind in ("", "_by_cpu", "_bound")]
        assert row[1:] == [" / ".join(cells[0][:2]), cells[0][2], " / ".join(cells[1]), " / ".join(cells[2])], row[0]
    for row in rows:
        tree, pair = row[0].split(", pair ")
        report = _results(f"p9_whole_images_round4_{tree}_{pair}.json")
        runs = report["runs"]
        medians = [f"{report[f'{p}_median']:.3f}" for p in ("p9_segment", "p9_tag_whole", "p5_centre")]
        by_cpu = [f"{report[f'{p}_by_cpu_median']:.3f}" for p in ("p9_segment", "p9_tag_whole", "p5_centre")]
        bound = [f"{report[f'{p}_bound_median']:.3f}" for p in ("p9_segment", "p9_tag_whole", "p5_centre")]
        assert row[1:] == [_range([v for r in runs for v in r["encoder_img_s"]], 0) + " img/s",
                           _range([r["segment_windows_s"] for r in runs], 0) + " windows/s",
                           _range([r["tag_whole_windows_s"] for r in runs], 0),
                           _range([r["centre_img_s"] for r in runs], 0) + " img/s",
                           " / ".join(medians[:2]), medians[2], " / ".join(by_cpu), " / ".join(bound)], row[0]
