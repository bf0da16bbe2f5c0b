"""`ttd tag --engine ray`: on a local 2-CPU Ray, the same records as the local engine, and
an actor that dies mid-job costs no item."""

import os
from pathlib import Path

import pytest

import ray

from jobs.test_stream_job import lines, same_records, world_job
from ttd.data.items import open_items
from ttd.jobs.ray_executor import RayJob, TaggerActor, run_ray_job
from ttd.runtime import load_tagger
from ttd.jobs.runner import JobOptions
from ttd.jobs.stream_job import CentreStep, tag_stream

ROOT = Path(__file__).resolve().parents[2]


class DiesOnItemFive(TaggerActor):
    """A Tagger actor whose process dies (once per marker file) when its batch holds item 5."""

    def __call__(self, batch):
        marker = Path(os.environ["TTD_TEST_DEATH_MARKER"])
        if 5 in batch.column("index").to_pylist() and not marker.exists():
            marker.write_text("died")
            os._exit(1)
        return super().__call__(batch)


@pytest.fixture()
def local_ray(tmp_path):
    marker = tmp_path / "actor-died"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
                                       "TTD_TEST_DEATH_MARKER": str(marker)}})
    try:
        yield marker
    finally:
        ray.shutdown()


def test_ray_engine_writes_the_records_of_the_local_engine_even_when_an_actor_dies(tmp_path, local_ray):
    captions = world_job(tmp_path, 14, bad_every=5)
    local = tmp_path / "local.jsonl"
    tagger = load_tagger("torch", model="world-tiny", device="cpu", threads=1)
    tag_stream(tagger, open_items(captions), local, batch_size=4, progress=False, decode_workers=0)
    out = tmp_path / "ray.jsonl"
    summary = run_ray_job(RayJob(captions=str(captions), images=[], output=out, actors=2,
                                 tagger_options={"backend": "torch", "model": "world-tiny", "device": "cpu"}),
                          CentreStep(), options=JobOptions(batch_size=4, progress=False), actor=DiesOnItemFive)
    assert local_ray.read_text() == "died"  # an actor died mid-job (Ray restarted it and retried its batch)
    assert (summary.items, sum(summary.errors.values())) == (14, 2)
    # order-independent comparison: the records sorted by their input position
    same_records(sorted(lines(out), key=lambda r: r["index"]), lines(local))
