"""Old tree vs this tree: are the records the same ("behaviour unchanged"), and how many
bytes does a backend hand back to the host per batch on the tagging path?

    git worktree add /work/old 94f2dd6        # the tree before the one-engine restructure
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/compare_versions.py records --old-tree /work/old
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/compare_versions.py bytes --old-tree /work/old

`records` writes a world split (`ttd world generate`, held-out seed 2) and runs the same commands
with each tree's `python -m ttd` (its own PYTHONPATH and working directory; embedded default model,
torch backend, CPU, one thread), alternately old then new:

- `ttd tag --captions` for every `--score`, with and without `--flip-tta`;
- `ttd tag --vocabulary` (a 21-word vocabulary of colours, shapes, backgrounds and absent things,
  `--top-k` = the vocabulary so every score is in the record);
- `ttd segment --captions` on the first `--segment-count` items, `--score softmax` and `negatives`;
- `ttd eval --data` on the split (its printed table and its `--json` metrics).

It compares the records: the share of tag decisions that flip (selected in one, not the other),
the largest |score difference|, for segment the same over the candidates plus the IoU of each
segment's mask between old and new, and the evaluation tables side by side. Every flip is listed
with both scores; for `negatives` the old numpy path's floor is counted on every candidate (it took
log of the head's softmax probabilities, floored at float32's tiny, 1.2e-38: where that happened).

`bytes` counts, with a proxy around the backend, the nbytes of every array a backend method returns
to the Tagger during `Tagger.tag` of a batch of world captions (tag embeddings already cached; the
input images, which travel the other way, are not counted): old = encoder outputs (image and patch
embeddings) + every tag-head output; new = what `tag_images` returns. Default batches: ViT-B-16
(random weights) 8 and 256, world 32 and 256, each also scaled linearly to `--target-batch`.

P5 (old vs new) is each tree's own benchmarks/tag_throughput.py run alternately; see
docs/benchmarks.md "Old engine vs one engine".

JSON: benchmarks/results/compare_versions.json (records), benchmarks/results/compare_versions_bytes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]
SCORES = ("negatives", "softmax", "minmax", "sigmoid")
VOCABULARY = ["red", "green", "blue", "orange", "yellow", "purple", "circle", "square", "star", "triangle",
              "cross", "heart", "ring", "diamond", "sand", "snow", "grass", "water", "dog", "car", "person"]
THRESHOLD = 0.5


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def env_for(tree: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def run_ttd(tree: Path, args: list[str], cwd: Path | None = None) -> tuple[str, float]:
    """`python -m ttd ARGS` of one tree: (stdout, CPU seconds)."""
    cpu = children_cpu()
    done = subprocess.run([sys.executable, "-m", "ttd", *args], cwd=cwd or tree, env=env_for(tree),
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{tree}: ttd {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout, children_cpu() - cpu


def load_jsonl(path: Path) -> list[dict]:
    """Records in input order; the old `ttd segment` wrote no "index" (its lines are in input order)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r if "index" in r else dict(r, index=i) for i, r in enumerate(rows)]


# ---------------------------------------------------------------- comparisons


def compare_decisions(old_rows: list[tuple], new_rows: list[tuple]) -> dict:
    """Rows (item, tag, score, selected) in the same order in both: flips and score differences."""
    assert len(old_rows) == len(new_rows), (len(old_rows), len(new_rows))
    flips, diffs = [], []
    for o, n in zip(old_rows, new_rows, strict=True):
        assert o[:2] == n[:2], (o, n)
        diffs.append(abs(o[2] - n[2]))
        if o[3] != n[3]:
            flips.append({"item": o[0], "tag": o[1], "old_score": o[2], "new_score": n[2],
                          "old_selected": o[3], "new_selected": n[3]})
    diffs = np.array(diffs) if diffs else np.zeros(1)
    return {"decisions": len(old_rows), "flips": len(flips), "flip_share": len(flips) / max(1, len(old_rows)),
            "max_abs_score_diff": float(diffs.max()), "mean_abs_score_diff": float(diffs.mean()),
            "scores_over_1e-3": int((diffs > 1e-3).sum()), "flip_list": flips}


def caption_rows(records: list[dict]) -> list[tuple]:
    rows = []
    for r in sorted(records, key=lambda r: r["index"]):
        if "error" in r:
            rows.append((r["index"], "<error>", float("nan"), r["error"]))
            continue
        chosen = set(r["selected"])
        rows += [(r["index"], c["tag"], c["score"], c["tag"] in chosen) for c in r["candidates"]]
    return rows


def vocabulary_rows(records: list[dict]) -> list[tuple]:
    rows = []
    for r in sorted(records, key=lambda r: r["index"]):
        scores = {t["tag"]: t["score"] for t in r["top"]}
        chosen = {t["tag"] for t in r["selected"]}
        assert set(scores) == set(VOCABULARY), "--top-k must list the whole vocabulary"
        rows += [(r["index"], tag, scores[tag], tag in chosen) for tag in VOCABULARY]
    return rows


def segment_ious(old: list[dict], new: list[dict]) -> dict:
    from pycocotools import mask as mask_utils

    ious, missing, differing = [], [], 0
    for o, n in zip(sorted(old, key=lambda r: r["index"]), sorted(new, key=lambda r: r["index"]), strict=True):
        segs_o = {(s["kind"], s["label"]): s for s in o.get("segments", [])}
        segs_n = {(s["kind"], s["label"]): s for s in n.get("segments", [])}
        for key in sorted(set(segs_o) | set(segs_n)):
            if key not in segs_o or key not in segs_n:
                missing.append({"item": o["index"], "segment": list(key), "in": "old" if key in segs_o else "new"})
                ious.append(0.0)
                continue
            a = mask_utils.decode(segs_o[key]["rle"]).astype(bool)
            b = mask_utils.decode(segs_n[key]["rle"]).astype(bool)
            union = (a | b).sum()
            iou = 1.0 if union == 0 else float((a & b).sum() / union)
            differing += int(iou < 1.0)
            ious.append(iou)
    ious = np.array(ious) if ious else np.ones(1)
    return {"segments": len(ious), "mean_iou": float(ious.mean()), "min_iou": float(ious.min()),
            "segments_not_identical": differing, "segments_in_one_only": missing}


def eval_metrics(path: Path) -> dict:
    data = json.loads(path.read_text())
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix] = float(value)

    walk("", data)
    return flat


# ---------------------------------------------------------------- underflow diagnosis of flips


DIAGNOSE = r"""
import json, sys
import numpy as np
from ttd.runtime import load_tagger
from ttd.negatives import TINY
tagger = load_tagger("torch", device="cpu", threads=1)
tagger.flip_tta = {flip}
out = []
for q in json.load(open(sys.argv[1])):
    _, patch, flipped = tagger.encode_images(tagger.prepare([q["path"]]))
    tags = q["tags"]
    ext = np.concatenate([tagger.encode_tags(tags)[None],
                          tagger.encode_tags(list(tagger.config.negative_prompts))[None]], axis=1).astype(np.float32)
    views = [patch] + ([np.ascontiguousarray(flipped[..., ::-1])] if flipped is not None else [])
    per_tag = {{t: [] for t in tags}}
    for v in views:
        p = tagger.backend.score_tags(v, ext)[2][0].astype(np.float64)  # tag_probs [K + N, h, w]
        neg = p[len(tags):].sum(0)
        for k, t in enumerate(tags):
            per_tag[t].append({{"tag_prob_min": float(p[k].min()), "negatives_sum_min": float(neg.min()),
                                "pixels_floored": int(((p[k] < TINY) | (neg < TINY)).sum())}})
    out.append({{"item": q["item"], "tags": per_tag}})
print(json.dumps(out))
"""


def old_negatives_floor(old_tree: Path, split: Path, annotations: list[dict], records: list[dict],
                        flip: bool) -> list[dict]:
    """The old numpy `negatives` path, per item and tag: the smallest per-pixel probability of the tag
    and of the negatives' sum in the tag head's softmax over tags + negatives, and how many pixels it
    floored at float32's tiny (where log(P) underflowed)."""
    import tempfile

    queries = [{"item": r["index"], "tags": [c["tag"] for c in r["candidates"]],
                "path": str(split / annotations[r["index"]]["image"])} for r in records if "candidates" in r]
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(queries, f)
        f.flush()
        done = subprocess.run([sys.executable, "-c", DIAGNOSE.format(flip=flip), f.name], cwd=old_tree,
                              env=env_for(old_tree), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"old-path diagnosis failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def floor_census(diagnosis: list[dict]) -> dict:
    views = [v for d in diagnosis for per_view in d["tags"].values() for v in per_view]
    floored = [(d["item"], t) for d in diagnosis for t, vs in d["tags"].items() if any(v["pixels_floored"] for v in vs)]
    return {"candidates": sum(len(d["tags"]) for d in diagnosis),
            "candidates_with_floored_pixels": len(floored), "floored_examples": floored[:10],
            "smallest_tag_prob": min(v["tag_prob_min"] for v in views),
            "smallest_negatives_sum": min(v["negatives_sum_min"] for v in views)}


# ---------------------------------------------------------------- records


def records(args) -> None:
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    trees = {"old": args.old_tree.resolve(), "new": args.new_tree.resolve()}
    split = work / "split"
    if not (split / "annotations.jsonl").exists():
        run_ttd(trees["new"], ["world", "generate", str(split), "--count", str(args.count), "--seed", str(args.seed)])
    # the old tree's generator must give the very same split (same inputs for both)
    old_split = work / "split_old"
    if not (old_split / "annotations.jsonl").exists():
        run_ttd(trees["old"], ["world", "generate", str(old_split), "--count", str(args.count),
                               "--seed", str(args.seed)])
    same_split = (split / "annotations.jsonl").read_bytes() == (old_split / "annotations.jsonl").read_bytes() and all(
        p.read_bytes() == (old_split / "images" / p.name).read_bytes() for p in (split / "images").iterdir())
    annotations = load_jsonl(split / "annotations.jsonl")
    subset = split / f"first_{args.segment_count}.jsonl"
    subset.write_text("".join(json.dumps(a) + "\n" for a in annotations[: args.segment_count]))
    vocab = work / "vocabulary.txt"
    vocab.write_text("\n".join(VOCABULARY) + "\n")
    common = ["--device", "cpu", "--quiet"]
    cases = []
    for score in SCORES:
        for flip in (False, True):
            cases.append((f"tag --score {score}" + (" --flip-tta" if flip else ""), "captions", score, flip,
                          ["tag", "--captions", str(split / "annotations.jsonl"), "--score", score, "--threads", "1",
                           *(["--flip-tta"] if flip else []), *common]))
    cases.append(("tag --vocabulary (default score)", "vocabulary", "negatives", False,
                  ["tag", "--vocabulary", str(vocab), str(split / "images"), "--top-k", str(len(VOCABULARY)),
                   "--no-vocab-cache", "--threads", "1", *common]))
    for score in ("softmax", "negatives"):
        cases.append((f"segment --captions --score {score} ({args.segment_count} items)", "segment", score, False,
                      ["segment", "--captions", str(subset), "--score", score, *common]))

    report = {"cpu": cpu_name(), "threads": 1, "old_tree": str(trees["old"]), "new_tree": str(trees["new"]),
              "ttd_imported_from": {v: imported_from(t) for v, t in trees.items()},
              "old_commit": git_head(trees["old"]), "new_commit": git_head(trees["new"]), "split": str(split),
              "count": args.count, "seed": args.seed, "segment_count": args.segment_count,
              "split_identical_from_both_generators": same_split, "bar": {"flip_share": 0.005, "score_diff": 1e-3},
              "cases": []}
    for name, kind, score, flip, cmd in cases:
        outputs, cpu = {}, {}
        for version in ("old", "new"):
            out = work / f"{version}_{'_'.join(name.split()[:4]).replace('-', '').strip('()')}.jsonl"
            _, cpu[version] = run_ttd(trees[version], [*cmd, "-o", str(out)])
            outputs[version] = load_jsonl(out)
        if kind == "vocabulary":
            result = compare_decisions(vocabulary_rows(outputs["old"]), vocabulary_rows(outputs["new"]))
        else:
            result = compare_decisions(caption_rows(outputs["old"]), caption_rows(outputs["new"]))
        if kind == "segment":
            result["masks"] = segment_ious(outputs["old"], outputs["new"])
        old_numpy_path = (trees["old"] / "ttd/negatives.py").exists()  # the trees before the one-engine restructure
        if kind == "captions" and score == "negatives" and old_numpy_path:  # where did the old path floor probabilities?
            diagnosis = old_negatives_floor(trees["old"], split, annotations, outputs["old"], flip)
            result["old_path_floor"] = floor_census(diagnosis)
            by_item = {d["item"]: d["tags"] for d in diagnosis}
            for f in result["flip_list"]:
                f["old_path"] = by_item[f["item"]][f["tag"]]
        if result["flips"] and kind != "vocabulary":
            by_index = {r["index"]: r for r in outputs["old"]}
            for f in result["flip_list"]:
                f["caption_scores_old"] = {c["tag"]: c["score"] for c in by_index[f["item"]]["candidates"]}
        result.update(case=name, cpu_s=cpu)
        report["cases"].append(result)
        print(f"{name:48s} decisions {result['decisions']:6d}  flips {result['flips']:3d} "
              f"({100 * result['flip_share']:.2f} %)  max |Δscore| {result['max_abs_score_diff']:.2e}"
              + (f"  mask IoU mean {result['masks']['mean_iou']:.4f} min {result['masks']['min_iou']:.4f}"
                 if "masks" in result else "")
              + (f"  old path floored {result['old_path_floor']['candidates_with_floored_pixels']} candidates"
                 if "old_path_floor" in result else ""), flush=True)

    tables, metrics = {}, {}
    for version in ("old", "new"):
        out = work / f"{version}_eval.json"
        tables[version], _ = run_ttd(trees[version], ["eval", "--data", str(split), "--device", "cpu",
                                                     "--json", str(out)])
        metrics[version] = eval_metrics(out)
    keys = sorted(set(metrics["old"]) | set(metrics["new"]))
    diffs = {k: abs(metrics["old"].get(k, float("nan")) - metrics["new"].get(k, float("nan"))) for k in keys}
    report["eval"] = {"table_old": tables["old"], "table_new": tables["new"],
                      "tables_identical": tables["old"] == tables["new"],
                      "max_abs_metric_diff": max(diffs.values()),
                      "metrics_differing": {k: v for k, v in diffs.items() if v}}
    print("eval tables identical:", report["eval"]["tables_identical"], " max |Δmetric|",
          report["eval"]["max_abs_metric_diff"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}; CPU: {report['cpu']}")


def imported_from(tree: Path) -> str:
    """Where `import ttd` resolves under this tree's PYTHONPATH (must be inside the tree)."""
    done = subprocess.run([sys.executable, "-c", "import ttd; print(ttd.__file__)"], cwd=tree, env=env_for(tree),
                          capture_output=True, text=True)
    path = done.stdout.strip()
    if not path.startswith(str(tree)):
        raise SystemExit(f"import ttd under {tree} resolves to {path or done.stderr[-500:]}")
    return path


def git_head(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


# ---------------------------------------------------------------- bytes


COUNT_BYTES = r"""
import json, sys, time
import numpy as np
from ttd.runtime import load_tagger

model, batch, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
from ttd.data.world import make_sample
try:
    from ttd.model.tags import candidate_tags
except ImportError:
    from ttd.tags import candidate_tags

def nbytes(value):
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(nbytes(getattr(value, f)) for f in value.__dataclass_fields__)
    return 0

def shapes(value):
    if isinstance(value, np.ndarray):
        return [list(value.shape), str(value.dtype)]
    if isinstance(value, (tuple, list)):
        return [shapes(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {f: shapes(getattr(value, f)) for f in value.__dataclass_fields__}
    return None

class Counting:
    def __init__(self, inner):
        self._inner, self.calls = inner, []
    def __getattr__(self, name):
        value = getattr(self._inner, name)
        if not callable(value):
            return value
        def call(*a, **k):
            out = value(*a, **k)
            self.calls.append({"method": name, "bytes": nbytes(out), "outputs": shapes(out)})
            return out
        return call

tagger = load_tagger("torch", model=None if model == "world" else model, device="cpu", threads=1)
counting = Counting(tagger.backend)
tagger.backend = counting
size = tagger.config.image_size
samples = [make_sample(7, i, max(size, 64)) for i in range(batch)]
tag_lists = [candidate_tags(s.caption) for s in samples]
images = tagger.prepare([s.image for s in samples])
union = list(dict.fromkeys(t for tags in tag_lists for t in tags))
tagger.tag(images[:1], [union])  # warm-up: every tag (and the negatives) cached, so the counted call encodes no text
runs = []
for _ in range(repeats):
    counting.calls.clear()
    started = time.process_time()
    tagger.tag(images, tag_lists)
    runs.append(time.process_time() - started)
calls = [c for c in counting.calls if c["method"] != "encode_texts"]
print(json.dumps({"model": model, "batch": batch, "image_size": size, "grid": list(tagger.config.grid_size),
                  "embed_dim": tagger.config.embed_dim, "max_tags": max(map(len, tag_lists)),
                  "mean_tags": float(np.mean([len(t) for t in tag_lists])),
                  "bytes_to_host": sum(c["bytes"] for c in calls), "calls": calls,
                  "texts_encoded_in_counted_call": len(counting.calls) - len(calls),
                  "tag_cpu_s": runs}))
"""


def count_bytes(args) -> None:
    trees = {"old": args.old_tree.resolve(), "new": args.new_tree.resolve()}
    report = {"cpu": cpu_name(), "threads": 1, "old_commit": git_head(trees["old"]),
              "new_commit": git_head(trees["new"]), "target_batch": args.target_batch, "rows": []}
    for model, batches in (("ViT-B-16", args.vit_batches), ("world", args.world_batches)):
        for batch in batches:
            row = {"model": model, "batch": batch}
            for version in ("old", "new"):
                done = subprocess.run([sys.executable, "-c", COUNT_BYTES, model, str(batch), "1"], cwd=trees[version],
                                      env=env_for(trees[version]), capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{version}: {done.stderr[-3000:]}")
                row[version] = json.loads(done.stdout.strip().splitlines()[-1])
            scale = args.target_batch / batch
            row["old_bytes_at_target"] = row["old"]["bytes_to_host"] * scale
            row["new_bytes_at_target"] = row["new"]["bytes_to_host"] * scale
            row["ratio"] = row["old"]["bytes_to_host"] / max(1, row["new"]["bytes_to_host"])
            report["rows"].append(row)
            print(f"{model} batch {batch}: old {row['old']['bytes_to_host']:,} B, new {row['new']['bytes_to_host']:,} B"
                  f" -> at batch {args.target_batch}: old {row['old_bytes_at_target'] / 1e6:.1f} MB, new "
                  f"{row['new_bytes_at_target'] / 1e3:.1f} kB, {row['ratio']:.0f}x fewer", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}; CPU: {report['cpu']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("records", "bytes"):
        p = sub.add_parser(name)
        p.add_argument("--old-tree", type=Path, required=True, help="a checkout of the old code (e.g. 94f2dd6)")
        p.add_argument("--new-tree", type=Path, default=HERE)
        if name == "records":
            p.add_argument("--work", type=Path, default=Path("/tmp/ttd_compare_versions"))
            p.add_argument("--count", type=int, default=300)
            p.add_argument("--seed", type=int, default=2)
            p.add_argument("--segment-count", type=int, default=50)
            p.add_argument("--json", type=Path, default=HERE / "benchmarks/results/compare_versions.json")
        else:
            p.add_argument("--vit-batches", type=int, nargs="+", default=[8, 256])
            p.add_argument("--world-batches", type=int, nargs="+", default=[32, 256])
            p.add_argument("--target-batch", type=int, default=256)
            p.add_argument("--json", type=Path, default=HERE / "benchmarks/results/compare_versions_bytes.json")
    args = parser.parse_args()
    started = time.perf_counter()
    (records if args.command == "records" else count_bytes)(args)
    print(f"{time.perf_counter() - started:.0f} s wall")


if __name__ == "__main__":
    main()
