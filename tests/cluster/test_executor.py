"""The public executor: local and Ray give the same bits, fan-out keeps item order, progress moves per
block and is quiet (one summary line) when stderr is not a terminal; open_executor picks the right one
and refuses bad or unreachable addresses with one line."""

from __future__ import annotations

import io
import logging
import random
import time

import numpy as np
import pytest

from clipscope.cluster.executor import Executor, LocalExecutor, RayExecutor, open_executor
from clipscope.cluster.progress import Progress
from clipscope.cluster.reduce import TreeBuilder, tree_combine
from clipscope.errors import ConfigError

N_BLOCKS = 13
PROGRESS_LOGGER = "clipscope.cluster.progress"


def block_sum(block: int) -> np.ndarray:
    """float32 partial sums: their combination is order-sensitive at the bit level. Sleeps a random
    (unseeded) while, so completion order varies from run to run."""
    time.sleep(random.uniform(0.0, 0.03))
    rng = np.random.default_rng(block)
    return (rng.standard_normal((40, 6)) * 10 ** rng.uniform(-3, 3)).astype(np.float32).sum(0, dtype=np.float32)


def add(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return left + right


def label(block: int) -> tuple[int, ...]:
    time.sleep(random.uniform(0.0, 0.02))
    return (block,)


def concat(left: tuple, right: tuple) -> tuple:
    return left + right


def square_late_first(item: int) -> int:
    time.sleep(0.01 * (6 - item))  # the first items finish last
    return item * item


class Recording(Progress):
    """A Progress that remembers every advance."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.advances: list[int] = []

    def advance(self, items: int, *, expected: int | None = None) -> None:
        self.advances.append(items)
        super().advance(items, expected=expected)


def recording(executor: Executor) -> list[Recording]:
    """Make `executor` hand out Recording progress displays; returns the list they are put in."""
    made: list[Recording] = []

    def progress(desc: str, unit: str) -> Recording:
        made.append(Recording(desc, unit=unit, display="off"))
        return made[-1]

    executor.progress = progress  # type: ignore[method-assign]
    return made


# ----------------------------------------------------------------------------------------------
# In this process


@pytest.mark.parametrize("fanin", [2, 3, 4, 5])
def test_tree_builder_builds_the_tree_of_tree_combine(fanin):
    def group(values):
        return "(" + " ".join(values) + ")"

    for n in range(1, 70):
        values = [str(i) for i in range(n)]
        builder = TreeBuilder(group, fanin)
        for value in values:
            builder.push(value)
        assert builder.finish() == tree_combine(values, group, fanin), n


def test_local_fan_out_keeps_item_order_and_progress_moves_per_item():
    executor = LocalExecutor()
    made = recording(executor)
    assert executor.fan_out(square_late_first, range(6), desc="squares", unit="items", sizes=[1, 2, 3, 4, 5, 6]) \
        == [0, 1, 4, 9, 16, 25]
    assert executor.fan_out(square_late_first, []) == []
    assert [p.desc for p in made] == ["squares"] and made[0].advances == [1, 2, 3, 4, 5, 6]


def test_progress_is_quiet_when_not_a_terminal_and_logs_one_summary(caplog):
    stream = io.StringIO()  # not a terminal
    executor = LocalExecutor(stream=stream)
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        total = executor.map_reduce(range(N_BLOCKS), block_sum, add, desc="sums", unit="img",
                                    sizes=[10] * N_BLOCKS)
    assert stream.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER]
    assert len(lines) == 1 and lines[0].startswith(f"sums: {10 * N_BLOCKS}/{10 * N_BLOCKS} img (100%)")
    assert total.dtype == np.float32


def test_progress_bar_on_a_terminal_shows_the_rate():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    LocalExecutor(stream=stream).map_reduce(range(4), block_sum, add, desc="sums", unit="img", sizes=[5] * 4)
    text = stream.getvalue()
    assert "sums" in text and "20/20" in text and "img/s" in text


@pytest.mark.parametrize("kwargs, message", [
    ({"sizes": [1, 2]}, r"sizes must hold one integer ≥ 0 per block \(3\)"),
    ({"sizes": [1, -1, 1]}, "sizes must hold one integer ≥ 0 per block"),
    ({"fanin": 1}, "fanin must be an integer ≥ 2, got 1"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LocalExecutor(progress="off").map_reduce(range(3), block_sum, add, **kwargs)


def test_bad_progress_display():
    with pytest.raises(ConfigError, match="progress must be one of auto, bar, log, off, got 'loud'"):
        LocalExecutor(progress="loud")


# ----------------------------------------------------------------------------------------------
# open_executor without Ray


def test_no_workers_no_address_no_ray_address_runs_in_this_process(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with open_executor() as executor:
        assert isinstance(executor, LocalExecutor) and not executor.is_ray
    assert not ray.is_initialized()


@pytest.mark.parametrize("workers, address, env, message", [
    (0, None, None, "workers must be an integer ≥ 1, got 0"),
    (True, None, None, "workers must be an integer ≥ 1, got True"),
    (None, "nonsense", None, "address must be auto, HOST:PORT or ray://HOST:10001, got 'nonsense'"),
    (None, "host:99999", None, "address must be auto, HOST:PORT or ray://HOST:10001"),
    (None, None, "http://127.0.0.1:8265",
     "RAY_ADDRESS must be auto, HOST:PORT or ray://HOST:10001, got 'http://127.0.0.1:8265' .an http address is the job API"),
])
def test_bad_workers_and_addresses_are_refused(monkeypatch, workers, address, env, message):
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    with pytest.raises(ConfigError, match=message):
        with open_executor(workers, address):
            pass


def unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_an_unreachable_address_is_one_line_naming_it(monkeypatch, form):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = form.format(port=unused_port())
    with pytest.raises(ConfigError) as caught:
        with open_executor(address=address):
            pass
    message = str(caught.value)
    assert f"cannot reach the Ray cluster at {address!r}" in message and "\n" not in message
    assert not ray.is_initialized()


# ----------------------------------------------------------------------------------------------
# On an embedded Ray (one per module)


@pytest.fixture(scope="module")
def on_ray(ray_local) -> RayExecutor:
    return RayExecutor(ray_local, progress="off")


def test_ray_equals_local_bit_for_bit_for_any_worker_count(on_ray):
    local = LocalExecutor(progress="off").map_reduce(range(N_BLOCKS), block_sum, add, fanin=3)
    runs = [on_ray.map_reduce(range(N_BLOCKS), block_sum, add, fanin=3),
            RayExecutor(progress="off", max_in_flight=1).map_reduce(range(N_BLOCKS), block_sum, add, fanin=3),
            RayExecutor(progress="off", cpus_per_task=2).map_reduce(range(N_BLOCKS), block_sum, add, fanin=3)]
    for remote in runs:
        assert remote.tobytes() == local.tobytes()
    # the order-sensitive reduction really depends on the tree: a plain left fold gives other bits
    folded = block_sum(0)
    for block in range(1, N_BLOCKS):
        folded = folded + block_sum(block)
    assert folded.tobytes() != local.tobytes()


def test_ray_keeps_block_order_and_progress_moves_per_block(on_ray):
    executor = RayExecutor(progress="off", max_in_flight=3)
    made = recording(executor)
    assert executor.map_reduce(range(N_BLOCKS), label, concat, desc="labels", unit="img",
                               sizes=list(range(N_BLOCKS))) == tuple(range(N_BLOCKS))
    assert len(made) == 1 and sorted(made[0].advances) == list(range(N_BLOCKS))
    assert made[0].snapshot().items_done == sum(range(N_BLOCKS))


def test_ray_fan_out_keeps_item_order(on_ray):
    executor = RayExecutor(progress="off")
    made = recording(executor)
    assert executor.fan_out(square_late_first, range(6), desc="squares") == [0, 1, 4, 9, 16, 25]
    assert sorted(made[0].advances) == [1] * 6


def test_open_executor_with_workers_reuses_a_running_ray(on_ray, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with open_executor(2) as executor:
        assert isinstance(executor, RayExecutor) and executor.runtime.mode == "reused"
        assert executor.workers == 2
