"""Requests that arrive together share one forward pass.

Each request decodes its images in its own worker thread (in parallel with the others), then
hands the tensors to the `Batcher`: one thread runs the network, taking whatever requests are
waiting (up to `max_images`, after at most `max_wait` seconds for more to come) as one batch,
and gives each request its rows back. A forward that fails is retried request by request, so
only the request whose images break it gets the error.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

Forward = Callable[[list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class _Job:
    tensors: list[torch.Tensor]
    done: Future = field(default_factory=Future)


class Batcher:
    """`run(tensors)` from any thread: the forward's (probs, unknown) rows for those tensors.

    >>> batcher = Batcher(clf.forward)  # doctest: +SKIP
    >>> probs, unknown = batcher.run(clf.decode(images))
    """

    def __init__(self, forward: Forward, max_images: int = 32, max_wait: float = 0.004):
        self.forward, self.max_images, self.max_wait = forward, max_images, max_wait
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="graft-batcher", daemon=True)
        self.thread.start()

    def run(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not tensors:
            return self.forward([])
        job = _Job(tensors)
        self.jobs.put(job)
        return job.done.result()

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch, size = [first], len(first.tensors)
            while size < self.max_images:
                try:
                    nxt = self.jobs.get(timeout=self.max_wait)
                except queue.Empty:
                    break
                if nxt is None:
                    self.jobs.put(None)  # stop after this batch
                    break
                batch.append(nxt)
                size += len(nxt.tensors)
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        try:
            probs, unknown = self.forward([t for job in batch for t in job.tensors])
        except Exception as exc:  # one request's images broke the batch: find which, alone
            if len(batch) == 1:
                batch[0].done.set_exception(exc)
                return
            for job in batch:
                self._run([job])
            return
        start = 0
        for job in batch:
            end = start + len(job.tensors)
            rows = unknown[start:end] if unknown is not None else None
            job.done.set_result((probs[start:end], rows))
            start = end
