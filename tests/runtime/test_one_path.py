"""Evaluation runs through the runtime Tagger: an export evaluates like its model."""

import json

import pytest
from click.testing import CliRunner

from ttd.cli import main


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    from export.pipeline import run_export
    from ttd.model.factory import load_model

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
    from ttd.model.factory import create_model

    run_export(create_model("world-tiny", seed=0), tmp_path / "random", check_count=4)
    target = tmp_path / "random.json"
    result = CliRunner().invoke(main, ["eval", "--count", "48", "--backend", "onnxruntime", "--export-dir",
                                       str(tmp_path / "random"), "--json", str(target)])
    assert result.exit_code == 0, result.output
    random_run = json.loads(target.read_text())
    assert random_run["model"] == "registered:world-tiny" and random_run["tags"]["pixel-tag"]["map"] < 0.85


@pytest.mark.parametrize(("score_method", "scorer"), [("softmax", "pixel-tag"), ("negatives", "pixel-tag-negatives")])
def test_evaluation_scores_are_the_taggers(tiny_model, score_method, scorer):
    """What `ttd eval` counts is what `ttd tag` selects: the evaluation's pixel-tag decisions
    equal Tagger.tag's selections on the same samples, for each pixel-tag score."""
    import numpy as np

    from ttd.data.annotations import world_eval_samples
    from ttd.evaluation.evaluate import evaluate
    from ttd.runtime import torch_tagger
    from ttd.model.tags import candidate_tags

    samples = world_eval_samples(2, 24)
    tagger = torch_tagger(tiny_model, "cpu", threshold=0.3, score_method=score_method)
    result = evaluate(tagger, samples, threshold=0.3, progress=False)
    tagged = tagger.tag(np.stack([s.image for s in samples]), [candidate_tags(s.caption) for s in samples])
    tp = sum(t in s.relevant_tags for r, s in zip(tagged, samples, strict=True) for t in r.selected)
    fp = sum(t not in s.relevant_tags for r, s in zip(tagged, samples, strict=True) for t in r.selected)
    precision = result["tags"][scorer]["precision"]
    assert precision == pytest.approx(tp / max(tp + fp, 1))


# --- contracts named once ---------------------------------------------


def test_exported_graphs_and_backends_follow_the_contract(default_export, tiny_model):
    """The ONNX graphs carry exactly the contract's input and output names, and every backend
    returns the contract's named results (read by name, not by position)."""
    import numpy as np
    import onnx

    from ttd.model.contract import GRAPHS, SCORE_ROWS, ImageEmbeddings, TagHeadOutputs
    from ttd.runtime import load_tagger, torch_tagger

    for graph in GRAPHS.values():
        proto = onnx.load(str(default_export / f"{graph.name}.onnx")).graph
        assert tuple(i.name for i in proto.input) == graph.inputs
        assert tuple(o.name for o in proto.output) == graph.outputs
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    for tagger in (torch_tagger(tiny_model, "cpu"), load_tagger("onnxruntime", export_dir=str(default_export))):
        pixels = np.zeros((2, 3, 64, 64), np.float32)
        encoded = tagger.backend.encode_images(pixels)
        assert isinstance(encoded, ImageEmbeddings) and encoded.patch_embeds.shape == (2, tagger.config.embed_dim, 8, 8)
        request = tagger.request([["red", "circle"], ["red"]], with_cosines=True)
        head = tagger.backend.score_tags(encoded.patch_embeds[:, None], request)
        assert isinstance(head, TagHeadOutputs)
        assert head.tag_scores.shape == (2, len(SCORE_ROWS), 2) and head.tag_cosines.shape == (2, 2, 8, 8)
        assert head.tag_scores[1, :, 1].tolist() == [0.0] * len(SCORE_ROWS)  # the padded tag
        assert tagger.tag(images, [["red", "circle"]] * 2, with_masks=True)[0].masks.shape == (2, 8, 8)
        assert tagger.tag(images, [["red", "circle"]] * 2)[0].masks is None


def test_triton_repository_names_come_from_the_contract(default_export, tmp_path):
    from export.triton import build_repository
    from ttd.model.contract import GRAPHS, TAGGER_INPUTS, TAGGER_MODEL, TAGGER_OUTPUTS

    repo = build_repository(default_export, tmp_path / "repo")
    for graph in GRAPHS.values():
        config = (repo / graph.served_as / "config.pbtxt").read_text()
        for name in (*graph.inputs, *graph.outputs):
            assert f'name: "{name}"' in config, (graph.served_as, name)
    tagger_config = (repo / TAGGER_MODEL / "config.pbtxt").read_text()
    for name in (*TAGGER_INPUTS, *TAGGER_OUTPUTS):
        assert f'name: "{name}"' in tagger_config


def test_the_tagger_owns_preprocessing_with_the_models_interpolation(tmp_path, tiny_model):
    """`ttd tag`, the export gates and the Tagger prepare an image identically, with the model's
    own interpolation (the world model's is bilinear; the gates used to hard-code bicubic)."""
    import numpy as np
    from PIL import Image

    from export.checks import CHECK_SEED, check_pairs
    from ttd.data.world import make_sample
    from ttd.runtime.images import Preprocess
    from ttd.runtime import torch_tagger

    tagger = torch_tagger(tiny_model, "cpu")
    assert tagger.preprocess == Preprocess(64, "bilinear")
    big = Image.fromarray(make_sample(0, 0).image).resize((150, 100), Image.NEAREST)
    big.save(tmp_path / "big.png")
    prepared = tagger.prepare([tmp_path / "big.png"])
    assert prepared.shape == (1, 64, 64, 3) and prepared.dtype == np.uint8
    assert not np.array_equal(prepared[0], Preprocess(64, "bicubic")(big))  # the interpolation matters here
    np.testing.assert_array_equal(prepared[0], Preprocess(64, "bilinear")(big))
    images, _ = check_pairs(tagger.preprocess, 2)
    np.testing.assert_array_equal(images, tagger.prepare([make_sample(CHECK_SEED, i).image for i in range(2)]))


def test_ttd_tag_scores_what_tagger_prepare_gives(tmp_path, tiny_model):
    """`ttd tag` (decode in workers or here) goes through the Tagger's preprocessing: its scores
    equal Tagger.tag on Tagger.prepare of the same files."""
    import numpy as np
    from PIL import Image

    from ttd.data.world import make_sample
    from ttd.data.items import read_captions
    from ttd.runtime import torch_tagger
    from ttd.jobs.stream_job import tag_stream

    lines = []
    for i in range(3):
        sample = make_sample(4, i)
        Image.fromarray(sample.image).resize((97, 80), Image.NEAREST).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": sample.caption}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    tagger = torch_tagger(tiny_model, "cpu")
    items = read_captions(tmp_path / "captions.jsonl")
    tag_stream(tagger, items, tmp_path / "out.jsonl", progress=False, decode_workers=0)
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    from ttd.model.tags import candidate_tags

    expected = tagger.tag(tagger.prepare([tmp_path / f"{i}.png" for i in range(3)]),
                          [candidate_tags(item.caption) for item in items])
    for record, result in zip(records, expected, strict=True):
        np.testing.assert_allclose([c["score"] for c in record["candidates"]], result.scores, atol=1e-6)


def test_export_writes_its_manifest_once_and_keeps_the_model_config_in_one_place(tmp_path, monkeypatch):
    from pathlib import Path

    import export.pipeline as pipeline
    from ttd.model.factory import create_model
    from ttd.runtime.export_dir import CONFIG, MANIFEST, read_export

    writes = []
    original = Path.write_text

    def counting(self, *args, **kwargs):
        if self.name == MANIFEST:
            writes.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", counting)
    manifest = pipeline.run_export(create_model("world-tiny", seed=0), tmp_path, "fp16", check_count=4)
    assert len(writes) == 1
    on_disk = json.loads((tmp_path / MANIFEST).read_text())
    assert on_disk == json.loads(json.dumps(manifest)) and on_disk["precision"] == "fp16"
    config_fields = {"model", "dense_mode", "image_size", "mean", "std", "interpolation", "tau", "grid", "embed_dim"}
    assert not config_fields & set(on_disk), "the model config lives in model.json only"
    assert json.loads(json.dumps(read_export(tmp_path).config.to_dict())) == json.loads((tmp_path / CONFIG).read_text())


def test_precision_variants_come_from_the_registry(tmp_path, monkeypatch):
    """export/precision.py's CONVERTERS is the one place a precision is made: the pipeline calls
    the registered converter (a swapped-in converter runs instead of the real one)."""
    import export.pipeline as pipeline
    from export.precision import CONVERTERS
    from ttd.model.config import PRECISIONS
    from ttd.model.factory import create_model

    assert set(CONVERTERS) == set(PRECISIONS) - {"fp32"}
    calls = []
    monkeypatch.setitem(CONVERTERS, "fp16", lambda job: calls.append(job.out_dir))  # graphs stay fp32
    manifest = pipeline.run_export(create_model("world-tiny", seed=0), tmp_path, "fp16", check_count=4)
    assert len(calls) == 1 and calls[0].parent == tmp_path.parent  # the staging folder beside OUT_DIR
    assert manifest["precision"] == "fp16"
    assert manifest["quality"]["min_cosine"]["patch_embeds"] > 0.99999  # fp32 graphs under the fp16 label


def test_training_defaults_per_objective():
    from ttd.model.factory import create_model
    from ttd.train.loop import OBJECTIVE_DEFAULTS, TrainConfig

    ttd, clip = TrainConfig.for_objective("ttd"), TrainConfig.for_objective("clip", steps=None, lr=5e-4)
    assert (ttd.steps, ttd.batch_size, ttd.warmup_steps) == (300, 64, 30)
    assert (clip.steps, clip.batch_size, clip.lr, clip.weight_decay) == (1500, 128, 5e-4, 0.1)
    assert set(OBJECTIVE_DEFAULTS) == {"ttd", "clip"}
    with pytest.raises(ValueError, match="unknown objective 'simclr'"):
        TrainConfig.for_objective("simclr")
    from ttd.model.config import DENSE_MODES

    other = next(mode for mode in DENSE_MODES if mode != create_model("world-tiny").config.dense_mode)
    assert create_model("world-tiny", dense_mode=other).config.dense_mode == other


def test_one_precision_vocabulary_with_torch_aliases(tmp_path, tiny_model):
    import copy

    from ttd.model.config import canonical_precision
    from ttd.runtime.torch_backend import TorchBackend

    assert canonical_precision("bfloat16") == "bf16" and canonical_precision("fp16") == "fp16"
    with pytest.raises(ValueError, match="unknown precision 'float64'"):
        canonical_precision("float64")
    assert str(TorchBackend(copy.deepcopy(tiny_model), "cpu", "bfloat16").dtype) == "torch.bfloat16"  # a copy: it casts in place
    result = CliRunner().invoke(main, ["tag", "--vocabulary", str(tmp_path / "v.txt"), str(tmp_path), "-o",
                                       str(tmp_path / "o.jsonl"), "--dtype", "float64"])
    assert result.exit_code == 2 and "'float64' is not one of auto, fp32, bf16, fp16" in result.output
