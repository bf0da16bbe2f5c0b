"""`ttd tag --engine ray`: the same job on Ray Data, on a laptop (local Ray) or a Ray cluster.

Ray Data streams the items (one read task runs ttd.data.items, so nothing is indexed), a pool
of Tagger actors decodes and tags batches (one actor per GPU, or N on CPUs; Ray restarts an actor
that dies and retries its batch), and the driver writes the records in input order through the
exactly-once writer of the local engine. So the output, `--resume` and `--shard` behave exactly
as with `--engine local`: the records are the same (the Ray equality test holds this).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ttd.data.items import check_shard
from ttd.jobs.jsonl_output import error_kind
from ttd.jobs.outputs import open_output

@dataclass
class RayJob:
    captions: str | None
    images: list[str]
    output: Path
    vocabulary: list[str] | None = None
    batch_size: int = 32
    max_pixels: int = 89_478_485
    top_k: int = 10
    masks_dir: str | None = None
    tagger_options: dict = field(default_factory=dict)
    actors: int | None = None
    address: str | None = None
    shard: int = 0
    num_shards: int = 1
    resume: bool = False
    progress: bool = True
    num_cpus: int | None = None  # a local Ray's CPUs (default: all)
    rle_masks: bool = False  # records hold the selected tags' masks as COCO RLE
    output_format: str = "auto"  # jsonl, parquet, or auto (parquet for a name ending in .parquet)
    rows_per_file: int = 10_000  # Parquet: records per shard file


def _item_blocks(captions: str | None, images: list[str], shard: int, num_shards: int, skip: int, rows_per_block: int):
    """Blocks (pyarrow tables) of the job's items with their positions, streamed; a block per batch,
    so that every batch can go to another actor."""
    import pyarrow as pa

    from ttd.data.items import open_items, select_shard

    rows = []
    for position, item in select_shard(open_items(captions, images), shard, num_shards, skip):
        rows.append({"index": position, "image": item.image, "path": str(item.path), "caption": item.caption,
                     "error": item.error, "data": getattr(item, "data", None)})
        if len(rows) == rows_per_block:
            yield pa.Table.from_pylist(rows)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows)


def _items_of(rows: list[dict]) -> list:
    from ttd.data.inputs import Item
    from ttd.data.items import ShardItem

    items = []
    for row in rows:
        args = (row["image"], Path(row["path"]), row["caption"], row["error"])
        items.append(ShardItem(*args, data=row["data"]) if row["data"] is not None else Item(*args))
    return items


class TaggerActor:
    """One Tagger per actor: decodes and tags the batches Ray Data hands it."""

    def __init__(self, tagger_options: dict, vocabulary: list[str] | None, max_pixels: int, top_k: int,
                 masks_dir: str | None, rle_masks: bool = False) -> None:
        from ttd.runtime import load_tagger

        self.tagger = load_tagger(**tagger_options)
        self.vocabulary, self.max_pixels, self.top_k = vocabulary, max_pixels, top_k
        self.masks_dir, self.rle_masks = (Path(masks_dir) if masks_dir else None), rle_masks
        self.vocabulary_embeds = self.tagger.encode_tags(vocabulary) if vocabulary else None

    def __call__(self, batch):
        import pyarrow as pa

        from ttd.jobs.stream_job import tag_batch
        from ttd.jobs.tag_job import prepare_items

        rows = batch.to_pylist()  # pyarrow keeps None as None (numpy would make it NaN)
        items = _items_of(rows)
        outcomes = prepare_items(items, self.vocabulary is not None,
                                 dataclasses.replace(self.tagger.preprocess, max_pixels=self.max_pixels))
        positioned = [(row["index"], item) for row, item in zip(rows, items)]
        records = tag_batch(self.tagger, positioned, outcomes, self.vocabulary, self.vocabulary_embeds,
                            self.masks_dir, self.top_k, self.rle_masks)
        return pa.table({"index": [r["index"] for r in records], "record": [json.dumps(r) for r in records]})


def _default_actors(resources: dict) -> int:
    gpus = int(resources.get("GPU", 0))
    return gpus if gpus else max(1, int(resources.get("CPU", 1)) // 2)


def run_ray_job(job: RayJob, description: dict | None = None, actor: type = TaggerActor):
    """Run `job` on Ray Data (starting a local Ray unless one is running or `job.address` names a
    cluster) and return the local engine's JobSummary. `actor`: the actor class (TaggerActor or a
    subclass of it)."""
    try:
        import ray
    except ImportError:
        raise ValueError("--engine ray needs Ray Data: pip install 'ttd-toolkit[ray]'") from None
    from ray.data import ActorPoolStrategy
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask
    from tqdm import tqdm

    from ttd.jobs.stream_job import JobSummary

    description = {**(description or {}), "engine": "ray", "shard": job.shard, "num_shards": job.num_shards,
                   "vocabulary": job.vocabulary, "masks_dir": job.masks_dir, "max_pixels": job.max_pixels,
                   "top_k": job.top_k, "tagger": job.tagger_options, **({"rle_masks": True} if job.rle_masks else {})}
    check_shard(job.shard, job.num_shards)
    if job.rle_masks:
        from ttd.jobs.coco import check_available

        check_available()  # the install hint now, not from every actor
    writer = open_output(job.output, description, job.resume, job.output_format, job.rows_per_file)
    summary = JobSummary(Path(job.output), writer.done.lines, writer.done.lines, Counter(writer.done.errors))
    if writer.complete:
        summary.already_complete = True
        return summary

    class ItemDatasource(Datasource):
        """The job's item stream as one read task (ttd.data.items reads lazily)."""

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            args = (job.captions, job.images, job.shard, job.num_shards, writer.done.lines, job.batch_size)
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(lambda: _item_blocks(*args), meta)]

    started = time.perf_counter()
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=job.address, num_cpus=None if job.address else job.num_cpus, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    try:
        started = time.perf_counter()  # the job's time: actors starting included, Ray's own start not
        actors = job.actors or _default_actors(ray.cluster_resources())
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= actors else 0
        options = dict(job.tagger_options)
        if not options.get("threads") and not gpus:  # an actor's torch/onnxruntime threads: its share of the CPUs
            options["threads"] = max(1, int(ray.cluster_resources().get("CPU", 1)) // actors)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # records reach the writer in input order
        # the read is light (lines or tar bytes): it must not wait for a CPU that the actors hold
        no_cpu = ({"num_cpus": 0} if "num_cpus" in inspect.signature(ray.data.read_datasource).parameters
                  else {"ray_remote_args": {"num_cpus": 0}})  # Ray < 2.5x knows only ray_remote_args
        dataset = ray.data.read_datasource(ItemDatasource(), override_num_blocks=1, **no_cpu)
        tagged = dataset.map_batches(
            actor, batch_size=job.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs=dict(tagger_options=options, vocabulary=job.vocabulary, max_pixels=job.max_pixels,
                                       top_k=job.top_k, masks_dir=job.masks_dir, rle_masks=job.rle_masks),
            compute=ActorPoolStrategy(size=actors), num_gpus=gpus, num_cpus=0 if gpus else options["threads"],
            max_restarts=3, max_task_retries=3)
        with tqdm(initial=summary.resumed, disable=not job.progress, unit="img", smoothing=0.1) as bar:
            for batch in tagged.iter_batches(batch_size=None, batch_format="pyarrow"):
                records = [json.loads(r) for r in batch.column("record").to_pylist()]
                writer.write(records)
                summary.items += len(records)
                summary.errors.update(error_kind(str(r["error"])) for r in records if "error" in r)
                bar.update(len(records))
        writer.finish()
    finally:
        writer.close()
        summary.seconds = time.perf_counter() - started
        if started_ray:
            ray.shutdown()
    return summary
