"""What a job refuses rather than lose or mix records (docs/reliability.md, "One job per output"
and "What --resume checks"): links planted beside its output, and a resume over inputs or a
model that changed since the job began."""

import json
import os
import shutil
from pathlib import Path

from click.testing import CliRunner

from jobs.test_stream_job import world_job
from ttd.cli import main
from ttd.jobs.jsonl_output import finished_job_path, job_path, partial_path
from ttd.jobs.output_lock import lock_path

MODEL = ["--model", "world-tiny", "--device", "cpu", "--quiet"]


def tag(*args):
    return CliRunner().invoke(main, ["tag", *MODEL, *map(str, args)], catch_exceptions=False)


def killed_after(output: Path, keep: int) -> None:
    """What a SIGKILL after `keep` records leaves of a finished JSON-lines output."""
    lines = output.read_text().splitlines(keepends=True)
    partial_path(output).write_text("".join(lines[:keep]))
    shutil.move(finished_job_path(output), job_path(output))
    output.unlink()


def test_links_and_fifos_planted_beside_the_output_are_never_written_through(tmp_path):
    captions = world_job(tmp_path, 2)
    output = tmp_path / "tags.jsonl"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock_path(output).symlink_to(victim)
    result = tag("--captions", captions, "-o", output)
    # before: the job truncated victim.txt and wrote its holder line into it
    assert result.exit_code == 2 and victim.read_text() == "precious"
    assert result.output.strip().splitlines()[-1] == (f"error: {lock_path(output)} is a symbolic link; a job never "
                                                      "writes through one beside its output: remove it (or choose "
                                                      "another output)")
    lock_path(output).unlink()
    partial_path(output).symlink_to(victim)  # a fresh job removes the link, never truncates its target
    assert tag("--captions", captions, "-o", output).exit_code == 0
    assert victim.read_text() == "precious" and len(output.read_text().splitlines()) == 2
    lock_path(output).unlink()  # the finished job leaves its (plain) lock file
    os.mkfifo(lock_path(output))  # was "Invalid argument" naming no path
    result = tag("--captions", captions, "-o", output)
    assert result.exit_code == 2 and f"error: {lock_path(output)} is not a plain file (a FIFO" in result.output


def test_resume_refuses_a_captions_file_changed_past_its_first_mib(tmp_path):
    """The fingerprint covered the size and the first MiB: a processed line deleted past it and
    another padded to the same size was accepted (one item tagged twice, another never)."""
    captions = world_job(tmp_path, 14)
    rows = [json.loads(line) for line in captions.read_text().splitlines()]
    for row in rows:
        row["note"] = "x" * 90_000  # 14 lines of ~90 kB: lines 12 and 13 lie past the first MiB
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "tags.jsonl"
    assert tag("--captions", captions, "-o", output).exit_code == 0
    killed_after(output, 13)
    size = captions.stat().st_size
    lines = captions.read_text().splitlines(keepends=True)
    rows[13]["note"] += "x" * len(lines[12])  # processed line 12 deleted, line 13 padded by its length
    captions.write_text("".join(lines[:12]) + json.dumps(rows[13]) + "\n")
    assert captions.stat().st_size == size and captions.read_bytes()[: 1 << 20] == "".join(lines).encode()[: 1 << 20]
    result = tag("--captions", captions, "-o", output, "--resume")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: {partial_path(output)}: the captions file {captions.resolve()} changed since the job began (size "
        f"{size} -> {size} bytes, other contents); restore it, or run without --resume to start over")


def test_resume_refuses_a_folder_that_changed(tmp_path):
    world_job(tmp_path, 6)
    (tmp_path / "captions.jsonl").unlink()
    images = tmp_path / "photos"
    images.mkdir()
    for path in sorted(tmp_path.glob("img*.png")):
        path.rename(images / path.name)
    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("red\nsquare\ncircle\n")
    output = tmp_path / "tags.jsonl"
    assert tag(images, "--vocabulary", vocabulary, "-o", output).exit_code == 0
    killed_after(output, 3)
    shutil.copy(images / "img0.png", images / "img00.png")  # sorts between img0 and img1: tagged twice, another never
    result = tag(images, "--vocabulary", vocabulary, "-o", output, "--resume")
    assert result.exit_code == 2, result.output
    assert f"{images} changed since the job began (6 -> 7 files" in result.output
    (images / "img00.png").unlink()
    original = (images / "img4.png").read_bytes()
    (images / "img4.png").write_bytes((images / "img5.png").read_bytes())  # same count, a file replaced
    result = tag(images, "--vocabulary", vocabulary, "-o", output, "--resume")
    assert result.exit_code == 2 and f"{images} changed since the job began (6 -> 6 files, " in result.output
    (images / "img4.png").write_bytes(original)
    os.utime(images / "img5.png", ns=(10**18, 10**18))  # same files and sizes, one modified in place
    result = tag(images, "--vocabulary", vocabulary, "-o", output, "--resume")
    assert result.exit_code == 2 and "bytes, files replaced or touched)" in result.output


def write_shard(path, samples):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, (image, caption) in samples.items():
            for ext, data in (("png", image), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_resume_refuses_a_shard_that_changed(tmp_path):
    import io

    from PIL import Image

    from ttd.data.world import make_sample

    def sample(i):
        buffer = io.BytesIO()
        s = make_sample(4, i)
        Image.fromarray(s.image).save(buffer, "PNG")
        return buffer.getvalue(), s.caption

    write_shard(tmp_path / "000.tar", {f"{i:04d}": sample(i) for i in range(4)})
    write_shard(tmp_path / "001.tar", {f"{i:04d}": sample(i) for i in range(4, 8)})
    pattern = str(tmp_path / "{000..001}.tar")
    output = tmp_path / "tags.jsonl"
    assert tag("--captions", pattern, "-o", output).exit_code == 0
    killed_after(output, 3)
    write_shard(tmp_path / "000.tar", {f"{i:04d}": sample(i) for i in (0, 2, 3, 9)})  # one removed, one added
    result = tag("--captions", pattern, "-o", output, "--resume")
    assert result.exit_code == 2, result.output
    assert f"the shard {tmp_path / '000.tar'} changed since the job began" in result.output


def test_resume_refuses_another_model(tmp_path):
    """Kill, `ttd calibrate` the checkpoint, --resume: was accepted, the first records with one
    margin, the rest with another."""
    from ttd.evaluation.calibrate import calibrate_checkpoint
    from ttd.model.factory import load_model, save_checkpoint

    checkpoint = save_checkpoint(load_model(), tmp_path / "ck" / "model.safetensors")
    captions = world_job(tmp_path, 4)
    output = tmp_path / "tags.jsonl"
    command = ["tag", "--captions", str(captions), "-o", str(output), "--checkpoint", str(checkpoint),
               "--device", "cpu", "--quiet"]
    assert CliRunner().invoke(main, command).exit_code == 0
    killed_after(output, 2)
    calibrate_checkpoint(checkpoint, 9.5, {"method": "labelled"})
    result = CliRunner().invoke(main, command + ["--resume"])
    assert result.exit_code == 2, result.output
    assert (f"the model changed since the job began ({checkpoint.with_suffix('.json').resolve()} is not the file it "
            "was): its records would mix two models") in result.output


def test_an_output_that_names_a_folder_is_one_line(tmp_path):
    captions = world_job(tmp_path, 1)
    for output in (".", "/"):
        result = tag("--captions", captions, "-o", output)
        # was: "PosixPath('.') has an empty name"
        assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == (
            f"error: -o {output} names a folder, not an output file: give a file name (or, for Parquet shards, a "
            "new folder name ending in .parquet)")


def test_a_symlinked_output_is_written_through(tmp_path):
    captions = world_job(tmp_path, 2)
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "tags.jsonl"
    target.write_text("old\n")
    link = tmp_path / "tags.jsonl"
    link.symlink_to(target)
    assert tag("--captions", captions, "-o", link).exit_code == 0
    # was: the link replaced by a plain file, its target left with the old records
    assert link.is_symlink() and len(target.read_text().splitlines()) == 2


def test_a_symlinked_config_is_written_through(tmp_path):
    from ttd.evaluation.calibrate import calibrate_checkpoint
    from ttd.model.factory import load_model, save_checkpoint

    checkpoint = save_checkpoint(load_model(), tmp_path / "real" / "model.safetensors")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "model.safetensors").symlink_to(checkpoint)
    (tmp_path / "ck" / "model.json").symlink_to(checkpoint.with_suffix(".json"))
    calibrate_checkpoint(tmp_path / "ck" / "model.safetensors", 7.5, {"method": "labelled"})
    assert (tmp_path / "ck" / "model.json").is_symlink()
    assert json.loads(checkpoint.with_suffix(".json").read_text())["negative_margin"] == 7.5


def test_an_output_that_is_a_fifo_or_a_device_is_refused(tmp_path):
    """A FIFO at OUT was silently replaced by the finished records (a reader on it got nothing);
    a device such as `-o /dev/null` would be replaced the same way, as root, by a plain file.
    A job's output is a file it replaces when done: anything else at OUT is refused, kept."""
    captions = world_job(tmp_path, 2)
    output = tmp_path / "tags.jsonl"
    os.mkfifo(output)
    result = tag("--captions", captions, "-o", output)
    assert result.exit_code == 2 and output.is_fifo(), result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: {output} is not a plain file (a FIFO or a device): a job writes its records to a new file that "
        "replaces the output when the job is done; give a file name")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("tags", ".tags"))) == ["tags.jsonl"]
