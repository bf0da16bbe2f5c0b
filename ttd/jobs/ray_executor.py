"""`--engine ray`: the job runner's second executor, on Ray Data, on a laptop (local Ray) or a Ray cluster.

Ray Data streams the items (one read task runs ttd.data.items, so nothing is indexed), a pool
of Tagger actors runs the job's step (ttd/jobs/runner.py: decoding, the model, the records) on
batches (one actor per GPU, or N on CPUs; Ray restarts an actor that dies and retries its batch),
and the driver writes the records in input order through the exactly-once writer of the local
engine. So every mode, the output, `--resume` and `--shard` behave exactly as with `--engine
local`: the records are the same (the Ray equality tests hold this).
"""

from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ttd.errors import InputError
from ttd.jobs.runner import JobOptions, Step, open_job_output, refuse_input_as_output, refuse_no_items


@dataclass
class RayJob:
    """Where the job's items come from and how Ray runs it (what it does is the step's)."""

    captions: str | None
    images: list[str]
    output: Path
    tagger_options: dict = field(default_factory=dict)  # ttd.load's keyword arguments, in every actor
    actors: int | None = None
    address: str | None = None
    num_cpus: int | None = None  # a local Ray's CPUs (default: all)
    templates: tuple[str, ...] | None = None  # prompt templates other than the model's (ttd segment --templates)


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
    """One Tagger per actor, running the job's step on the batches Ray Data hands it."""

    def __init__(self, tagger_options: dict, step: Step, templates: tuple[str, ...] | None = None) -> None:
        from ttd.api import load
        from ttd.segment.segmentation import with_templates

        self.tagger = with_templates(load(**tagger_options).runtime, templates)
        self.step = step.bound(self.tagger, False)
        self.decode = self.step.decoder(self.tagger)

    def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pylist()  # pyarrow keeps None as None (numpy would make it NaN)
        items = _items_of(rows)
        positioned = [(row["index"], item) for row, item in zip(rows, items)]
        records = self.step.records(self.tagger, self.step.run(self.tagger, positioned, self.decode(items)))
        return pa.table({"index": [r["index"] for r in records], "record": [json.dumps(r) for r in records]})


def _default_actors(resources: dict) -> int:
    gpus = int(resources.get("GPU", 0))
    return gpus if gpus else max(1, int(resources.get("CPU", 1)) // 2)


def run_ray_job(job: RayJob, step: Step, description: dict | None = None, options: JobOptions = JobOptions(),
                actor: type = TaggerActor):
    """Run `step` over the job's items on Ray Data (starting a local Ray unless one is running or
    `job.address` names a cluster) and return the local engine's JobSummary. `actor`: the actor
    class (TaggerActor or a subclass of it)."""
    try:
        import ray
    except ImportError:
        raise InputError("--engine ray needs Ray Data: pip install 'ttd-toolkit[ray]'") from None
    from ray.data import ActorPoolStrategy
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask
    from tqdm import tqdm

    description = {**(description or {}), "engine": "ray", "shard": options.shard, "num_shards": options.num_shards,
                   **step.description(), "tagger": job.tagger_options}
    if getattr(step, "rle_masks", False):
        from ttd.jobs.coco import check_available

        check_available()  # the install hint now, not from every actor
    refuse_input_as_output(Path(job.output), [], [Path(job.captions)] if job.captions else [])
    writer, summary = open_job_output(job.output, description, options)
    if summary.already_complete:
        writer.close()
        return summary

    class ItemDatasource(Datasource):
        """The job's item stream as one read task (ttd.data.items reads lazily)."""

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            args = (job.captions, job.images, options.shard, options.num_shards, writer.done.lines, options.batch_size)
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
        tagger_options = dict(job.tagger_options)
        if not tagger_options.get("threads") and not gpus:  # an actor's torch/onnxruntime threads: its share of the CPUs
            tagger_options["threads"] = max(1, int(ray.cluster_resources().get("CPU", 1)) // actors)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # records reach the writer in input order
        # the read is light (lines or tar bytes): it must not wait for a CPU that the actors hold
        no_cpu = ({"num_cpus": 0} if "num_cpus" in inspect.signature(ray.data.read_datasource).parameters
                  else {"ray_remote_args": {"num_cpus": 0}})  # Ray < 2.5x knows only ray_remote_args
        dataset = ray.data.read_datasource(ItemDatasource(), override_num_blocks=1, **no_cpu)
        tagged = dataset.map_batches(
            actor, batch_size=options.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs=dict(tagger_options=tagger_options, step=step, templates=job.templates),
            compute=ActorPoolStrategy(size=actors), num_gpus=gpus, num_cpus=0 if gpus else tagger_options["threads"],
            max_restarts=3, max_task_retries=3)
        with tqdm(initial=summary.resumed, disable=not options.progress, unit="img", smoothing=0.1) as bar:
            for batch in tagged.iter_batches(batch_size=None, batch_format="pyarrow"):
                records = [json.loads(r) for r in batch.column("record").to_pylist()]
                writer.write(records)
                summary.add(records)
                bar.update(len(records))
        refuse_no_items(summary.items, Path(job.output))
        writer.finish()
    finally:
        writer.close()
        summary.seconds = time.perf_counter() - started
        if started_ray:
            ray.shutdown()
    return summary
