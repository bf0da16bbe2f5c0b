"""`ttd tag --engine ray` (issue 12): on a local 2-CPU Ray, the same records as the local engine."""

import os
from pathlib import Path

import ray

from test_stream_job import lines, same_records, world_job
from ttd.item_stream import open_items
from ttd.ray_engine import RayJob, run_ray_job
from ttd.runtime import load_tagger
from ttd.stream_job import tag_stream

ROOT = Path(__file__).resolve().parents[1]


def test_ray_engine_writes_the_records_of_the_local_engine(tmp_path):
    captions = world_job(tmp_path, 14, bad_every=5)
    local = tmp_path / "local.jsonl"
    tagger = load_tagger("torch", model="world-tiny", device="cpu", threads=1)
    tag_stream(tagger, open_items(captions), local, batch_size=4, progress=False, decode_workers=0)
    out = tmp_path / "ray.jsonl"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    try:
        summary = run_ray_job(RayJob(captions=str(captions), images=[], output=out, batch_size=4, actors=2,
                                     tagger_options={"backend": "torch", "model": "world-tiny", "device": "cpu"},
                                     progress=False))
    finally:
        ray.shutdown()
    assert (summary.items, sum(summary.errors.values())) == (14, 2)
    # order-independent comparison: the records sorted by their input position
    same_records(sorted(lines(out), key=lambda r: r["index"]), lines(local))
