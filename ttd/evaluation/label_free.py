"""Fitting the `negatives` margin without labels: image–caption pairs alone (`ttd calibrate --captions`).

Labelled calibration (calibrate.py) knows which candidate tags are present. Here nothing does,
so the margin comes from what an *absent* tag looks like on these images, with this model:

- The null. Each image is scored against tags of *other* captions (shuffled pairs) that its own
  caption does not name: mostly things that are not in it. Their critical margins m*_k
  (calibrate.critical_margins: tag k is selected exactly when m ≤ m*_k) are drawn beside those of
  the caption's own tags, which also hold absent words (fillers, wrong or abstract words).
- Unmentioned-but-present tags. A shuffled tag is sometimes in the image after all (a caption
  names a few of the things it shows), and a model confuses some absent tags with present ones;
  both put a long *upper* tail on the null. Its quantiles would then place m among present tags.
  So the null is the empirical null of Efron (2004): the peak of the critical margins (own and
  shuffled pooled: absent tags of both kinds sit there), located by a kernel density's mode, and
  its width from the peak's *lower* half only (median distance below the mode / 0.6745, the
  half-normal's median), which the upper tail of present tags never reaches.
- The margin is where a Gaussian of that centre and width selects at most `max_false_rate` of
  absent tags: m = centre + width · Φ⁻¹(1 − max_false_rate). Absent tags' real upper tail is
  heavier than a Gaussian's, so the default rate is small; it was chosen on labelled world pairs
  held out for the purpose (docs/calibration.md): precision ≥ 97 % for base and TTD models.
- The negative prompts. From a documented list of sets (NEGATIVE_PROMPT_CANDIDATES), calibration
  can keep the set under which the captions' own tags stand out most from the shuffled ones
  (the probability that an own tag's m* exceeds a shuffled tag's): label-free as well. Opt-in:
  on the world it chose sets that lowered held-out F1 (docs/calibration.md).
"""

from __future__ import annotations

from ttd.errors import InputError
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np
from tqdm import tqdm

from ttd.errors import TTDError
from ttd.evaluation.calibrate import view_critical_margins
from ttd.model.config import DEFAULT_MAX_FALSE_RATE, NEGATIVE_PROMPT_CANDIDATES
from ttd.model.tags import CaptionError, bounded_tags
from ttd.runtime.images import ImageError
from ttd.runtime.tagger import Tagger

NULL_DRAWS = 2  # other captions whose tags each image is scored against
HALF_NORMAL_MEDIAN = 0.6745  # Φ⁻¹(0.75): median distance from the mean of a Gaussian's lower half, in σ
DENSITY_GRID = 512
MAX_DENSITY_POINTS = 20_000  # the mode is found on at most this many values (evenly spaced order statistics)
FEW_PAIRS = 100
# A fit refuses rather than write a margin nobody can trust (docs/calibration.md, docs/reliability.md):
# measured on world pairs with the embedded model, 2 pairs (7 shuffled tags) gave 17.0 and 3 pairs
# (17) 11.0 where 40 pairs give 4.6; from 34 shuffled tags (5 pairs) on, the fit is within 1.1 of it.
MIN_NULL_TAGS = 30
# A margin above every own tag of the captions would tag nothing: identical captions (no shuffled
# tag) gave 162.9, selecting 0.0 % of them. Captions name what they show, so far more than this
# share of their own tags is present in any real set (world: 62 %).
MIN_SELECTED_SHARE = 0.05


class LabelFreeFitError(TTDError, ValueError):
    """The pairs cannot support a label-free fit (too few shuffled tags, or a margin that selects
    almost none of the captions' own tags): nothing is written."""


@dataclass
class LabelFreeFit:
    margin: float
    max_false_rate: float
    null_centre: float
    null_scale: float
    pairs: int
    caption_tags: int
    null_tags: int
    selected_share: float  # of the captions' own tags, at the margin
    negative_prompts: tuple[str, ...]
    separation: float  # P(own tag's m* > shuffled tag's m*) under those prompts
    prompt_separations: list[tuple[tuple[str, ...], float]]

    def line(self) -> str:
        few = f" (only {self.pairs} pairs: the margin is uncertain)" if self.pairs < FEW_PAIRS else ""
        return (f"negative_margin {self.margin:.3f} (label-free: null peak {self.null_centre:.2f} ± {self.null_scale:.2f} "
                f"from {self.pairs} pairs, {self.caption_tags} caption tags and {self.null_tags} shuffled; max false "
                f"rate {self.max_false_rate:g}): selects {100 * self.selected_share:.1f} % of the captions' own tags; "
                f"negative prompts {', '.join(self.negative_prompts)}{few}")

    def as_dict(self) -> dict:
        return asdict(self)

    def record(self, data: str, threshold: float, flip_tta: bool) -> dict:
        """The config's `margin_fit`: how the margin was fitted, for whoever loads the model."""
        return {"method": "label-free", "data": data, "pairs": self.pairs, "threshold": threshold, "flip_tta": flip_tta,
                "max_false_rate": self.max_false_rate, "null_centre": round(self.null_centre, 4),
                "null_scale": round(self.null_scale, 4), "negative_prompts": list(self.negative_prompts),
                "separation": round(self.separation, 4)}


def shuffled_null_tags(tag_lists: list[list[str]], draws: int = NULL_DRAWS, seed: int = 0) -> list[list[str]]:
    """For each image i, the tags of `draws` other captions that caption i does not name.

    The captions are put in a random order and image i takes the captions 1..draws places after
    its own in it, so no image is ever paired with its own caption."""
    if len(tag_lists) < 2:
        raise InputError(f"label-free calibration needs at least 2 image–caption pairs with tags (each image is "
                         f"scored against other captions' tags); got {len(tag_lists)}")
    order = np.random.default_rng(seed).permutation(len(tag_lists))
    place = np.empty_like(order)
    place[order] = np.arange(len(order))
    nulls = []
    for i, own in enumerate(tag_lists):
        named = set(own)
        others = [tag_lists[order[(place[i] + d) % len(order)]] for d in range(1, min(draws, len(order) - 1) + 1)]
        nulls.append(list(dict.fromkeys(t for tags in others for t in tags if t not in named)))
    return nulls


def empirical_null(values: np.ndarray) -> tuple[float, float]:
    """(centre, width) of the peak of `values`: the mode of a Gaussian kernel density and the
    median distance of the values below it / 0.6745. An upper tail (present tags) moves neither."""
    values = np.sort(np.asarray(values, np.float64).ravel())
    values = values[np.isfinite(values)]
    if values.size < 10:
        raise InputError(f"the null needs at least 10 critical margins to find its peak; got {values.size}")
    if values.size > MAX_DENSITY_POINTS:
        values = values[np.linspace(0, values.size - 1, MAX_DENSITY_POINTS).round().astype(int)]
    q25, q75 = np.percentile(values, [25, 75])
    spread = min(values.std(), (q75 - q25) / 1.349) or values.std() or 1.0
    bandwidth = 0.9 * spread * values.size ** -0.2  # Silverman's rule
    grid = np.linspace(*np.percentile(values, [1, 99]), DENSITY_GRID)
    density = np.zeros_like(grid)
    for start in range(0, values.size, 4096):
        density += np.exp(-0.5 * ((grid[:, None] - values[None, start : start + 4096]) / bandwidth) ** 2).sum(1)
    centre = float(grid[np.argmax(density)])
    below = centre - values[values <= centre]
    scale = float(np.median(below)) / HALF_NORMAL_MEDIAN if below.size else 0.0
    if not scale > 0:
        raise InputError("the critical margins have no spread below their peak: too few distinct pairs to calibrate on")
    return centre, scale


def null_margin(centre: float, scale: float, max_false_rate: float) -> float:
    """The margin at which a Gaussian null N(centre, scale²) has `max_false_rate` above it."""
    if not 0 < max_false_rate < 1:
        raise InputError(f"max false rate must be in (0, 1), got {max_false_rate}")
    if not 0 < 1 - max_false_rate < 1:  # 1e-300: 1 - rate rounds to 1.0, past any Gaussian quantile
        raise InputError(f"max false rate {max_false_rate:g} is too small to place a margin (below about 1e-16, "
                         "1 - rate is 1 in floating point); use 1e-12 or more")
    return centre + scale * NormalDist().inv_cdf(1 - max_false_rate)


def separation(own: np.ndarray, null: np.ndarray) -> float:
    """P(an own tag's m* > a shuffled tag's m*) (ties count half): the area under the ROC curve."""
    own, null = np.asarray(own, np.float64).ravel(), np.asarray(null, np.float64).ravel()
    if not own.size or not null.size:
        return 0.5
    values = np.concatenate([own, null])
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size)
    ranks[order] = np.arange(1, values.size + 1)
    sorted_values = values[order]  # average ranks over ties
    starts = np.r_[0, np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1]
    ends = np.r_[starts[1:], values.size]
    for s, e in zip(starts, ends):
        if e - s > 1:
            ranks[order[s:e]] = (s + e + 1) / 2
    return float((ranks[: own.size].sum() - own.size * (own.size + 1) / 2) / (own.size * null.size))


def margins_of_pairs(tagger: Tagger, images: Iterable, captions: Sequence[str], prompt_sets: Sequence[tuple[str, ...]],
                     seed: int = 0, batch_size: int = 32, progress: bool = True,
                     skipped: list[str] | None = None) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """((own, shuffled) critical margins under each prompt set, pairs used), each image encoded once.

    `images` are what the tagger's preprocessing takes (files, bytes, RGB arrays), in the order of
    `captions`, iterated once (never indexed: shards are read as they are taken); a pair whose
    image cannot be read is left out, its reason appended to `skipped`."""
    kept, tag_lists = [], []
    for i, caption in enumerate(captions):
        try:
            tags = bounded_tags(caption or "")
        except CaptionError as error:  # one unbounded caption would dominate the null, or never end
            if skipped is not None:
                skipped.append(f"pair {i + 1}: {error}")
            continue
        if tags:
            kept.append(i)
            tag_lists.append(tags)
    null_lists = shuffled_null_tags(tag_lists, seed=seed)
    negative_sets = [tagger.encode_tags(list(prompts)) for prompts in prompt_sets]
    used = 0
    own: list[list[np.ndarray]] = [[] for _ in prompt_sets]
    null: list[list[np.ndarray]] = [[] for _ in prompt_sets]
    wanted = set(kept)
    # taken in order, one batch decoded at a time: `images` may be read as it is iterated (shards)
    kept_images = (image for i, image in zip(range(len(captions)), images) if i in wanted)
    for start in tqdm(range(0, len(kept), batch_size), disable=not progress, desc="calibrate (label-free)",
                      unit="batch"):
        rows, decoded = [], []
        for row in range(start, min(start + batch_size, len(kept))):
            image = next(kept_images)
            try:
                decoded.append(tagger.preprocess(image))
                rows.append(row)
            except (ImageError, OSError, ValueError) as error:
                if skipped is not None:
                    skipped.append(f"pair {kept[row] + 1}: {error}")
        if not rows:
            continue
        used += len(rows)
        _, views = tagger.encode_images(np.stack(decoded))
        lists = [tag_lists[r] + null_lists[r] for r in rows]  # one head call scores both
        for s, negatives in enumerate(negative_sets):
            for r, margins in zip(rows, view_critical_margins(tagger, views, lists, negatives)):
                own[s].append(margins[: len(tag_lists[r])])
                null[s].append(margins[len(tag_lists[r]) :])
    if not own[0]:
        raise InputError("no pair has both a readable image and a caption with candidate tags: nothing to calibrate on")
    return [(np.concatenate(o), np.concatenate(n)) for o, n in zip(own, null)], used


def fit_label_free(tagger: Tagger, images: Iterable, captions: Sequence[str],
                   max_false_rate: float = DEFAULT_MAX_FALSE_RATE, choose_prompts: bool = False, seed: int = 0,
                   batch_size: int = 32, progress: bool = True, skipped: list[str] | None = None) -> LabelFreeFit:
    """Fit the tagger's `negatives` margin (and, with `choose_prompts`, its negative prompts) on
    image–caption pairs without labels, through the tagger's backend, flip TTA and threshold δ."""
    null_margin(0.0, 1.0, max_false_rate)  # a bad rate fails before any work
    prompt_sets = [tuple(tagger.config.negative_prompts)]
    if choose_prompts:
        prompt_sets += [c for c in NEGATIVE_PROMPT_CANDIDATES if c != prompt_sets[0]]
    try:
        return _fit(tagger, images, captions, max_false_rate, prompt_sets, seed, batch_size, progress, skipped)
    except ValueError as error:  # why pairs were missing is often why the fit failed: say it
        from ttd.data.items import skipped_summary

        if skipped and "skipped (" not in str(error):
            error.args = (f"{error}{skipped_summary(skipped)}",)
        raise


def _fit(tagger: Tagger, images: Iterable, captions: Sequence[str], max_false_rate: float,
         prompt_sets: list[tuple[str, ...]], seed: int, batch_size: int, progress: bool,
         skipped: list[str] | None) -> LabelFreeFit:
    margins, pairs = margins_of_pairs(tagger, images, captions, prompt_sets, seed, batch_size, progress, skipped)
    separations = [separation(own, null) for own, null in margins]
    best = int(np.argmax(separations))  # ties keep the model's own set (first)
    own, null = margins[best]
    if null.size < MIN_NULL_TAGS:
        raise LabelFreeFitError(
            f"label-free calibration needs at least {MIN_NULL_TAGS} shuffled tags (tags of other captions that an "
            f"image's own caption does not name) to find the null; these {pairs} pairs give {null.size}"
            + (" (their captions all name the same tags)" if null.size == 0 else "")
            + ": give more pairs with varied captions, or calibrate on labelled data with --data")
    centre, scale = empirical_null(np.concatenate([own, null]))
    margin = null_margin(centre, scale, max_false_rate)
    share = float(np.mean(own >= margin))
    if share < MIN_SELECTED_SHARE:
        raise LabelFreeFitError(
            f"label-free fit refused: its margin {margin:.3g} selects {100 * share:.1f} % of the captions' own tags "
            f"(below {100 * MIN_SELECTED_SHARE:g} %), so the model would tag (almost) nothing; the null "
            f"({null.size} shuffled tags from {pairs} pairs) does not look like absent tags: give more pairs with "
            "varied captions, or calibrate on labelled data with --data")
    return LabelFreeFit(margin, max_false_rate, centre, scale, pairs, int(own.size), int(null.size),
                        share, prompt_sets[best], separations[best],
                        [(p, round(s, 4)) for p, s in zip(prompt_sets, separations)])

