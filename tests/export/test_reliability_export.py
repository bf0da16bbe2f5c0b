"""Export integrity (issue #8, item 9): hashes are mandatory, manifest paths stay inside the
export, an export into a used folder hashes only what it wrote; malformed files are clean errors."""

import json
import os
import shutil

import pytest

from export.pipeline import run_export
from export.triton import build_repository
from ttd.model.factory import create_model
from ttd.runtime.export_dir import MANIFEST, ExportError, read_export


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    (out / "notes.txt").write_text("the user's own file, here before the export")
    run_export(create_model("world-tiny", seed=0), out, check_count=8)
    return out


def tampered(export_dir, tmp_path, change):
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    change(manifest)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    return copy


def test_export_into_a_used_folder_hashes_only_its_own_files(export_dir):
    files = json.loads((export_dir / MANIFEST).read_text())["files"]
    assert "notes.txt" not in files
    assert {"model.json", "image_encoder.onnx", "text_encoder.onnx", "tag_head.onnx"} <= set(files)
    (export_dir / "notes.txt").write_text("edited later: not part of the export")
    read_export(export_dir)  # still valid


def test_a_manifest_without_hashes_is_refused(export_dir, tmp_path):
    copy = tampered(export_dir, tmp_path, lambda m: m.pop("files"))
    with pytest.raises(ExportError, match=r"manifest.json has no file hashes"):
        read_export(copy)


def test_a_manifest_without_a_graph_hash_is_refused(export_dir, tmp_path):
    copy = tampered(export_dir, tmp_path, lambda m: m["files"].pop("text_encoder.onnx"))
    (copy / "text_encoder.onnx").write_bytes(b"tampered")
    with pytest.raises(ExportError, match=r"no sha256 for text_encoder.onnx"):
        read_export(copy)


def test_manifest_paths_cannot_leave_the_export(export_dir, tmp_path):
    copy = tampered(export_dir, tmp_path, lambda m: m["files"].update({"../../../../etc/hostname": "0" * 64}))
    with pytest.raises(ExportError, match=r"manifest entry '../../../../etc/hostname' points outside the export"):
        read_export(copy)


def test_tensorrt_engine_paths_are_checked(export_dir, tmp_path):
    def engines(manifest):
        manifest["tensorrt"] = {"engines": {g: "../../../../etc/hostname" for g in ("image_encoder", "text_encoder", "tag_head")}}

    copy = tampered(export_dir, tmp_path, engines)
    with pytest.raises(ExportError, match=r"'../../../../etc/hostname' has no sha256 in the manifest"):
        build_repository(copy, tmp_path / "repo", "native", "tensorrt")
    assert not (tmp_path / "repo" / "ttd_image_encoder" / "1" / "model.plan").exists()


def test_malformed_manifest_and_config_are_named(export_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(ExportError, match=rf"{copy / MANIFEST} is not valid JSON"):
        read_export(copy)
    (copy / MANIFEST).write_text("[]")
    with pytest.raises(ExportError, match=r"unknown format"):
        read_export(copy)


def _snapshot(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in sorted(folder.iterdir())}


def test_a_refused_or_interrupted_export_leaves_the_earlier_export_as_it_was(export_dir, tmp_path, monkeypatch):
    """Issue 23, item 2: `ttd export` into a working export that is then refused (a gate) or
    interrupted (Ctrl-C) used to delete its manifest and graphs. The new export is made beside it
    and swapped in only after its gates pass."""
    import export.pipeline as pipeline
    from export.checks import GateError

    work = tmp_path / "work"
    shutil.copytree(export_dir, work)
    before = _snapshot(work)

    def refused(job):
        raise GateError("int8 export refused: (a stand-in for a missed gate)")

    monkeypatch.setitem(pipeline.CONVERTERS, "int8", refused)
    with pytest.raises(GateError, match="stand-in"):
        run_export(create_model("world-tiny", seed=1), work, "int8", check_count=4)
    assert _snapshot(work) == before
    read_export(work)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "export_graphs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_export(create_model("world-tiny", seed=1), work, check_count=4)
    assert _snapshot(work) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no staging folder left behind


def test_an_export_that_passes_replaces_the_old_one_and_keeps_the_users_files(export_dir, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(export_dir, work)
    old_hashes = json.loads((work / MANIFEST).read_text())["files"]
    manifest = run_export(create_model("world-tiny", seed=1), work, check_count=4, torch_weights=False)
    assert (work / "notes.txt").is_file()  # the user's file stays
    assert not (work / "model.safetensors").exists()  # the old export's file the new one lacks is gone
    assert manifest["files"]["image_encoder.onnx"] != old_hashes["image_encoder.onnx"]
    assert read_export(work).manifest["files"] == manifest["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    fresh = run_export(create_model("world-tiny", seed=1), tmp_path / "new" / "x", check_count=4)
    assert read_export(tmp_path / "new" / "x").manifest["files"] == fresh["files"]
    (tmp_path / "new" / "plain").mkdir()  # the staging folder renamed in has a plain folder's mode, not 0700
    assert (tmp_path / "new" / "x").stat().st_mode == (tmp_path / "new" / "plain").stat().st_mode


def test_staging_folders_of_killed_exports_are_removed_by_the_next(tmp_path):
    """A SIGKILLed or SIGTERMed export cannot clean up: its staging folder (named with its pid) is
    removed by the next export to the same folder; a running export's folder is left alone."""
    import subprocess

    from export.pipeline import STAGING_PREFIX, remove_dead_staging, staging_dir

    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names no running process now
    left = tmp_path / f"{STAGING_PREFIX}out.{dead.pid}.abcd1234"
    left.mkdir()
    (left / "image_encoder.onnx").write_bytes(b"half written")
    running = tmp_path / f"{STAGING_PREFIX}out.{os.getpid()}.efgh5678"
    running.mkdir()
    other = tmp_path / f"{STAGING_PREFIX}outer.{dead.pid}.abcd1234"  # another export's name
    other.mkdir()
    assert remove_dead_staging(tmp_path / "out") == [left]
    assert running.is_dir() and other.is_dir() and not left.exists()
    fresh = staging_dir(tmp_path / "out")
    assert fresh.name.startswith(f"{STAGING_PREFIX}out.{os.getpid()}.") and fresh.parent == tmp_path


def test_an_export_into_a_checkpoint_folder_never_touches_the_checkpoint(tmp_path):
    """`ttd export --checkpoint D/model.safetensors --no-torch-weights D` deleted the checkpoint's
    weights (the swap took model.json / model.safetensors in OUT for an old export's): only files
    an earlier export's manifest lists may be replaced or removed."""
    import hashlib

    from click.testing import CliRunner

    from ttd.cli import main
    from ttd.model.factory import save_checkpoint

    checkpoint = save_checkpoint(create_model("world-tiny", seed=0), tmp_path / "d" / "model.safetensors")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "d").iterdir()}
    result = CliRunner().invoke(main, ["export", str(tmp_path / "d"), "--checkpoint", str(checkpoint),
                                       "--no-torch-weights"])
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'd' / 'model.json'} is not a file an earlier export wrote" in result.output
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "d").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # refused before any staging folder was made
    # a file put there while the gates ran is refused at the swap, and the staging folder goes
    from export.pipeline import PREVIOUS_MANIFEST, staging_dir, swap_in

    out = tmp_path / "e"
    out.mkdir()
    staging = staging_dir(out)
    (staging / "model.json").write_text("{}")
    (staging / MANIFEST).write_text(json.dumps({"files": {"model.json": "0"}}))
    (out / "model.json").write_text("the user's")
    with pytest.raises(ExportError, match="e/model.json is not a file an earlier export wrote"):
        swap_in(staging, out)
    assert (out / "model.json").read_text() == "the user's" and not staging.exists()
    # an export whose swap was killed after the old manifest was set aside is still known as one
    (out / PREVIOUS_MANIFEST).write_text(json.dumps({"files": {"model.json": "0"}}))
    staging = staging_dir(out)
    (staging / "model.json").write_text("{}")
    (staging / MANIFEST).write_text(json.dumps({"files": {"model.json": "0"}}))
    swap_in(staging, out)
    assert (out / "model.json").read_text() == "{}" and sorted(p.name for p in out.iterdir()) == [MANIFEST, "model.json"]


def test_an_export_never_removes_the_staging_folder_of_another_running_export(tmp_path):
    """An export to `ec` removed the live staging folder of a running export to `ec.99991` (it
    read 99991, a dead pid, out of the name), which then died with a traceback."""
    import subprocess

    from export.pipeline import STAGING_PREFIX, remove_dead_staging

    dead = subprocess.Popen(["true"])
    dead.wait()
    running = tmp_path / f"{STAGING_PREFIX}ec.{dead.pid}.{os.getpid()}.abcd1234"  # exporting to ec.<dead pid>
    running.mkdir()
    left = tmp_path / f"{STAGING_PREFIX}ec.{dead.pid}.abcd_123"  # a killed export to ec
    left.mkdir()
    assert remove_dead_staging(tmp_path / "ec") == [left]
    assert running.is_dir()


@pytest.mark.deadline(300)
def test_a_full_disk_during_an_export_is_one_line_and_leaves_the_old_export(export_dir, tmp_path):
    """A full disk (here a 200 kB file-size limit: EFBIG instead of ENOSPC) printed a traceback."""
    import hashlib
    import resource
    import signal
    import subprocess
    import sys
    from pathlib import Path

    work = tmp_path / "work"
    shutil.copytree(export_dir, work)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in work.iterdir()}

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}:{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "ttd", "export", str(work), "--model", "world-tiny"],
                          preexec_fn=small_disk, capture_output=True, text=True, env=env, timeout=280)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write the export") and last.endswith(f"(File too large); {work} is left as "
                                                                               "it was"), last
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in work.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def _in_mount_namespace(mounts: str, *paths, check: str = "true"):
    """A command prefix that runs a command in a mount namespace of its own after the shell
    `mounts` ($1, $2: `paths`), or None where that is not permitted here (or `check` fails in it).
    chmod cannot restrict root (CI runs as root); a read-only mount can."""
    import subprocess

    if shutil.which("unshare") is None:
        return None
    prefix = ["unshare", "-m", "sh", "-c", f"mount --make-rprivate / && {mounts} && shift {len(paths)} && exec \"$@\"",
              "sh", *map(str, paths)]
    probe = subprocess.run([*prefix, "sh", "-c", check], capture_output=True, timeout=30)
    return prefix if probe.returncode == 0 else None


def _ttd(prefix, *args):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}:{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([*prefix, sys.executable, "-m", "ttd", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=280)


@pytest.mark.deadline(300)
def test_an_export_into_a_writable_folder_under_a_read_only_parent_is_staged_inside_it(export_dir, tmp_path):
    """An export into a writable OUT whose parent is read-only (a volume in a read-only container)
    always failed: its staging folder sat beside OUT. It is staged inside OUT then (the same file
    system, so each file still moves in with one rename), and an OUT that does not exist there is
    one line naming the parent."""
    parent = tmp_path / "ro"
    work = parent / "work"
    shutil.copytree(export_dir, work)
    prefix = _in_mount_namespace('mount --bind "$1" "$1" && mount --bind "$2" "$2" && mount -o remount,bind,ro "$1"',
                                 parent, work, check=f'! touch "{parent}/.probe" 2>/dev/null')
    if prefix is None:
        pytest.skip("mount namespaces are not permitted here (unshare -m and a read-only bind mount make a "
                    "read-only parent that root cannot write)")
    old = json.loads((work / MANIFEST).read_text())["files"]
    done = _ttd(prefix, "export", work, "--model", "world-tiny", "--no-torch-weights")
    assert done.returncode == 0, done.stderr[-2000:]
    new = read_export(work).manifest["files"]
    assert "model.safetensors" in old and "model.safetensors" not in new  # the new export is in
    assert sorted(p.name for p in work.iterdir()) == sorted([MANIFEST, "notes.txt", *new])  # no staging left
    assert sorted(p.name for p in parent.iterdir()) == ["work"]
    # an OUT that does not exist cannot be made there: one line naming the read-only parent
    missing = parent / "new"
    done = _ttd(prefix, "export", missing, "--model", "world-tiny")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot export to {missing}: ") and str(parent) in last, last
    assert not missing.exists()


def test_a_killed_export_staged_inside_its_folder_is_cleaned_by_the_next(export_dir, tmp_path):
    """A kill while an export is staged inside OUT leaves the old export as it was (the staging
    folder is hidden and no manifest lists it); the next export removes that folder."""
    import subprocess

    from export.pipeline import STAGING_PREFIX, remove_dead_staging

    work = tmp_path / "work"
    shutil.copytree(export_dir, work)
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = work / f"{STAGING_PREFIX}work.{dead.pid}.abcd1234"
    left.mkdir()
    (left / "image_encoder.onnx").write_bytes(b"half written")
    read_export(work)  # the old export still loads, its hashes checked
    running = work / f"{STAGING_PREFIX}work.{os.getpid()}.efgh5678"
    running.mkdir()
    assert remove_dead_staging(work) == [left]
    assert running.is_dir()


@pytest.mark.deadline(300)
def test_an_export_into_a_mount_point_is_staged_inside_it(tmp_path):
    """An OUT that is a file system of its own (a mounted volume) cannot take files renamed from a
    staging folder beside it (EXDEV, half-way through the swap): it is staged inside OUT."""
    out = tmp_path / "volume"
    out.mkdir()
    prefix = _in_mount_namespace('mount -t tmpfs none "$1"', out)
    if prefix is None:
        pytest.skip("mount namespaces are not permitted here (unshare -m and a tmpfs mount make a volume)")
    done = _ttd([*prefix, "sh", "-c", '"$@" && ls -A "$0"', out], "export", out, "--model", "world-tiny",
                "--no-torch-weights")
    assert done.returncode == 0, done.stderr[-2000:]
    listed = done.stdout.split()
    assert MANIFEST in listed and "image_encoder.onnx" in listed and not any(".ttd-export" in n for n in listed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]  # nothing staged beside it
