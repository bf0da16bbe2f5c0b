"""`ttd bench`: rows per backend x precision x batch with quality figures, refusals with why,
CPU and versions, and a Markdown table. Asserts structure and quality numbers, never timings."""

import json

from export.bench import BenchSettings, run_bench, to_markdown
from ttd.model.factory import create_model
from ttd.runtime.hardware import cpu_capabilities


def test_bench_rows_quality_refusals_and_report():
    settings = BenchSettings(batch_sizes=(1, 2), text_batch=4, tags=16, min_seconds=0.0, check_count=8,
                             variants=(("int8", "dynamic"),))
    result = run_bench(lambda: create_model("world-tiny", seed=0), settings, progress=lambda line: None)
    rows = {(r["backend"], r["precision"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(b, p, n) for b, p in (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "int8 dynamic"))
                         for n in (1, 2)}
    for (backend, precision, batch), row in rows.items():
        assert row["images_per_s"] > 0 and row["texts_per_s"] > 0 and row["tag_head_ms_per_image"] > 0
        assert row["vocab_tagging_over_encoding"] > 0
    assert rows[("torch", "fp32", 1)]["images_speedup"] == 1.0 and rows[("torch", "fp32", 1)]["min_cosine"] == 1.0
    int8 = rows[("onnxruntime", "int8 dynamic", 2)]
    # the int8 gate's figures (fp32 ONNX parity would be > 0.99999)
    assert 0.99 <= int8["min_cosine"] < 0.99995 and int8["tag_agreement"] >= 0.95
    assert 0.99 <= rows[("torch", "bf16", 1)]["min_cosine"] < 1.0
    assert result["refused"] == []
    assert result["cpu"] == cpu_capabilities().to_dict() and result["versions"]["onnxruntime"] != "not installed"
    json.dumps(result)  # the --json file
    result["refused"].append({"backend": "onnxruntime", "precision": "bf16", "why": "bf16 export refused: why"})
    table = to_markdown(result)
    assert f"CPU {result['cpu']['model']} ({result['cpu']['isa_class']}; flags:" in table
    assert table.count("\n| torch | ") == 4 and "| onnxruntime | bf16 | refused: bf16 export refused: why |" in table
