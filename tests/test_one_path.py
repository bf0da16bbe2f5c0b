"""Evaluation runs through the runtime Tagger (issue 10): an export evaluates like its model."""

import json

import pytest
from click.testing import CliRunner

from ttd.cli import main


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    from export.pipeline import run_export
    from ttd.factory import load_model

    out = tmp_path_factory.mktemp("export")
    run_export(load_model(), out, check_count=8)
    return out


def test_eval_through_onnxruntime_export_equals_the_torch_model(default_export, tmp_path):
    results = {}
    for backend in ("torch", "onnxruntime"):
        target = tmp_path / f"{backend}.json"
        extra = ["--export-dir", str(default_export)] if backend == "onnxruntime" else []
        result = CliRunner().invoke(main, ["eval", "--count", "48", "--device", "cpu", "--backend", backend,
                                           "--json", str(target), *extra])
        assert result.exit_code == 0, result.output
        results[backend] = json.loads(target.read_text())
    torch_run, ort_run = results["torch"], results["onnxruntime"]
    assert ort_run["backend"] == "onnxruntime" and ort_run["candidates"] == torch_run["candidates"] > 0
    for scorer, metrics in torch_run["tags"].items():
        for name, value in metrics.items():
            assert ort_run["tags"][scorer][name] == pytest.approx(value, abs=0.01), (scorer, name)
    for name, value in torch_run["caption_mask"].items():
        assert ort_run["caption_mask"][name] == pytest.approx(value, abs=0.005), name
    # the model separates the scorers: pixel-tag beats image-tag on F1 through both backends
    for run in (torch_run, ort_run):
        assert run["tags"]["pixel-tag"]["f1"] > run["tags"]["image-tag"]["f1"] + 0.2


def test_eval_of_an_export_measures_that_export(tmp_path):
    """An export of another (random) model evaluates as that model, not as the default."""
    from export.pipeline import run_export
    from ttd.factory import create_model

    run_export(create_model("world-tiny", seed=0), tmp_path / "random", check_count=4)
    target = tmp_path / "random.json"
    result = CliRunner().invoke(main, ["eval", "--count", "48", "--backend", "onnxruntime", "--export-dir",
                                       str(tmp_path / "random"), "--json", str(target)])
    assert result.exit_code == 0, result.output
    random_run = json.loads(target.read_text())
    assert random_run["model"] == "registered:world-tiny" and random_run["tags"]["pixel-tag"]["map"] < 0.85


def test_evaluation_scores_are_the_taggers(tiny_model):
    """What `ttd eval` counts is what `ttd tag` selects: the evaluation's pixel-tag decisions
    equal Tagger.tag's selections on the same samples."""
    import numpy as np

    from ttd.data.annotations import world_eval_samples
    from ttd.evaluate import evaluate
    from ttd.runtime import torch_tagger
    from ttd.tags import candidate_tags

    samples = world_eval_samples(2, 24)
    tagger = torch_tagger(tiny_model, "cpu", threshold=0.3)
    result = evaluate(tagger, samples, threshold=0.3, progress=False)
    tagged = tagger.tag(np.stack([s.image for s in samples]), [candidate_tags(s.caption) for s in samples])
    tp = sum(t in s.relevant_tags for r, s in zip(tagged, samples, strict=True) for t in r.selected)
    fp = sum(t not in s.relevant_tags for r, s in zip(tagged, samples, strict=True) for t in r.selected)
    precision = result["tags"]["pixel-tag"]["precision"]
    assert precision == pytest.approx(tp / max(tp + fp, 1))
