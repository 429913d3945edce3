"""The extraction's background chunk writer: order, back-pressure, errors, abandoning."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from clipscope.errors import ConfigError
from clipscope.pipelines.jobs.extract.writer import BackgroundWriter


def test_jobs_run_in_order_and_close_waits_for_all():
    done = []
    with BackgroundWriter(depth=2) as writer:
        for i in range(20):
            writer.submit(lambda i=i: done.append(i))
    assert done == list(range(20))


def test_submit_blocks_while_depth_jobs_wait():
    gate = threading.Event()
    started = threading.Event()
    writer = BackgroundWriter(depth=2)

    def first():
        started.set()
        gate.wait()

    writer.submit(first)
    assert started.wait(30)
    writer.submit(lambda: None)
    writer.submit(lambda: None)  # two wait behind the running one: the queue is full
    submitted = threading.Event()
    thread = threading.Thread(target=lambda: (writer.submit(lambda: None), submitted.set()))
    thread.start()
    time.sleep(0.2)
    assert not submitted.is_set()  # held back until a job leaves the queue
    gate.set()
    assert submitted.wait(30)
    thread.join()
    writer.close()


def test_an_error_stops_the_rest_and_is_raised_again_with_its_errno():
    done = []
    writer = BackgroundWriter(depth=4)

    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    writer.submit(lambda: done.append(0))
    writer.submit(full)
    writer.submit(lambda: done.append(2))
    with pytest.raises(OSError) as caught:
        writer.close()
    assert caught.value.errno == errno.ENOSPC and done == [0]
    with pytest.raises(ConfigError, match="submit after close"):
        writer.submit(lambda: None)


def test_a_later_submit_raises_an_earlier_failure():
    writer = BackgroundWriter(depth=1)
    writer.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        for _ in range(1000):  # the failure surfaces at the first submit after it happened
            writer.submit(lambda: None)
            time.sleep(0.01)
    writer.abandon()


def test_leaving_by_an_exception_drops_waiting_jobs_and_waits_for_the_running_one():
    gate, started = threading.Event(), threading.Event()
    done = []

    def slow():
        started.set()
        gate.wait()
        done.append("slow")

    with pytest.raises(RuntimeError, match="forward failed"):
        with BackgroundWriter(depth=3) as writer:
            writer.submit(slow)
            writer.submit(lambda: done.append("dropped"))
            assert started.wait(30)
            threading.Timer(0.1, gate.set).start()
            raise RuntimeError("forward failed")
    assert done == ["slow"]  # the running job finished before the block was left; the waiting one never ran


def test_depth_must_be_positive():
    with pytest.raises(ConfigError, match="depth must be an integer ≥ 1, got 0"):
        BackgroundWriter(depth=0)


def test_consecutive_runs_cover_the_rows_in_chunk_aligned_runs():
    import random

    from clipscope.pipelines.jobs.extract.job import consecutive_runs

    assert consecutive_runs([], 4) == []
    assert consecutive_runs([0, 1, 2, 3, 4, 5], 4) == [(0, 4), (4, 6)]
    assert consecutive_runs([1, 2, 4, 5, 6, 9], 8) == [(0, 2), (2, 5), (5, 6)]
    rng = random.Random(0)
    for _ in range(200):
        rows = sorted(rng.sample(range(40), rng.randint(1, 40)))
        rpc = rng.randint(1, 9)
        runs = consecutive_runs(rows, rpc)
        assert [i for lo, hi in runs for i in range(lo, hi)] == list(range(len(rows)))  # in order, no gap
        for lo, hi in runs:
            part = rows[lo:hi]
            assert part == list(range(part[0], part[0] + len(part))) and part[0] // rpc == part[-1] // rpc
        for (_, hi), (lo, _) in zip(runs, runs[1:]):  # maximal: a run ends only where it must
            assert rows[lo] != rows[hi - 1] + 1 or rows[lo] // rpc != rows[hi - 1] // rpc
