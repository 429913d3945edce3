"""A bounded queue of ready batches: input decoding on CPU threads, overlapped with the forward.

`prefetch_batches` reads a source of raw samples in a background thread, transforms each one
(decode, preprocess) on `threads` threads *in source order*, groups them into batches of
`batch_size` images and stacks each batch's images into one tensor — in page-locked (pinned)
memory when asked, so that the copy to a CUDA device can run asynchronously
(``images.to(device, non_blocking=True)``). While the consumer runs the forward of batch k, the
thread decodes batch k + 1, k + 2, ….

Bound (back-pressure): at most `depth` finished batches wait in the queue and one more is being
assembled or offered, and with `threads` > 1 at most `2 · threads − 1` more samples are being
transformed; the source is not read further until the consumer takes a batch. So samples read from the
source and not yet handed to the consumer never exceed `buffered_bound(batch_size, depth,
threads)`, however slow the consumer is.

A batch holds every sample the source gave between two full batches, in order (samples without an
image — a corrupt one — ride along in `items` and are not stacked); the last batch may hold fewer
images, or none. Exceptions of the source or of the transform are re-raised in the consumer.
Closing the iterator (or breaking out of a ``for`` loop over it) stops the thread, cancels pending
transforms and closes the source from that thread.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from clipscope.errors import ConfigError

R = TypeVar("R")
T = TypeVar("T")

_END = object()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


@dataclass(frozen=True)
class Batch(Generic[T]):
    """Consecutive samples of the source: `images` stacks the image of each item at `positions`."""

    items: list[T]
    images: Tensor | None
    positions: list[int]


def buffered_bound(batch_size: int, depth: int, threads: int = 1) -> int:
    """The most samples read from the source and not yet handed to the consumer (module docstring)."""
    return (depth + 1) * batch_size + (2 * threads - 1 if threads > 1 else 0)


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer ≥ 1, got {value!r}")
    return value


def prefetch_batches(
    source: Iterable[R],
    *,
    batch_size: int,
    depth: int = 2,
    transform: Callable[[R], T] | None = None,
    image_of: Callable[[T], Tensor | None] | None = None,
    threads: int = 1,
    pin_memory: bool = False,
) -> Iterator[Batch[T]]:
    """Batches of `source` (see the module docstring). `transform(raw)` → item (default: the raw
    sample itself); `image_of(item)` → its image tensor or None (default: the item itself)."""
    _positive("batch_size", batch_size)
    _positive("depth", depth)
    _positive("threads", threads)
    if pin_memory and not torch.cuda.is_available():
        raise ConfigError("pin_memory needs CUDA (page-locked memory serves host → GPU copies); torch sees none")
    batches = _batches(source, batch_size, transform or (lambda raw: raw), image_of or (lambda item: item), threads,
                       pin_memory)
    return _prefetched(batches, depth, "clipscope-prefetch-batches")


def _in_order(source: Iterable[R], transform: Callable[[R], T], threads: int) -> Generator[T, None, None]:
    """transform(raw) for every raw sample, in order; with threads > 1 up to 2·threads − 1 run ahead.
    Closing it cancels the transforms not yet started."""
    if threads == 1:
        for raw in source:
            yield transform(raw)
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="clipscope-decode")
    pending: deque[Future[T]] = deque()
    try:
        for raw in source:
            pending.append(pool.submit(transform, raw))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _batches(source, batch_size, transform, image_of, threads, pin_memory) -> Generator[Batch, None, None]:
    """The batches, assembled in the calling thread (`prefetch` runs this generator in its own)."""

    def finish(items: list, positions: list[int], images: list[Tensor]) -> Batch:
        stacked = None
        if images:
            stacked = torch.stack(images)
            if pin_memory:
                stacked = stacked.pin_memory()
        return Batch(items, stacked, positions)

    raw_source = iter(source)
    ordered = _in_order(raw_source, transform, threads)
    try:
        items: list = []
        positions: list[int] = []
        images: list[Tensor] = []
        for item in ordered:
            image = image_of(item)
            if image is not None:
                positions.append(len(items))
                images.append(image)
            items.append(item)
            if len(images) == batch_size:
                yield finish(items, positions, images)
                items, positions, images = [], [], []
        if items:
            yield finish(items, positions, images)
    finally:
        ordered.close()
        close = getattr(raw_source, "close", None)
        if close is not None:
            close()


def prefetch(iterable: Iterable[T], depth: int, *, thread_name: str = "clipscope-prefetch") -> Iterator[T]:
    """Iterate ``iterable`` in a background thread, keeping up to ``depth`` items ready.

    The thread starts at the first ``next``. Exceptions of the source are re-raised in the
    consumer. Closing the returned iterator (or dropping it, or breaking out of a ``for`` loop
    over it) stops the thread and closes the source from that thread.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"depth must be an integer ≥ 1, got {depth!r}")
    return _prefetched(iterable, depth, thread_name)


def _prefetched(iterable: Iterable[T], depth: int, thread_name: str) -> Generator[T, None, None]:
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(iterable)
        try:
            for item in source:
                if not offer(item):
                    return
            offer(_END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            offer(_Raised(exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=thread_name, daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()
