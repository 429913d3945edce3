"""The single-writer lock: live owners refuse, dead or silent owners are taken over with a warning."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from clipscope.errors import StoreError
from clipscope.storage.location import Location
from clipscope.storage.lock import StaleLockWarning, acquire_lock

HOLDER = textwrap.dedent(
    """
    import sys
    from clipscope.storage.lock import acquire_lock
    with acquire_lock(sys.argv[1], owner="holder", heartbeat_every_s=0):
        print("locked", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    """
)


def _lock_record(url: str) -> dict | None:
    raw = Location(url).read_bytes("lock.json")
    return None if raw is None else json.loads(raw)


def test_live_owner_in_another_process_is_refused(tmp_path):
    url = str(tmp_path / "run.zarr")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=rf"locked by another writer: host '{socket.gethostname()}', pid {holder.pid} \(holder\)"):
            with acquire_lock(url):
                pass
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
    finally:
        holder.wait(timeout=30)
    assert _lock_record(url) is None
    with acquire_lock(url, owner="second", heartbeat_every_s=0):
        assert _lock_record(url)["owner"] == "second"


def test_dead_pid_on_this_host_is_taken_over_with_a_warning(tmp_path):
    url = str(tmp_path / "run.zarr")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"host": socket.gethostname(), "pid": dead.pid, "owner": "crashed", "started": time.time(),
             "heartbeat": time.time(), "token": "old"}
    Location(url).write_bytes_atomic(json.dumps(stale).encode(), "lock.json")
    with pytest.warns(StaleLockWarning, match=rf"pid {dead.pid} \(crashed\).*process {dead.pid} on this host is gone"):
        with acquire_lock(url, heartbeat_every_s=0) as lock:
            assert _lock_record(url)["token"] == lock.token != "old"
    assert _lock_record(url) is None


def test_other_host_is_stale_only_after_its_heartbeat_ages(tmp_path):
    url = f"file://{tmp_path / 'run.zarr'}"
    record = {"host": "elsewhere.invalid", "pid": 1, "owner": "remote", "started": time.time() - 50,
              "heartbeat": time.time() - 30, "token": "remote"}
    Location(url).write_bytes_atomic(json.dumps(record).encode(), "lock.json")
    with pytest.raises(StoreError, match="host 'elsewhere.invalid', pid 1 \\(remote\\)"):
        with acquire_lock(url, stale_after_s=60, heartbeat_every_s=0):
            pass
    with pytest.warns(StaleLockWarning, match="heartbeat is 3\\d s old \\(stale after 10 s\\)"):
        with acquire_lock(url, stale_after_s=10, heartbeat_every_s=0):
            assert _lock_record(url)["host"] == socket.gethostname()


def test_same_process_cannot_lock_twice_and_heartbeat_detects_takeover(tmp_path):
    url = "memory://clipscope-lock-tests/run.zarr"
    with acquire_lock(url, heartbeat_every_s=0) as lock:
        with pytest.raises(StoreError, match=f"pid {lock.record['pid']}"):
            with acquire_lock(url):
                pass
        before = _lock_record(url)["heartbeat"]
        time.sleep(0.01)
        lock.heartbeat()
        assert _lock_record(url)["heartbeat"] > before
        thief = dict(_lock_record(url), token="thief", pid=2, host="elsewhere.invalid")
        Location(url).write_bytes_atomic(json.dumps(thief).encode(), "lock.json")
        with pytest.raises(StoreError, match="lost the lock.*elsewhere.invalid"):
            lock.heartbeat()
    assert _lock_record(url)["token"] == "thief"  # release leaves a lock that is not ours alone
    Location(url).remove("lock.json")


def test_background_heartbeat_refreshes_the_lock(tmp_path):
    url = str(tmp_path / "run.zarr")
    with acquire_lock(url, heartbeat_every_s=0.02) as lock:
        first = _lock_record(url)["heartbeat"]
        deadline = time.monotonic() + 10
        while _lock_record(url)["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _lock_record(url)["heartbeat"] > first
        assert lock._thread is not None and lock._thread.is_alive()
    assert _lock_record(url) is None


def test_reused_pid_is_recognised_from_the_process_start_time(tmp_path):
    url = str(tmp_path / "run.zarr")
    import os

    reused = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": "1", "owner": "gone",
              "started": time.time(), "heartbeat": time.time(), "token": "old"}
    Location(url).write_bytes_atomic(json.dumps(reused).encode(), "lock.json")
    with pytest.warns(StaleLockWarning, match="now belongs to another process"):
        with acquire_lock(url, heartbeat_every_s=0):
            pass
