"""A label-free guard against the caption-mask collapse (docs/training.md).

The criterion compares two quantities that training has without labels, over the pairs of a
step that have a selection:
- the share of pixels where the caption mask M_c ≥ θ (what the model says the caption names);
- the evidence area: the share of pixels whose nearest candidate tag (argmax of the cosine,
  free of the mask head's w and b) is a selected tag (what the image-level evidence supports).

ratio = caption share / evidence share, smoothed over steps. A healthy run keeps it near 1 (the
base starts near 1.2, good runs end 0.6-1.0); the collapse takes it to 0.2 while the distill
loss falls. Outside [low, high] the guard flags the run (one line, recorded in
train_config.json) and the run keeps its last checkpoint inside the band instead of the last one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

GUARD_LOW, GUARD_HIGH = 0.5, 2.0  # caption mask below half / above twice the evidenced area
GUARD_SMOOTHING = 0.1  # weight of a new step in the moving average (about 10 steps)
GUARD_WARMUP = 20  # steps before the first decision: the average needs them
GUARD_EVERY = 10  # steps between snapshots of the trainable weights


@dataclass
class GuardReport:
    """What train_config.json records under `collapse_guard`."""

    flagged: bool = False
    first_flagged_step: int | None = None
    kept_step: int | None = None  # the step of the kept weights when they are not the last
    final_ratio: float | None = None
    kept_ratio: float | None = None
    band: tuple[float, float] = (GUARD_LOW, GUARD_HIGH)
    message: str = ""
    restarted_step: int | None = None  # the step after which the run went on from a snapshot (`restart`)
    restarted_from: int | None = None  # that snapshot's step

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class CollapseGuard:
    """Feed it every step's diagnostics (`observe`); `snapshot` keeps the trainable weights of the
    latest in-band step; `restore` puts them back when the run ends out of band."""

    low: float = GUARD_LOW
    high: float = GUARD_HIGH
    smoothing: float = GUARD_SMOOTHING
    warmup: int = GUARD_WARMUP
    every: int = GUARD_EVERY
    caption: float | None = None
    evidence: float | None = None
    steps_seen: int = 0
    report: GuardReport = field(default_factory=GuardReport)
    _kept: list[torch.Tensor] | None = None
    _kept_step: int | None = None
    _kept_ratio: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.caption is None or not self.evidence:
            return None
        return self.caption / self.evidence

    def in_band(self) -> bool:
        ratio = self.ratio
        return ratio is None or self.low <= ratio <= self.high

    def keep_initial(self, params: list[torch.nn.Parameter], step: int = 0) -> None:
        """The weights the run starts from, kept as the first snapshot: a run that collapses before
        the guard's first decision (warm-up) then ends with them, never with the collapsed ones."""
        if self._kept is None:
            self._kept = [p.detach().clone() for p in params]
            self._kept_step, self._kept_ratio = step, None

    def observe(self, step: int, logs: dict[str, float], params: list[torch.nn.Parameter]) -> str | None:
        """Update the averages with one step; returns the one line to print when the run first
        leaves the band, else None."""
        if "caption_above" not in logs or "evidence_area" not in logs:
            return None
        a = self.smoothing
        self.caption = logs["caption_above"] if self.caption is None else (1 - a) * self.caption + a * logs["caption_above"]
        self.evidence = logs["evidence_area"] if self.evidence is None else (1 - a) * self.evidence + a * logs["evidence_area"]
        self.steps_seen += 1
        self.report.final_ratio = round(self.ratio, 4) if self.ratio is not None else None
        if self.steps_seen < self.warmup:
            return None
        if self.in_band():
            if (step + 1) % self.every == 0:
                self._kept = [p.detach().clone() for p in params]
                self._kept_step, self._kept_ratio = step + 1, self.ratio
            return None
        if self.report.flagged:
            return None
        self.report.flagged, self.report.first_flagged_step = True, step
        direction = "shrank" if self.ratio < self.low else "grew"
        self.report.message = (
            f"collapse guard: at step {step} the caption masks {direction} away from the image-level evidence "
            f"(mask ≥ θ on {100 * self.caption:.0f} % of pixels, the selected tags win {100 * self.evidence:.0f} %: "
            f"ratio {self.ratio:.2f} outside [{self.low}, {self.high}]); the run will keep its last checkpoint "
            "inside the band unless it recovers")
        return self.report.message

    def state_dict(self) -> dict:
        """What a resumed run needs to decide as the uninterrupted one would (saved in last.pt)."""
        return {"caption": self.caption, "evidence": self.evidence, "steps_seen": self.steps_seen,
                "report": {k: list(v) if isinstance(v, tuple) else v for k, v in self.report.as_dict().items()},
                "kept": self._kept, "kept_step": self._kept_step, "kept_ratio": self._kept_ratio}

    def load_state_dict(self, state: dict) -> None:
        self.caption, self.evidence, self.steps_seen = state["caption"], state["evidence"], state["steps_seen"]
        self.report = GuardReport(**{**state["report"], "band": tuple(state["report"]["band"])})
        self._kept, self._kept_step, self._kept_ratio = state["kept"], state["kept_step"], state["kept_ratio"]

    def restart(self, step: int, params: list[torch.nn.Parameter]) -> str:
        """Once, after the first flag: put the last healthy snapshot back into `params` and start
        the averages afresh (a new warm-up), so that the run goes on from the snapshot; the
        caller lowers the learning rate (docs/training.md, "Segmentation too": restart). The
        report stays flagged. Returns the line to print."""
        with torch.no_grad():
            for p, kept in zip(params, self._kept):
                p.copy_(kept)
        self.report.restarted_step, self.report.restarted_from = step, self._kept_step
        self.caption = self.evidence = None
        self.steps_seen = 0
        return f"collapse guard: went back to the weights of step {self._kept_step} after step {step}"

    def restore(self, params: list[torch.nn.Parameter]) -> GuardReport:
        """At the end of the run: put back the weights of the latest in-band step when the run
        ends out of band (and one was kept); the report says what was kept."""
        if self.report.flagged and not self.in_band() and self._kept is not None:
            with torch.no_grad():
                for p, kept in zip(params, self._kept):
                    p.copy_(kept)
            self.report.kept_step = self._kept_step
            self.report.kept_ratio = None if self._kept_ratio is None else round(self._kept_ratio, 4)
        return self.report
