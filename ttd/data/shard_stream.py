"""Training batches streamed from webdataset shards (`ttd train --data 'shards/{000..099}.tar'`),
with no index of the samples: CC3M-scale data is read one sample at a time.

The stream is endless: epoch e reads every shard once, in an order drawn from (seed, e). Batch
`step` of rank `rank` is the samples at positions [(step·world + rank)·B, +B) of that stream, so
a run resumed at step s continues at its sample position (the samples before it are skipped
without being decoded) and sees exactly the batches the uninterrupted run would have seen.
A sample that cannot be used is skipped and counted, as with the indexed sources.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

import numpy as np

from ttd.errors import InputError, RuntimeProblem
from ttd.model.tags import CaptionError, bounded_tags
from ttd.runtime.images import ImageError, Preprocess
from ttd.data.inputs import Item
from ttd.data.items import shard_urls, stream_shards


class ShardStreamLoader:
    """`batch(step)` for steps in increasing order (as the trainer asks for them), from a stream."""

    def __init__(self, pattern: str, preprocess: Preprocess, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        self.urls = shard_urls(pattern)
        if not self.urls:
            raise InputError(f"no shards in {pattern!r}")
        self.preprocess = preprocess
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.skipped: list[str] = []
        self._stream: Iterator[Item] | None = None
        self._position = 0

    def _samples(self) -> Iterator[Item]:
        epoch = 0
        while True:
            count = 0
            for shard in np.random.default_rng([self.seed, epoch]).permutation(len(self.urls)):
                for item in stream_shards(self.urls[shard]):
                    count += 1
                    yield item
            if count == 0:
                raise InputError(f"no samples found in shards {self.urls[0]} ... {self.urls[-1]}")
            epoch += 1

    def items(self, step: int) -> list[Item]:
        """The undecoded samples of batch `step` (restarting the stream if asked for an earlier step)."""
        start = (step * self.world + self.rank) * self.batch_size
        if self._stream is None or start < self._position:
            self._stream, self._position = self._samples(), 0
        for _ in islice(self._stream, start - self._position):  # other ranks' samples, or a resume's past
            pass
        self._position = start + self.batch_size
        return list(islice(self._stream, self.batch_size))

    def batch(self, step: int) -> tuple[np.ndarray, list[str]]:
        images, captions = [], []
        for item in self.items(step):
            try:
                if item.error:
                    raise ImageError(item.error)
                if not item.caption or not item.caption.strip():
                    raise ImageError(f"{item.image}: empty caption")
                try:  # a 20,000-word caption, or one of stopwords only, is this sample's error, not the run's
                    if not bounded_tags(item.caption):
                        raise CaptionError("caption has no candidate tags (only stopwords or punctuation)")
                except CaptionError as error:
                    raise CaptionError(f"{item.image}: {error}") from None
                image = self.preprocess(item.data, item.image)
            except (ImageError, OSError, ValueError) as error:
                self.skipped.append(str(error))
                continue
            images.append(image)
            captions.append(item.caption)
        if len(images) < 2:
            raise RuntimeProblem(f"step {step}: fewer than 2 readable samples in the batch; last error: {self.skipped[-1:]}")
        return np.stack(images), captions
