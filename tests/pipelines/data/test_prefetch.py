"""The bounded batch prefetch queue: order, grouping, back-pressure, errors, closing."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from clipscope.errors import ConfigError
from clipscope.pipelines.data.prefetch import buffered_bound, prefetch, prefetch_batches


class CountingSource:
    """Yields 0..n-1 and counts how many the consumer side has pulled out of it."""

    def __init__(self, n: int):
        self.n = n
        self.taken = 0
        self.closed = False
        self.lock = threading.Lock()

    def __iter__(self):
        try:
            for i in range(self.n):
                with self.lock:
                    self.taken += 1
                yield i
        finally:
            self.closed = True


def image(i: int) -> torch.Tensor:
    return torch.full((2, 2), float(i))


def wait_until(condition, seconds: float = 30.0) -> bool:
    """Poll `condition` (the producer thread runs on its own); False if it never held."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.mark.parametrize("threads", [1, 3])
def test_batches_keep_source_order_and_group_by_images(threads):
    # Every 4th sample has no image: it rides along in `items` and does not count toward a batch.
    source = CountingSource(23)
    batches = list(prefetch_batches(source, batch_size=5, depth=2, threads=threads,
                                    transform=lambda i: (i, None if i % 4 == 3 else image(i)),
                                    image_of=lambda item: item[1]))
    items = [item for b in batches for item in b.items]
    assert [i for i, _ in items] == list(range(23))
    for b in batches[:-1]:
        assert len(b.positions) == 5 and b.images.shape == (5, 2, 2)
        assert b.items[-1][1] is not None  # a full batch ends on the image that fills it
    for b in batches:
        expected = [b.items[p][0] for p in b.positions]
        assert all(b.items[p][1] is not None for p in b.positions)
        assert b.images[:, 0, 0].tolist() == [float(i) for i in expected]
    assert sum(len(b.positions) for b in batches) == 23 - 5  # 3, 7, 11, 15, 19 have none
    assert source.closed


def test_a_batch_without_images_is_still_delivered():
    batches = list(prefetch_batches(range(3), batch_size=4, image_of=lambda item: None))
    assert len(batches) == 1 and batches[0].items == [0, 1, 2] and batches[0].images is None


@pytest.mark.parametrize("threads", [1, 2])
def test_a_slow_consumer_never_has_more_than_the_bound_read_ahead(threads):
    batch_size, depth = 4, 2
    bound = buffered_bound(batch_size, depth, threads)
    source = CountingSource(200)
    consumed = 0
    ahead = []
    batches = prefetch_batches(source, batch_size=batch_size, depth=depth, threads=threads,
                               transform=image, image_of=lambda t: t)
    for batch in batches:
        consumed += len(batch.items)
        if consumed <= 40:
            # The consumer dawdles: the producer fills the queue and then must stop reading.
            reached = wait_until(lambda: source.taken - consumed >= bound)
            ahead.append(source.taken - consumed)
            assert reached, f"the producer stopped at {source.taken - consumed} ahead, below the bound {bound}"
            time.sleep(0.05)  # had it not stopped, it would now be past the bound
        ahead.append(source.taken - consumed)
        assert source.taken - consumed <= bound
    assert consumed == 200 and max(ahead) == bound


def test_errors_of_the_source_and_of_the_transform_reach_the_consumer():
    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetch_batches(broken(), batch_size=1, transform=image, image_of=lambda t: t))

    def transform(i):
        if i == 5:
            raise ValueError("bad sample 5")
        return image(i)

    with pytest.raises(ValueError, match="bad sample 5"):
        list(prefetch_batches(range(10), batch_size=2, threads=3, transform=transform, image_of=lambda t: t))


@pytest.mark.parametrize("threads", [1, 3])
def test_closing_early_stops_the_thread_and_closes_the_source(threads):
    def prefetchers():
        return {t for t in threading.enumerate() if t.name.startswith("clipscope-prefetch-batches") and t.is_alive()}

    before = prefetchers()
    source = CountingSource(10_000)
    batches = prefetch_batches(source, batch_size=2, depth=1, threads=threads, transform=image,
                               image_of=lambda t: t)
    first = next(batches)
    assert first.images.shape == (2, 2, 2)
    batches.close()
    assert source.closed and source.taken <= buffered_bound(2, 1, threads) + 2
    assert prefetchers() <= before


def test_bad_arguments_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="batch_size must be an integer ≥ 1, got 0"):
        prefetch_batches(range(3), batch_size=0)
    with pytest.raises(ConfigError, match="threads must be an integer ≥ 1"):
        prefetch_batches(range(3), batch_size=1, threads=0)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="pin_memory needs CUDA"):
            prefetch_batches(range(3), batch_size=1, pin_memory=True)


# the generic one-item prefetch under the batches (also the training loops')

def test_prefetch_preserves_order_and_propagates_errors():
    assert list(prefetch(range(50), 3)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("source broke")

    it = prefetch(failing(), 2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="source broke"):
        next(it)
    with pytest.raises(ConfigError, match="depth"):
        prefetch([], 0)


def test_prefetch_early_stop_closes_source_and_thread():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    before = {t.ident for t in threading.enumerate()}
    it = prefetch(endless(), 2)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    it.close()
    assert closed.is_set()
    assert not [t for t in threading.enumerate() if t.name == "clipscope-prefetch" and t.ident not in before]
