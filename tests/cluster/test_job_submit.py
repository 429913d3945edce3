"""`clipscope extract` under `ray job submit` on a token-protected local head (slow).

A head is started with `ray start --head --block` in its own session (process group) with its own
temp dir and free ports, token authentication on (RAY_AUTH_MODE=token) and a fresh token that only
this test's processes hold (RAY_AUTH_TOKEN; ~/.ray/auth_token is neither read nor written). The job
runs the CLI unchanged: the job supervisor sets RAY_ADDRESS, so the CLI joins the head ("cluster"
mode) and runs two actors there. The store must equal the in-process run's.

Teardown kills that process group only (SIGTERM, then SIGKILL): `ray stop` would also stop every
other Ray on this machine, the embedded ones of other test modules included.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from clipscope.pipelines.jobs.extract.job import run_extract

from test_extract_on_ray import MODEL, ROWS_PER_CHUNK, assert_same_store, make_config, write_shards

HEAD_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300
CLI_TIMEOUT_S = 120
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def ray_cli(env: dict[str, str], *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    ray = str(Path(sys.executable).with_name("ray"))
    return subprocess.run([ray, *args], env=env, capture_output=True, text=True, timeout=timeout)


def job_status(env: dict[str, str], address: str, job_id: str) -> str | None:
    """The job's state as `ray job status` words it (terminal states get a sentence of their own)."""
    done = ray_cli(env, "job", "status", "--address", address, "--log-style", "record", "--log-color", "false",
                   job_id)
    text = done.stdout + done.stderr
    for pattern, state in ((f"Job '{job_id}' succeeded", "SUCCEEDED"), (f"Job '{job_id}' failed", "FAILED"),
                           (f"Job '{job_id}' was stopped", "STOPPED")):
        if pattern in text:
            return state
    found = re.search(rf"Status for job '{re.escape(job_id)}': (\w+)", text)
    return found.group(1) if found else None


def stop_process_group(head: subprocess.Popen) -> None:
    """SIGTERM the head's process group, then SIGKILL what is left (its shutdown can hang)."""
    if head.poll() is None:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=20)


@pytest.fixture
def token_head(tmp_path):
    """A 2-CPU head with token auth and a dashboard on 127.0.0.1; yields (dashboard URL, client env)."""
    # Ray's unix socket paths must stay short: its temp dir goes directly under /tmp, not in tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
    dashboard_port = free_port()
    env = {name: value for name, value in os.environ.items() if name not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
               # One thread everywhere (driver and actors), as in the in-process reference run.
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    ray = str(Path(sys.executable).with_name("ray"))
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--num-cpus", "2", "--object-store-memory", str(200 * 1024 * 1024),
         "--port", str(free_port()), "--ray-client-server-port", str(free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
         "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited with {head.returncode}:\n{(tmp_path / 'head.log').read_text()}")
            listed = ray_cli(env, "job", "list", "--address", address, timeout=60)
            if listed.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the head's job API at {address} did not answer within {HEAD_START_TIMEOUT_S}s:\n"
                                   f"{listed.stderr[-2000:]}")
            time.sleep(2)
        yield address, env
    finally:
        stop_process_group(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_cli_extraction_submitted_as_a_ray_job_writes_the_in_process_store(token_head, one_thread, tmp_path,
                                                                          monkeypatch):
    address, env = token_head
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    shards = write_shards(tmp_path / "shards")
    reference = make_config(shards, tmp_path / "local.zarr")
    assert run_extract(reference, progress_display="off").ok

    # The job API refuses a client without the cluster's token.
    wrong = ray_cli({**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}, "job", "list", "--address", address)
    assert wrong.returncode != 0 and "Invalid authentication token" in wrong.stderr

    store = tmp_path / "job.zarr"
    job_id = f"clipscope-extract-{secrets.token_hex(4)}"
    submitted = ray_cli(
        env, "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait", "--",
        sys.executable, "-m", "clipscope.pipelines.cli", "extract", *shards, "--out", str(store), "--model", MODEL,
        "--workers", "2", "--rows-per-chunk", str(ROWS_PER_CHUNK), "--batch-size", "4",
        "--second-order-layers", "1", "--token-layers", "3", "--device", "cpu", "--progress", "log")
    assert submitted.returncode == 0, submitted.stderr[-3000:]

    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        status = job_status(env, address, job_id)
        if status in TERMINAL_STATES:
            break
        time.sleep(2)
    logs = ray_cli(env, "job", "logs", "--address", address, job_id).stdout
    assert status == "SUCCEEDED", f"job {job_id} ended {status}:\n{logs[-3000:]}"
    assert f"{len(shards)} shards extracted, 0 already done, 0 failed" in logs, logs[-3000:]
    # The job's CLI joined this head (RAY_ADDRESS from the job supervisor) and ran its two actors there.
    listed = ray_cli(env, "list", "actors", "--address", address, "--filter", "class_name=_PoolActor",
                     "--format", "json", "--detail")
    assert listed.returncode == 0, listed.stderr[-2000:]
    actors = json.loads(listed.stdout)
    assert len(actors) == 2 and len({actor["job_id"] for actor in actors}) == 1
    assert all(actor["required_resources"] == {"CPU": 1.0} for actor in actors)
    assert_same_store(str(store), reference.out)
