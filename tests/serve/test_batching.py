"""Requests that arrive together share one forward; a forward that fails fails only the request
whose images break it."""

from __future__ import annotations

import threading
import time

import torch

from graft.serve.batching import Batcher


def _forward(calls: list[int]):
    """A network that sums each image's pixels (so every row says whose image it was), slowly,
    refusing images that hold NaN."""

    def forward(tensors):
        calls.append(len(tensors))
        time.sleep(0.05)
        x = torch.stack(tensors)
        if torch.isnan(x).any():
            raise ValueError("NaN in the batch")
        sums = x.flatten(1).sum(1, keepdim=True)
        return sums, sums[:, 0] * 10

    return forward


def _requests(batcher: Batcher, images: list[list[torch.Tensor]]) -> list:
    out: list = [None] * len(images)

    def ask(i: int) -> None:
        try:
            out[i] = batcher.run(images[i])
        except ValueError as exc:
            out[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_requests_arriving_together_share_a_forward_and_get_their_own_rows():
    calls: list[int] = []
    batcher = Batcher(_forward(calls), max_images=64, max_wait=0.02)
    images = [[torch.full((2,), float(10 * i + j)) for j in range(i % 3 + 1)] for i in range(12)]
    try:
        out = _requests(batcher, images)
    finally:
        batcher.close()
    for request, (probs, unknown) in zip(images, out):
        assert probs[:, 0].tolist() == [2 * t[0].item() for t in request]
        assert unknown.tolist() == [20 * t[0].item() for t in request]
    assert sum(calls) == sum(map(len, images)) and len(calls) < len(images)


def test_a_forward_that_fails_fails_only_the_request_that_broke_it():
    calls: list[int] = []
    batcher = Batcher(_forward(calls), max_images=64, max_wait=0.05)
    images = [[torch.ones(2)], [torch.tensor([float("nan"), 1.0])], [torch.zeros(2)]]
    try:
        out = _requests(batcher, images)
    finally:
        batcher.close()
    assert isinstance(out[1], ValueError) and str(out[1]) == "NaN in the batch"
    assert out[0][0].tolist() == [[2.0]] and out[2][0].tolist() == [[0.0]]


def test_a_batch_stays_within_its_size():
    calls: list[int] = []
    batcher = Batcher(_forward(calls), max_images=4, max_wait=0.05)
    try:
        _requests(batcher, [[torch.ones(2)] * 3 for _ in range(4)])
    finally:
        batcher.close()
    assert max(calls) <= 6 and sum(calls) == 12  # a request is never split: 3 + 3 at most


def test_no_images_no_wait():
    batcher = Batcher(lambda t: (torch.zeros(len(t), 2), None))
    try:
        probs, unknown = batcher.run([])
    finally:
        batcher.close()
    assert probs.shape == (0, 2) and unknown is None
