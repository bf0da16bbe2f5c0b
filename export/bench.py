"""`ttd bench`: what each backend × precision × batch size runs at on this machine, and at what
quality, in one command.

For every path this machine can run — torch fp32 (the reference) and bf16 on the CPU, torch
fp16 on a GPU if there is one, and onnxruntime on fp32 / fp16 / int8 (dynamic, static) exports
made on the spot (each through its quality gate; a refused one is listed with why) — it times
- images/s of the dense image encoder (global + patch embeddings),
- texts/s of the text encoder,
- the tag head: ms per image for one image against K tags through the backend's tag-head graph,
- vocabulary tagging with K cached tags (ttd/runtime/vocab_tagging.py) as a ratio to image encoding alone,
and gives each row its quality against torch fp32 (min cosine of the embeddings, selected-tag
agreement on world pairs). The CPU model and flags, GPU, versions and settings go with the rows.
Timings are medians of repeated calls after a warm-up, in wall-clock seconds, or with
`clock="cpu"` in this process's CPU seconds (with one thread: what the work costs, whatever else
the machine is running — the honest figure on a shared machine; wall time there mostly measures
the neighbours).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from export.checks import GateError, check_pairs, compare
from export.pipeline import tool_versions
from ttd.errors import InputError
from ttd.runtime.hardware import cpu_capabilities
from ttd.runtime.images import Preprocess
from ttd.runtime.tagger import Tagger

VARIANTS = (("fp32", "dynamic"), ("fp16", "dynamic"), ("int8", "dynamic"), ("int8", "static"))


@dataclass(frozen=True)
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 8)
    text_batch: int = 64
    tags: int = 1000
    min_seconds: float = 1.0  # per timing: repeat calls until this much time has passed (at least 3)
    check_count: int = 32
    threads: int = 0
    variants: tuple[tuple[str, str], ...] = VARIANTS  # (precision, int8 mode) of the onnxruntime exports
    clock: str = "wall"  # or "cpu": process CPU time (use with threads=1)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def median_seconds(fn: Callable[[], object], min_seconds: float, clock: str = "wall") -> float:
    now = CLOCKS[clock]
    fn()  # warm-up (allocations, onnxruntime's first-run optimisations)
    times: list[float] = []
    start = now()
    while len(times) < 3 or now() - start < min_seconds:
        t0 = now()
        fn()
        times.append(now() - t0)
    return statistics.median(times)


def _quality(figures: dict) -> dict:
    return {"min_cosine": min(figures["min_cosine"][k] for k in ("image_embeds", "patch_embeds", "text_embeds")),
            "tag_agreement": figures["tag_agreement"]}


def measure_backend(tagger: Tagger, images: np.ndarray, settings: BenchSettings) -> list[dict]:
    """Timing rows (one per image batch size) of one backend; images uint8 at the model's size."""
    config, backend = tagger.config, tagger.backend
    rng = np.random.default_rng(0)
    ids = tagger.tokenizer([f"a photo of a thing number {i}" for i in range(settings.text_batch)])
    text_s = median_seconds(lambda: backend.encode_texts(ids), settings.min_seconds, settings.clock)
    vocabulary = [f"tag {i}" for i in range(settings.tags)]
    tag_embeds = rng.normal(size=(settings.tags, config.embed_dim)).astype(np.float32)
    tag_embeds /= np.linalg.norm(tag_embeds, axis=1, keepdims=True)
    rows = []
    for batch in settings.batch_sizes:
        chunk = np.resize(images, (batch,) + images.shape[1:])
        encode_s = median_seconds(lambda: tagger.encode_images(chunk), settings.min_seconds, settings.clock)
        _, views = tagger.encode_images(chunk[:1])
        request = tagger.request(vocabulary_embeds=tag_embeds, with_cosines=True)
        head_s = median_seconds(lambda: backend.score_tags(views, request), settings.min_seconds, settings.clock)
        vocab_s = median_seconds(lambda: tagger.tag_vocabulary(chunk, vocabulary, tag_embeds),
                                 settings.min_seconds, settings.clock)
        rows.append({"batch": batch, "images_per_s": batch / encode_s, "texts_per_s": settings.text_batch / text_s,
                     "tag_head_ms_per_image": 1000 * head_s, "vocab_tagging_over_encoding": vocab_s / encode_s})
    return rows


def run_bench(make_model: Callable[[], object], settings: BenchSettings = BenchSettings(),
              progress: Callable[[str], None] = print) -> dict:
    """Every runnable path of the model `make_model()` builds (fresh each call), timed and gated."""
    import torch

    from export.pipeline import run_export
    from ttd.runtime import model_tagger
    from ttd.runtime.export_dir import read_export
    from ttd.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from ttd.runtime.torch_backend import TorchBackend

    if settings.clock not in CLOCKS:
        raise InputError(f"unknown clock {settings.clock!r}; choose one of {', '.join(CLOCKS)}")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model = make_model().float().eval()
    caps = cpu_capabilities()
    images, captions = check_pairs(Preprocess.for_model(model.config), settings.check_count)
    reference = model_tagger(TorchBackend(copy.deepcopy(model), "cpu", "fp32"), model)
    result = {"model": model.config.name, "cpu": caps.to_dict(), "versions": tool_versions(("ttd-toolkit", "torch", "onnxruntime", "onnx", "numpy")),
              "settings": settings.__dict__ | {"batch_sizes": list(settings.batch_sizes),
                                               "variants": [list(v) for v in settings.variants],
                                               "torch_threads": torch.get_num_threads()},
              "rows": [], "refused": []}

    def add(backend: str, precision: str, tagger: Tagger, quality: dict) -> None:
        progress(f"timing {backend} {precision} ...")
        for row in measure_backend(tagger, images, settings):
            result["rows"].append({"backend": backend, "precision": precision, **row, **quality})

    add("torch", "fp32", reference, {"min_cosine": 1.0, "tag_agreement": 1.0})
    torch_paths = [("cpu", "bf16")] + ([("cuda", "fp16")] if caps.gpu else [])
    for device, label in torch_paths:
        candidate = model_tagger(TorchBackend(copy.deepcopy(model), device, label), model)
        add(f"torch ({device})" if device != "cpu" else "torch", label, candidate,
            _quality(compare(reference, candidate, images, captions)))
    with tempfile.TemporaryDirectory() as tmp:
        for precision, mode in settings.variants:
            label = precision + (f" {mode}" if precision == "int8" else "")
            out = Path(tmp) / label.replace(" ", "-")
            progress(f"exporting {label} (with its quality gate) ...")
            try:
                manifest = run_export(make_model(), out, precision, mode, check_count=settings.check_count)
            except GateError as error:
                result["refused"].append({"backend": "onnxruntime", "precision": label, "why": str(error)})
                continue
            backend = OnnxRuntimeBackend(read_export(out), "cpu", settings.threads)
            add("onnxruntime", label, model_tagger(backend, model), _quality(manifest.get("quality", manifest["parity"])))
    base = {r["batch"]: r for r in result["rows"] if r["backend"] == "torch" and r["precision"] == "fp32"}
    for row in result["rows"]:
        row["images_speedup"] = row["images_per_s"] / base[row["batch"]]["images_per_s"]
        row["texts_speedup"] = row["texts_per_s"] / base[row["batch"]]["texts_per_s"]
    return result


def to_markdown(result: dict) -> str:
    cpu = result["cpu"]
    s = result["settings"]
    lines = [f"`ttd bench` — model {result['model']}; CPU {cpu['model']} ({cpu['isa_class']}; flags: "
             f"{' '.join(cpu['flags']) or 'none detected'}); GPU {cpu['gpu'] or 'none'}; "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
             + f"; {s.get('clock', 'wall')} clock, torch threads {s['torch_threads']}, "
               f"text batch {s['text_batch']}, {s['tags']} tags, "
               f"{s['check_count']} gate pairs.", "",
             "| backend | precision | batch | images/s | × torch fp32 | texts/s | × torch fp32 | tag head ms/img "
             f"({s['tags']} tags) | vocab tagging ÷ encoding | min cosine | tag agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['backend']} | {r['precision']} | {r['batch']} | {r['images_per_s']:.1f} | "
                     f"{r['images_speedup']:.2f} | {r['texts_per_s']:.1f} | {r['texts_speedup']:.2f} | "
                     f"{r['tag_head_ms_per_image']:.2f} | {r['vocab_tagging_over_encoding']:.3f} | "
                     f"{r['min_cosine']:.5f} | {100 * r['tag_agreement']:.1f}% |")
    for r in result["refused"]:
        lines.append(f"| {r['backend']} | {r['precision']} | refused: {r['why'][:160]} | | | | | | | | |")
    return "\n".join(lines) + "\n"
