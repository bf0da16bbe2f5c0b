"""`ttd export`, `ttd bench`, `ttd triton build|validate` and `ttd serve`: the deployment commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ttd.model.config import (
    DEFAULT_SCORE_METHOD,
    DEFAULT_THRESHOLD,
    INT8_MODES,
    PRECISIONS,
    SCORE_METHODS,
)
from ttd.model.contract import INSTANCE_KINDS, TRITON_ENGINES

from ttd.cli.common import (Precision, fail, main, model_options)
from ttd.options import UNIT_INTERVAL


@main.command("export")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@model_options
@click.option("--precision", type=Precision(PRECISIONS), default="fp32", show_default=True,
              help="Encoder precision. Variants must pass a quality gate against fp32 (cosine ≥ 0.99, "
                   "selected-tag agreement ≥ 95%) or the export is refused.")
@click.option("--int8-mode", type=click.Choice(INT8_MODES), default="dynamic", show_default=True,
              help="int8: dynamic weight quantisation, or static QDQ calibrated on world images and captions.")
@click.option("--opset", type=click.IntRange(17), default=18, show_default=True, help="ONNX opset of the graphs.")
@click.option("--tensorrt", is_flag=True,
              help="Also build TensorRT engines (needs an NVIDIA GPU and TensorRT 10 or newer; fp32, fp16 or bf16 — "
                   "TensorRT cannot parse the int8 graphs).")
@click.option("--opt-batch", type=click.IntRange(1), default=8, show_default=True, help="TensorRT profile: preferred batch.")
@click.option("--max-batch", type=click.IntRange(1), default=256, show_default=True, help="TensorRT profile: max batch.")
@click.option("--max-tags", type=click.IntRange(1), default=1024, show_default=True,
              help="TensorRT profile: most tags in one tag-head call (the Triton tagger's --max-tags must not exceed "
                   "it; `ttd tag` runs larger vocabularies' tag head in torch).")
@click.option("--torch-weights/--no-torch-weights", default=True, show_default=True,
              help="Also write the fp32 weights (model.safetensors) for `--backend torch --export-dir` and the "
                   "Triton torch engine (GPU serving without TensorRT).")
def export_command(out_dir, model, pretrained, checkpoint, dense_mode, precision, int8_mode, opset, tensorrt,
                   opt_batch, max_batch, max_tags, torch_weights):
    """Export ONNX graphs (image encoder, text encoder, tag head) + manifest to OUT_DIR.

    Every export is checked against PyTorch in onnxruntime at batch sizes 1, 3 and 7 and on
    world image-caption pairs; the figures go into manifest.json, and an export that misses its
    gate fails with the figures.
    """
    from export.checks import GateError
    from export.pipeline import run_export
    from export.tensorrt import BatchLimits, TensorRTUnavailable
    from ttd.model.factory import ModelLoadError, load_model

    ttd_model = load_model(model, pretrained, checkpoint, dense_mode)
    manifest = run_export(ttd_model, out_dir, precision, int8_mode, opset, tensorrt=tensorrt,
                          tensorrt_limits=BatchLimits(opt_batch=opt_batch, max_batch=max_batch, max_tags=max_tags),
                          torch_weights=torch_weights)
    from ttd.runtime import unfitted_margin_notice

    notice = unfitted_margin_notice(ttd_model.config, model, pretrained, checkpoint)
    if notice:
        click.echo(f"warning: {notice}", err=True)
    figures = manifest.get("quality", manifest["parity"])
    click.echo(f"exported {precision} graphs to {out_dir}: min cosine "
               f"{min(figures['min_cosine'][k] for k in ('image_embeds', 'patch_embeds', 'text_embeds')):.6f}, "
               f"selected-tag agreement {figures['tag_agreement']:.1%}", err=True)


@main.command("bench")
@model_options
@click.option("--batch-sizes", default="1,8", show_default=True, help="Image batch sizes, comma separated.")
@click.option("--text-batch", type=click.IntRange(1), default=64, show_default=True, help="Texts per text-encoder call in the timings.")
@click.option("--tags", type=click.IntRange(1), default=1000, show_default=True,
              help="K for the tag-head and vocabulary-tagging timings.")
@click.option("--min-seconds", type=float, default=1.0, show_default=True, help="Per timing: repeat calls this long.")
@click.option("--check-count", type=click.IntRange(4), default=32, show_default=True,
              help="World image-caption pairs of each quality gate.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True, help="CPU threads (0: all cores).")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, robust on a shared machine).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the rows, CPU, versions and settings as JSON here.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table as Markdown here.")
def bench_command(model, pretrained, checkpoint, dense_mode, batch_sizes, text_batch, tags, min_seconds, check_count,
                  threads, clock, json_path, markdown_path):
    """Measure every backend x precision x batch size this machine can run: images/s, texts/s,
    tag-head cost, vocabulary tagging cost, each with its quality against torch fp32.

    Exports are made on the spot in a temporary folder, each through its quality gate (a refused
    one is listed with why). Takes minutes for the world model, longer for ViT-B/16.
    """
    from export.bench import BenchSettings, run_bench, to_markdown
    from ttd.model.factory import ModelLoadError, load_model

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        fail(f"--batch-sizes {batch_sizes!r}: give positive integers separated by commas, e.g. 1,8")
    settings = BenchSettings(sizes, text_batch, tags, min_seconds, check_count, threads, clock=clock)
    load_model(model, pretrained, checkpoint, dense_mode)
    result = run_bench(lambda: load_model(model, pretrained, checkpoint, dense_mode), settings,
                       progress=lambda line: click.echo(line, err=True))
    table = to_markdown(result)
    click.echo(table)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1))
    if markdown_path:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(table)


@main.group()
def triton() -> None:
    """Triton model repositories: build one from an export, validate it."""


def _batching_options(f):
    f = click.option("--kind", type=click.Choice(INSTANCE_KINDS), default=None,
                     help="instance_group kind of the graph models [default: KIND_GPU for TensorRT engines, "
                          "which run only on GPUs; KIND_CPU otherwise].")(f)
    f = click.option("--instances", type=click.IntRange(1), default=1, show_default=True, help="instance_group count.")(f)
    f = click.option("--queue-delay-us", type=click.IntRange(0), default=2000, show_default=True,
                     help="Dynamic batching: max queue delay.")(f)
    f = click.option("--preferred-batch-sizes", default="8,16", show_default=True, help="Comma list.")(f)
    f = click.option("--max-batch-size", type=click.IntRange(1), default=32, show_default=True,
                     help="max_batch_size of every model (kept consistent across them).")(f)
    return f


@triton.command("build")
@click.argument("export_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("repo", type=click.Path(file_okay=False, path_type=Path))
@click.option("--flavour", type=click.Choice(tuple(TRITON_ENGINES)), default="python", show_default=True,
              help="python: Python-backend models (any tritonserver, e.g. nvidia-pytriton's); "
                   "native: onnxruntime_onnx / tensorrt_plan platforms (NVIDIA's container); "
                   "fused: ttd_tagger alone, one Python-backend model running decode, encoder and tag head "
                   "in-process (any tritonserver; the fastest served path).")
@click.option("--graph-engine", "engine", type=click.Choice(sorted({e for engines in TRITON_ENGINES.values() for e in engines})),
              default="onnx", show_default=True,
              help="What the graph models run. python flavour: onnx (onnxruntime, CPU) or torch (the export's "
                   "weights; GPU with --kind KIND_GPU); native flavour: onnx or tensorrt (the export's engines); "
                   "fused flavour: the runtime backend it holds, onnx (onnxruntime, CPU), torch or tensorrt (GPU).")
@click.option("--torch-dtype", type=Precision(("fp32", "bf16", "fp16")), default="fp32",
              show_default=True, help="Torch engine: weight precision of the encoders (the tag head stays float32).")
@_batching_options
@click.option("--threshold", type=UNIT_INTERVAL, default=DEFAULT_THRESHOLD, show_default=True, help="δ used by ttd_tagger.")
@click.option("--max-tags", type=click.IntRange(1), default=1024, show_default=True, help="ttd_tagger: tags per request.")
@click.option("--score", "score_method", type=click.Choice(SCORE_METHODS), default=DEFAULT_SCORE_METHOD,
              show_default=True, help="Pixel-tag score served by ttd_tagger (see `ttd tag --help`).")
def triton_build(export_dir, repo, flavour, engine, torch_dtype, max_batch_size, preferred_batch_sizes, queue_delay_us,
                 instances, kind, threshold, max_tags, score_method):
    """Write a Triton model repository REPO for the export EXPORT_DIR, then validate it."""
    from export.triton import BatchingOptions, RepositoryError, build_repository, validate_repository
    from ttd.runtime.export_dir import ExportError

    sizes = tuple(int(s) for s in preferred_batch_sizes.split(",") if s.strip())
    options = BatchingOptions(max_batch_size, sizes, queue_delay_us, instances, kind)
    build_repository(export_dir, repo, flavour, engine, options, threshold, max_tags, torch_dtype,
                     score_method=score_method)
    summary = validate_repository(repo)
    click.echo("\n".join(summary))
    click.echo(f"wrote {repo}; serve it with `ttd serve {repo}`", err=True)


@triton.command("validate")
@click.argument("repo", type=click.Path(file_okay=False, exists=True, path_type=Path))
def triton_validate(repo):
    """Parse every config.pbtxt with tritonclient's model_config_pb2 and check it against its files and graphs."""
    from export.triton import RepositoryError, validate_repository

    summary = validate_repository(repo)
    click.echo("\n".join(summary))
    click.echo(f"{repo}: valid", err=True)


@main.command()
@click.argument("repo", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 exposes the server to the network.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="Port of the HTTP front (on --host).")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=None,
              help="Also serve gRPC on this port, on 127.0.0.1 only (gRPC has no front). Off by default.")
@click.option("--timeout", "timeout_s", type=float, default=120, show_default=True, help="Seconds to wait for readiness.")
@click.option("--max-restarts", type=click.IntRange(0), default=5, show_default=True,
              help="Restart tritonserver when it dies, at most this many times in 10 minutes.")
@click.option("--max-body-mb", type=click.FloatRange(0.001), default=64, show_default=True,
              help="Largest HTTP request body the front accepts (MiB); larger ones get 413 before they are read.")
@click.option("--max-connections", type=click.IntRange(1), default=1024, show_default=True,
              help="Open HTTP connections at most (lowered to fit the file-descriptor limit: half of `ulimit -n` "
                   "less 64). At the cap the longest idle connection is closed to make room; when all are in "
                   "requests, one more is answered 503 and closed.")
@click.option("--idle-timeout", "idle_timeout_s", type=click.FloatRange(0.1), default=15, show_default=True,
              help="Seconds a connection may take to send a complete request header, from opening or from its "
                   "previous answer (also the keep-alive idle time).")
@click.option("--body-timeout", "body_timeout_s", type=click.FloatRange(0.1), default=60, show_default=True,
              help="Seconds a request may take to send its body (408 after that).")
@click.option("--coalesce", "coalesce_in_flight", type=click.IntRange(0), default=0, show_default=True,
              help="Coalescing, for a model that takes several images a request (the fused tagger): at most this "
                   "many inference requests at tritonserver at once; one-image requests that arrive meanwhile go on "
                   "together as one request, each client still getting its own answer, byte for byte. 0: off, every "
                   "request forwarded as it came (on a CPU instance coalescing did not lower the cost: "
                   "docs/serving.md, Coalescing). Refused for a python or native repository (one image a request).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve Prometheus metrics (the front's requests, refusals, latency and restarts, and "
                   "tritonserver's own) at http://--metrics-host:PORT/metrics. Off by default; Triton's usual port "
                   "is 8002.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address the metrics port binds (loopback unless you expose it on purpose).")
def serve(repo, host, http_port, grpc_port, timeout_s, max_restarts, max_body_mb, max_connections, idle_timeout_s,
          body_timeout_s, coalesce_in_flight, metrics_port, metrics_host):
    """Serve a model repository with the tritonserver bundled by nvidia-pytriton, behind an HTTP
    front on --host:--http-port that refuses malformed requests (4xx with a JSON reason) and
    retries a request once when tritonserver dies under it; tritonserver itself listens on a
    loopback port. Ctrl-C or SIGTERM stops it; a crashed tritonserver is restarted. Slow clients
    are cut off (--idle-timeout, --body-timeout), connections are capped (--max-connections), and
    refusals are logged one line each, at most one line per kind every 10 s. The repository's
    files are checked against the hashes `ttd triton build` recorded before anything is served."""
    from ttd.serve.http_front import FrontError, FrontLimits
    from ttd.serve.service import serve_repository
    from ttd.errors import RuntimeProblem
    from ttd.serve.triton_server import ServerError

    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: binding {host} exposes the server to the network, without authentication", err=True)
    if metrics_port and metrics_host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: binding {metrics_host} exposes the metrics to the network", err=True)
    try:
        code = serve_repository(repo, host, http_port, grpc_port, timeout_s, max_restarts,
                                FrontLimits(max_body_bytes=int(max_body_mb * (1 << 20)), idle_timeout_s=idle_timeout_s,
                                            body_timeout_s=body_timeout_s, max_connections=max_connections,
                                            coalesce_in_flight=coalesce_in_flight),
                                lambda line: click.echo(line, err=True), metrics_port, metrics_host)
    except (ServerError, FrontError, RuntimeProblem) as error:
        fail(str(error))
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)
