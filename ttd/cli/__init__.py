"""`ttd`: tag images, train, evaluate, export and serve TTD models. Thin: each command turns its
options into a job or config object and calls one library function; one module per command group."""

from ttd.cli import deploy, evaluation, segment, tag, train, world  # noqa: F401 - each registers its commands
from ttd.cli.common import main

__all__ = ["main"]
