"""TTD: Text-Tag Self-Distillation for CLIP — tag images with every word of their captions that
they show, find those words' masks, fine-tune, export and serve.

>>> import ttd
>>> tagger = ttd.load()                                   # the embedded default model
>>> tagger.tag("examples/world/images/010002.png", "a yellow square").selected
['yellow', 'square']

`ttd.load` gives a `Tagger` (`tag`, `tag_vocabulary`, `segment`); `ttd.Job` and `ttd.run` run
the batch jobs of `ttd tag` and `ttd segment` (resume, shards, Ray) from Python; every error a
caller can cause is a `ttd.TTDError`. Names load on first use, so `import ttd` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["ImageInput", "Job", "JobSummary", "Segmentation", "TTDError", "TTDWarning", "TagResult", "Tagger",
           "UnfittedMarginWarning", "load", "run", "__version__"]

# name -> the module that defines it (imported on first access: PEP 562)
_LAZY = {
    "load": "ttd.api", "Tagger": "ttd.api", "TagResult": "ttd.api", "ImageInput": "ttd.api",
    "Segmentation": "ttd.segment.segmentation",
    "Job": "ttd.jobs.job", "run": "ttd.jobs.job", "JobSummary": "ttd.jobs.runner",
    "TTDError": "ttd.errors", "TTDWarning": "ttd.errors", "UnfittedMarginWarning": "ttd.runtime",
}

if TYPE_CHECKING:
    from ttd.api import ImageInput, Tagger, TagResult, load
    from ttd.errors import TTDError, TTDWarning
    from ttd.jobs.job import Job, run
    from ttd.jobs.runner import JobSummary
    from ttd.runtime import UnfittedMarginWarning
    from ttd.segment.segmentation import Segmentation


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ttd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
