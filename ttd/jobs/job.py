"""A batch job as one object, and the one call that runs it: what `ttd tag` and `ttd segment`
build from their options, and what a Python caller (a notebook, an Airflow or Ray task) builds
itself. Every mode runs on the one job runner (ttd/jobs/runner.py): exactly-once output,
`resume`, `shard`, and the Ray executor.

>>> summary = ttd.run(ttd.Job(output=tmp / "tags.jsonl", captions="examples/world/annotations.jsonl",
...                           progress=False))
>>> summary.items, sum(summary.errors.values())
(8, 0)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttd.errors import TTDError
from ttd.jobs.runner import JobSummary
from ttd.model.config import DEFAULT_MASK_THRESHOLD
from ttd.runtime.images import DEFAULT_MAX_PIXELS


class JobError(TTDError, ValueError):
    """A job that cannot run as described (conflicting or missing inputs, an option its mode cannot honour)."""


@dataclass
class Job:
    """What to run: the items (`captions`, or `images` with a `vocabulary` or `classes`), the mode,
    the model (`settings`: `ttd.load`'s keyword arguments), the outputs and how to run it. An
    option left at None takes its mode's default; one the mode cannot honour is refused."""

    output: Path | str
    captions: Path | str | None = None  # JSONL/CSV of image + caption, or webdataset shards
    images: Sequence[Path | str] = ()  # files, folders or globs (with a vocabulary or classes)
    vocabulary: Path | str | Sequence[str] | None = None  # tag the images against these tags (a file or a list)
    classes: Sequence[str] | None = None  # segment the images into these classes
    segment: bool = False  # `ttd segment` records (masks as RLE segments) instead of `ttd tag`'s
    crop: str | None = None  # center (tag's default) or whole (segment's default)
    settings: dict[str, Any] = field(default_factory=dict)  # ttd.load's: checkpoint, backend, threshold, ...
    masks_dir: Path | str | None = None
    rle_masks: bool = False
    top_k: int | None = None  # vocabulary mode: best tags listed per image (default 10)
    coco: Path | str | None = None  # segment: also COCO JSON here
    templates: Path | str | None = None  # prompt templates file (segment)
    scales: Sequence[float] = (1.0,)
    stride: int | None = None
    pamr: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_size: int | str | None = None  # "auto": by device
    decode_workers: int | None = None
    resume: bool = False
    shard: int = 0
    num_shards: int = 1
    output_format: str = "auto"
    rows_per_file: int | None = None  # Parquet: records per file (default 10,000)
    decode: str = "host"  # or "device": JPEGs decoded on the GPU behind the agreement gate (ttd/options.py DECODE)
    engine: str = "local"  # or "ray"
    ray_address: str | None = None
    actors: int | None = None
    vocab_cache: Path | str | None = None
    use_vocab_cache: bool = True
    progress: bool = True

    @property
    def mode_crop(self) -> str:
        return self.crop or ("whole" if self.segment else "center")

    def check(self) -> None:
        """JobError naming the first thing that makes this job impossible, before any work."""
        from ttd.api import load
        from ttd.jobs.jsonl_output import output_format_of

        known = set(inspect.signature(load).parameters)
        unknown = sorted(set(self.settings) - known)
        if unknown:
            raise JobError(f"unknown settings {', '.join(unknown)}; ttd.load takes {', '.join(sorted(known))}")
        other = self.classes if self.segment else self.vocabulary
        other_name = "--classes NAMES" if self.segment else "--vocabulary FILE"
        if (self.captions is None) == (other is None):
            raise JobError(f"give exactly one of --captions FILE or {other_name}")
        if other is not None and not self.images:
            raise JobError(f"{other_name.split()[0]} needs image files or folders as arguments")
        if self.captions is not None and self.images:
            raise JobError("with --captions, images come from the captions file; do not also pass image arguments")
        if self.segment and self.vocabulary is not None:
            raise JobError("a segmentation job takes --classes, not a vocabulary")
        if self.mode_crop not in ("center", "whole"):
            raise JobError(f"crop {self.crop!r}: choose center or whole")
        try:
            parquet = output_format_of(Path(self.output), self.output_format) == "parquet"
        except ValueError as error:
            raise JobError(str(error)) from None
        if self.segment:
            if self.rle_masks:
                raise JobError("--rle-masks: ttd segment's records hold every mask as COCO RLE already "
                               "(\"segments\"); leave it out")
            if parquet:
                raise JobError(f"{'--format parquet' if self.output_format == 'parquet' else self.output}: "
                               "segmentation records hold masks as RLE segments and are written as JSON lines "
                               "(Parquet output is for `ttd tag --crop center`)")
        if self.vocabulary is None and self.top_k is not None:
            raise JobError("--top-k lists a vocabulary's best tags; with --captions every candidate is in the "
                           "record: leave it out")
        if not parquet and self.rows_per_file is not None:
            raise JobError("--rows-per-file sizes Parquet shard files; this output is JSON lines "
                           "(use --format parquet)")
        cache_given = [n for n, given in (("--vocab-cache", self.vocab_cache is not None),
                                          ("--no-vocab-cache", not self.use_vocab_cache)) if given]
        if cache_given and (self.vocabulary is None or self.engine == "ray"):
            raise JobError(f"{', '.join(cache_given)} apply to --vocabulary with --engine local (Ray actors encode "
                           "the vocabulary themselves); leave them out")
        backend = self.settings.get("backend", "torch")
        if self.settings.get("compile") and backend not in ("torch", "auto"):
            raise JobError(f"--compile compiles the torch backend's encoder; --backend {backend} runs its own "
                           "graphs: leave it out")
        if not self.segment and self.mode_crop == "whole":
            if self.vocabulary is not None:
                raise JobError("--crop whole tags with --captions; for a vocabulary over whole images use "
                               "`ttd segment --classes FILE IMAGES...`")
            if self.rle_masks or parquet:
                raise JobError("--crop whole writes JSON lines with the masks as RLE already (\"segments\"); "
                               "--rle-masks and Parquet output are for --crop center")
        if self.engine not in ("local", "ray"):
            raise JobError(f"engine {self.engine!r}: choose local or ray")
        if self.decode != "host":
            decode_device(self)
        if self.engine == "ray":
            if "auto" in (backend, self.settings.get("dtype")):
                raise JobError("--engine ray needs an explicit --backend and --dtype: auto would choose for this "
                               "machine, not for the Ray workers")
            if self.decode_workers is not None:
                raise JobError("--decode-workers applies to --engine local (Ray actors decode their own batches); "
                               "leave it out")
        elif self.ray_address is not None or self.actors is not None:
            given = [n for n, v in (("--ray-address", self.ray_address), ("--actors", self.actors)) if v is not None]
            raise JobError(f"{', '.join(given)} apply to --engine ray; leave them out")
        if not self.scales or min(self.scales) <= 0:
            raise JobError(f"scales {tuple(self.scales)!r}: give positive numbers, e.g. 1,1.5")


def _vocabulary_of(job: Job) -> list[str] | None:
    from ttd.data.inputs import read_vocabulary

    if job.vocabulary is None:
        return None
    if isinstance(job.vocabulary, (str, Path)):
        return read_vocabulary(Path(job.vocabulary))
    tags = [t.strip().lower() for t in job.vocabulary if t.strip()]
    if not tags:
        raise JobError("the vocabulary holds no tags")
    return list(dict.fromkeys(tags))


def _templates_of(job: Job) -> tuple[str, ...] | None:
    from ttd.segment.segmentation import read_templates

    return read_templates(Path(job.templates).read_text(encoding="utf-8")) if job.templates else None


def _batch_size(job: Job) -> int:
    """Images per batch: 32 centre crops, or 8 whole images (held in memory at full size); "auto": by device."""
    from ttd.options import resolved_batch_size

    whole = job.segment or job.mode_crop == "whole"
    return resolved_batch_size(job.batch_size, job.settings.get("device"), "whole" if whole else "center",
                               8 if whole else 32)


def decode_device(job: Job) -> str:
    """The CUDA device `--decode device` decodes JPEGs on, or the JobError that says why this job
    cannot (docs/gpu.md, "GPU decoding"): nvJPEG needs a CUDA GPU, the torch backend (the batch
    stays on its device) and torchvision; whole images are decoded at full size by PIL."""
    from ttd.options import DECODE_PLACES

    if job.decode not in DECODE_PLACES:
        raise JobError(f"decode {job.decode!r}: choose {' or '.join(DECODE_PLACES)}")
    if job.segment or job.mode_crop == "whole":
        raise JobError("--decode device decodes the centre crop `ttd tag` feeds the model; whole images are decoded "
                       "at their own size by PIL: leave it out")
    if job.engine == "ray":
        raise JobError("--decode device runs with --engine local (Ray actors decode their own batches)")
    backend = job.settings.get("backend", "torch")
    if backend != "torch":
        raise JobError(f"--decode device hands the decoded batch to the torch backend on the GPU; --backend {backend} "
                       "takes host arrays: use --backend torch or leave --decode out")
    device = str(job.settings.get("device") or "auto")
    import torch

    if not device.startswith(("cuda", "auto")):
        raise JobError(f"--decode device decodes JPEGs with nvJPEG on a CUDA GPU, not on --device {device}: "
                       "use --device cuda, or leave --decode out (PIL on the CPU)")
    if not torch.cuda.is_available():
        raise JobError("--decode device decodes JPEGs with nvJPEG on a CUDA GPU, and this machine has none "
                       "(torch sees no CUDA device): leave --decode out (PIL on the CPU)")
    if importlib.util.find_spec("torchvision") is None:
        raise JobError("--decode device needs torchvision (its decode_jpeg runs nvJPEG): pip install torchvision, "
                       "or leave --decode out")
    return "cuda" if device == "auto" else device


def _step(job: Job, vocabulary: list[str] | None, say: Callable[[str], None] | None = None) -> Any:
    """The runner's step for the job's mode."""
    from ttd.jobs.segment_job import WholeImageStep
    from ttd.jobs.stream_job import CentreStep
    from ttd.segment.segmentation import SegmentOptions

    masks_dir = Path(job.masks_dir) if job.masks_dir is not None else None
    if job.segment or job.mode_crop == "whole":
        segment_options = SegmentOptions(batch_size=_batch_size(job))  # `ttd tag --crop whole`: the default windows
        if job.segment:
            segment_options = SegmentOptions(crop=job.mode_crop, scales=tuple(float(s) for s in job.scales),
                                             stride=job.stride, pamr=job.pamr, batch_size=_batch_size(job),
                                             mask_threshold=job.settings.get("mask_threshold", DEFAULT_MASK_THRESHOLD))
        return WholeImageStep(list(job.classes) if job.classes is not None else None, segment_options, masks_dir,
                              job.max_pixels)
    decoding = None
    if job.decode == "device":
        from ttd.jobs.device_decoding import DeviceDecoding

        decoding = DeviceDecoding(decode_device(job), say)
    return CentreStep(vocabulary, masks_dir, job.top_k or 10, job.rle_masks, job.max_pixels, decoding=decoding)


def _description(job: Job, templates: tuple[str, ...] | None) -> dict[str, Any]:
    """What makes the job's records, for `resume` to compare (keys as older outputs wrote them)."""
    from ttd.api import load
    from ttd.jobs.stream_job import tag_job_description

    s = {**{name: p.default for name, p in inspect.signature(load).parameters.items()}, **job.settings}
    description = tag_job_description(job.captions, [Path(i) for i in job.images], s["backend"], s["model"],
                                      s["pretrained"], s["checkpoint"], s["export_dir"], s["dense_mode"],
                                      s["dtype"], s["threshold"], s["score_method"],
                                      s["flip_tta"])
    if job.segment:
        description["templates"] = str(Path(job.templates)) if job.templates else "None"
    return description


def run(job: Job, log: Callable[[str], None] | None = None) -> JobSummary:
    """Run `job`; `log` receives the lines a user should see (what backend="auto" picked, a vocabulary
    cache hit, an int8 export's re-check on this CPU). The library prints nothing itself."""
    from ttd.data.items import open_items
    from ttd.jobs.runner import JobOptions, refuse_input_as_output, run_job

    job.check()
    say = log or (lambda line: None)
    vocabulary = _vocabulary_of(job)
    templates = _templates_of(job)
    step = _step(job, vocabulary, say)
    description = _description(job, templates)
    options = JobOptions(_batch_size(job), job.decode_workers, resume=job.resume, shard=job.shard,
                         num_shards=job.num_shards, output_format="jsonl" if job.segment else job.output_format,
                         rows_per_file=job.rows_per_file or 10_000, progress=job.progress)
    output = Path(job.output)
    captions = Path(job.captions) if job.captions is not None else None
    images = tuple(Path(i) for i in job.images)
    inputs = [Path(p) for p in (job.captions, job.vocabulary if isinstance(job.vocabulary, (str, Path)) else None)
              if p is not None]
    if job.coco is not None:
        refuse_input_as_output(Path(job.coco), [], inputs)
    if job.engine == "ray":
        from ttd.jobs.ray_executor import RayJob, run_ray_job

        ray_job = RayJob(None if captions is None else str(captions), [str(i) for i in images], output,
                         dict(job.settings), job.actors, job.ray_address, templates=templates)
        summary: JobSummary = run_ray_job(ray_job, step, description, options)
    else:
        tagger = _load(job, say)
        if templates is not None:
            from ttd.segment.segmentation import with_templates

            tagger = with_templates(tagger, templates)
        if vocabulary and job.use_vocab_cache:
            step = _with_cached_vocabulary(step, tagger, job, say)
        summary = run_job(tagger, step, open_items(captions, images), output, description, options, inputs, images)
    if job.coco is not None:
        from ttd.jobs.segment_job import write_coco_of

        write_coco_of(output, Path(job.coco))
    return summary


def _load(job: Job, say: Callable[[str], None]) -> Any:
    """The runtime Tagger of the job's settings; an int8 export's CPU re-check goes to `say`."""
    from ttd.api import load
    from ttd.runtime.portability import PortabilityNotice

    with warnings.catch_warnings(record=True) as notices:
        warnings.simplefilter("always", PortabilityNotice)
        tagger = load(**job.settings)
    if tagger.auto_choice is not None:
        say(tagger.auto_choice.line())
    for notice in notices:
        if issubclass(notice.category, PortabilityNotice):
            say(str(notice.message))
        else:
            warnings.warn_explicit(notice.message, notice.category, notice.filename, notice.lineno)
    return tagger.runtime


def _with_cached_vocabulary(step: Any, tagger: Any, job: Job, say: Callable[[str], None]) -> Any:
    """The centre step with its vocabulary's embeddings from the cache (encoded and stored on a miss)."""
    from ttd.runtime.vocab_cache import load_or_encode, model_key_for

    key = model_key_for(tagger, job.settings.get("export_dir"))
    if not key:
        return step
    cache_dir = Path(job.vocab_cache) if job.vocab_cache is not None else None
    cached = load_or_encode(tagger, step.vocabulary, key, cache_dir, progress=job.progress)
    say(f"vocabulary cache {'hit' if cached.hit else 'miss (stored)'}: {cached.path}")
    return dataclasses.replace(step, vocabulary_embeds=cached.embeds)
