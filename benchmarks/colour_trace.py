"""Why a colour word is not placed (docs/training.md, "Why colour stays under 45"): for one world
checkpoint or several, what the data, the tokenizer, the text tower and the segmentation make of
each colour word.

- data: how often each colour is drawn on an object and named in a caption (training seed, N pairs);
- tokenizer: the word's token ids (one word-level token each in the world's tokenizer);
- text: each colour's nearest words by the cosine of their prompt-ensemble embeddings;
- segmentation (`benchmarks/seeds.py`'s colour split, θ 0.5): whether the word's best-matching
  pixel (what Stage 1 scores a tag by) lies on that colour, where each colour's own pixels go
  (its recall) and what the pixels labelled with it are (by true colour, and backdrop by its name),
  and the mean mask probability of the word on its own pixels and on each backdrop.

    python benchmarks/colour_trace.py --checkpoints ttd/assets/world-base.safetensors runs/.../model.safetensors
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from ttd.data.voc import world_segmentation_samples
from ttd.data.world import BACKGROUNDS, COLOURS, make_sample, vocabulary
from ttd.model.tags import candidate_tags
from ttd.runtime import load_tagger
from ttd.segment.segmentation import SegmentOptions, class_maps, encode


def data_counts(seed: int, count: int) -> dict:
    """Objects drawn in each colour, and captions naming it, over the first `count` pairs of `seed`."""
    drawn, named, named_visible = Counter(), Counter(), Counter()
    for index in range(count):
        sample = make_sample(seed, index)
        colours = {o.colour for o in sample.objects}
        drawn.update(colours)
        tags = set(candidate_tags(sample.caption))
        named.update(c for c in COLOURS if c in tags)
        named_visible.update(c for c in colours if c in tags)
    return {c: {"images with it": drawn[c], "captions naming it": named[c], "named and visible": named_visible[c]}
            for c in COLOURS}


def neighbours(tagger, words: list[str], top: int = 4) -> dict:
    embeds = tagger.encode_tags(words)
    embeds = embeds / np.linalg.norm(embeds, axis=1, keepdims=True)
    cos = embeds @ embeds.T
    out = {}
    for i, word in enumerate(words):
        if word in COLOURS:
            order = [j for j in np.argsort(-cos[i]) if j != i][:top]
            out[word] = {words[j]: round(float(cos[i, j]), 3) for j in order}
    return out


def segmentation_trace(tagger, seed: int, count: int, size: int) -> dict:
    """Per colour: recall, where its pixels go, what its labelled pixels are, its mean mask on each region."""
    dataset = world_segmentation_samples(seed, count, size, labelling="colours")
    classes = dataset.classes[1:]
    options = SegmentOptions(mask_threshold=0.5)
    embeds = tagger.encode_tags(classes)
    went = {c: Counter() for c in classes}
    labelled = {c: Counter() for c in classes}
    mask_sum = {c: Counter() for c in classes}
    regions, present, best_hit = Counter(), Counter(), Counter()
    for index in range(len(dataset)):
        image, truth = dataset.load(index)
        backdrop = make_sample(seed, index, size).background
        maps = class_maps(tagger, encode(tagger, image, options), classes, options, embeds)
        labels = maps.label_map(0.5)
        probs = 1 / (1 + np.exp(-maps.masks_logits(list(range(len(classes))))))
        region = np.where(truth == 0, 0, truth).astype(int)
        names = [f"backdrop {backdrop}", *classes]
        for r in np.unique(region):
            where = region == r
            regions[names[r]] += int(where.sum())
            for k, c in enumerate(classes):
                mask_sum[c][names[r]] += float(probs[k][where].sum())
        for k, c in enumerate(classes):
            own = truth == k + 1
            if own.any():  # Stage 1 scores a tag by its best-matching pixel: is that pixel on the colour?
                present[c] += 1
                best_hit[c] += int(own.flat[int(np.argmax(probs[k]))])
            for lab, n in zip(*np.unique(labels[own], return_counts=True)):
                went[c]["background" if lab == 0 else classes[lab - 1]] += int(n)
            put = labels == k + 1
            for r, n in zip(*np.unique(region[put], return_counts=True)):
                labelled[c][names[r]] += int(n)
    share = lambda counter: {k: round(100 * v / max(sum(counter.values()), 1), 1) for k, v in counter.most_common(4)}  # noqa: E731
    return {c: {"best pixel on its own pixels (% of images with it)": round(100 * best_hit[c] / max(present[c], 1), 1),
                "its pixels labelled as (%)": share(went[c]), "pixels labelled with it are (%)": share(labelled[c]),
                "mean mask on": {r: round(mask_sum[c][r] / regions[r], 2) for r in sorted(regions)
                                 if r == c or r.startswith("backdrop") or r == "orange" and c == "red"}}
            for c in classes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--data-seed", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/colour_trace.json"))
    args = parser.parse_args()
    report = {"data": data_counts(args.data_seed, args.pairs), "data seed": args.data_seed, "pairs": args.pairs,
              "colours (RGB)": COLOURS, "backdrops (RGB)": BACKGROUNDS, "models": {}}
    for checkpoint in args.checkpoints:
        tagger = load_tagger("torch", checkpoint=checkpoint, device="cpu")
        tokens = {c: [int(t) for t in tagger.tokenizer([c])[0][:4]] for c in COLOURS}
        report["models"][checkpoint] = {"tokens": tokens, "nearest words": neighbours(tagger, vocabulary()),
                                        "segmentation (seed 2, 100 images, 64 px, θ 0.5)": segmentation_trace(tagger, 2, 100, 64)}
        print(checkpoint, json.dumps(report["models"][checkpoint]["segmentation (seed 2, 100 images, 64 px, θ 0.5)"]["red"]))
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(report["data"]))


if __name__ == "__main__":
    main()
