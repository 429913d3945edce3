"""Progress: counts, corrected totals, rate and ETA on a fake clock; log lines, bar and silence."""

from __future__ import annotations

import io
import logging

import pytest

from clipscope.cluster.progress import Progress, format_duration
from clipscope.errors import ConfigError

LOGGER = "clipscope.cluster.progress"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_counts_totals_rate_and_eta_follow_the_tasks():
    clock = FakeClock()
    progress = Progress(display="off", clock=clock)
    progress.start(items_total=400, tasks_total=4)
    clock.now += 10
    progress.advance(90, expected=100)  # a shard decoded 10 fewer images than planned
    progress.retry()
    clock.now += 10
    progress.fail(expected=100)
    snap = progress.snapshot()

    assert (snap.items_done, snap.items_total) == (90, 290)
    assert (snap.tasks_done, snap.tasks_failed, snap.tasks_total, snap.retries) == (1, 1, 4, 1)
    assert snap.elapsed_s == 20
    assert snap.items_per_s == pytest.approx(4.5)
    assert snap.eta_s == pytest.approx(200 / 4.5)


def test_rate_and_eta_are_unknown_before_the_first_item():
    clock = FakeClock()
    progress = Progress(display="off", clock=clock)
    progress.start(items_total=10, tasks_total=1)
    clock.now += 5
    snap = progress.snapshot()
    assert snap.items_per_s is None and snap.eta_s is None


def test_log_mode_writes_a_line_per_interval_and_a_final_one(caplog):
    clock = FakeClock()
    progress = Progress("extract", display="log", log_interval_s=30, clock=clock)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        progress.start(items_total=300, tasks_total=3)
        clock.now += 10
        progress.advance(100, expected=100)  # 10 s: no line yet
        assert caplog.records == []
        clock.now += 25
        progress.tick()  # 35 s: one line
        clock.now += 5
        progress.advance(100, expected=100)  # 40 s: within the interval of the last line
        progress.close()
        progress.close()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("extract: 100/300 img (33%), 2.9 img/s, ETA 1m10s, elapsed 35s")
    assert lines[1].startswith("extract: 200/300 img (67%), 5.0 img/s, ETA 20s, elapsed 40s")
    assert lines[1].endswith("tasks 2/3 done, 0 failed, 0 retried")


def test_auto_mode_logs_when_the_stream_is_not_a_terminal_and_off_is_silent(caplog):
    assert Progress(stream=io.StringIO()).mode == "log"
    quiet = Progress(enabled=False, log_interval_s=0)
    assert quiet.mode == "off"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        quiet.start(5, 1)
        quiet.advance(5)
        quiet.close()
    assert caplog.records == []


def test_bar_mode_draws_a_tqdm_bar_on_the_stream():
    stream = io.StringIO()
    with Progress("extract", display="bar", stream=stream) as progress:
        progress.start(items_total=10, tasks_total=2)
        progress.advance(4, expected=5)
        progress.fail(expected=5)
    text = stream.getvalue()
    assert "extract" in text and "4/4" in text and "failed=1" in text


def test_format_duration():
    assert [format_duration(s) for s in (None, 4.4, 65, 3723)] == ["?", "4s", "1m05s", "1h02m03s"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"display": "fancy"}, "display must be one of"),
        ({"log_interval_s": -1}, "log_interval_s must be a number ≥ 0, got -1"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Progress(**kwargs)


def test_negative_counts_are_refused():
    progress = Progress(display="off")
    progress.start(3, 1)
    with pytest.raises(ConfigError, match="items must be an integer ≥ 0, got -1"):
        progress.advance(-1)
