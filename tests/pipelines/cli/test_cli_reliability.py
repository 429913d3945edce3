"""Environment and file-system faults give one line and a documented exit code, never a traceback,
and the lesser reliability points: --device cuda without CUDA, SIGTERM, the stale lock,
`status --verify`, export destinations, one retry policy."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from clipscope.storage.store import RunStore


class exit_codes:  # noqa: N801 - the README's table, pinned here (clipscope.pipelines.cli.exit_codes)
    BAD_INPUT, ENVIRONMENT, CORRUPT, OUTPUT_CLOSED, TERMINATED = 2, 4, 5, 141, 143

from extract_helpers import TINY_MODEL, extract_args, run_cli, write_tiny_shards


def read_only_file_system(monkeypatch) -> None:
    """Make every statvfs report a read-only file system (what a read-only mount shows)."""
    from clipscope.storage import location

    real = os.statvfs

    class ReadOnly:
        def __init__(self, path):
            self._stat = real(path)

        def __getattr__(self, name):
            return os.ST_RDONLY if name == "f_flag" else getattr(self._stat, name)

    monkeypatch.setattr(location.os, "statvfs", ReadOnly)


def error_line(capsys, command: str) -> str:
    """The one error line of a command; no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"clipscope {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture()
def shards(tmp_path):
    return write_tiny_shards(tmp_path / "shards", (3, 2), seed=8)


@pytest.fixture()
def finished(shards, tmp_path, fast_models):
    store = str(tmp_path / "store.zarr")
    assert run_cli(*extract_args(shards.paths, store)) == 0
    return store


def cli(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipscope.pipelines.cli", *map(str, argv)],
                          capture_output=True, text=True, **kwargs)


# ----------------------------------------------------------------------------------------------
# --out and other output paths: checked before any work


def test_out_at_a_file_is_refused_before_anything_is_loaded(shards, tmp_path, capsys, monkeypatch):
    from clipscope.pipelines.jobs.extract import job

    monkeypatch.setattr(job, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert run_cli(*extract_args(shards.paths, a_file)) == exit_codes.BAD_INPUT
    assert f"--out {a_file} is a file" in error_line(capsys, "extract")
    assert run_cli(*extract_args(shards.paths, a_file / "store.zarr")) == exit_codes.BAD_INPUT
    assert f"{a_file} is a file, not a folder" in error_line(capsys, "extract")


def test_out_on_a_read_only_file_system_is_an_environment_fault(shards, tmp_path, capsys, monkeypatch):
    read_only_file_system(monkeypatch)
    out = tmp_path / "store.zarr"
    assert run_cli(*extract_args(shards.paths, out)) == exit_codes.ENVIRONMENT
    assert "is read-only; write elsewhere" in error_line(capsys, "extract")
    assert not out.exists()


def test_a_full_disk_stops_the_run_with_one_line_and_releases_the_lock(shards, tmp_path, capsys, monkeypatch,
                                                                      fast_models):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.url, "image_embedding", "c"))

    monkeypatch.setattr(RunStore, "write_rows", full)
    out = tmp_path / "store.zarr"
    assert run_cli(*extract_args(shards.paths, out)) == exit_codes.ENVIRONMENT
    line = error_line(capsys, "extract")
    assert "No space left on device" in line and str(out) in line and "free space" in line and "resume" in line
    assert not (out / "lock.json").exists()
    records = RunStore.open(str(out), "r").shard_records(stage="extract")
    assert records == {}  # no shard was given up as failed: the machine, not the data, was at fault
    monkeypatch.undo()


@pytest.mark.skipif(__import__("importlib").util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_s3_without_s3fs_names_the_url_and_the_package(shards, tmp_path, capsys):
    assert run_cli(*extract_args(shards.paths, "s3://bucket/run")) == exit_codes.BAD_INPUT
    line = error_line(capsys, "extract")
    assert "s3://bucket/run" in line and "s3fs" in line
    assert run_cli(*extract_args(["s3://bucket/shards/000.tar"], tmp_path / "s.zarr")) == exit_codes.BAD_INPUT
    line = error_line(capsys, "extract")
    assert "cannot read shard s3://bucket/shards/000.tar" in line and "s3fs" in line
    assert run_cli("status", "s3://bucket/run") == exit_codes.BAD_INPUT
    assert "s3fs" in error_line(capsys, "status")


def test_a_bad_local_dir_model_is_named(shards, tmp_path, capsys):
    args = extract_args(shards.paths, tmp_path / "s.zarr")
    args[args.index(TINY_MODEL)] = f"local-dir:{tmp_path / 'nowhere'}"
    assert run_cli(*args) == exit_codes.BAD_INPUT
    assert f"local-dir:{tmp_path / 'nowhere'}: no such folder" in error_line(capsys, "extract")


def test_textspan_csv_into_a_missing_folder_fails_before_the_work(finished, tmp_path, capsys, monkeypatch):
    from clipscope.pipelines.cli import textspan

    monkeypatch.setattr(textspan, "run", lambda args: pytest.fail("textspan ran"))
    target = tmp_path / "missing" / "out.csv"
    assert run_cli("textspan", finished, "--csv", target) == exit_codes.BAD_INPUT
    assert f"{target}: its folder does not exist; create {target.parent} first" in error_line(capsys, "textspan")


def test_status_into_a_closed_pipe_exits_quietly(finished):
    proc = subprocess.Popen([sys.executable, "-m", "clipscope.pipelines.cli", "status", finished],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone, as after `| head -0`
    err = proc.stderr.read().decode()
    assert proc.wait() == exit_codes.OUTPUT_CLOSED
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_device_cuda_without_cuda_fails_before_the_store_exists(shards, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "store.zarr"
    assert run_cli(*extract_args(shards.paths, out, "--device", "cuda")) == exit_codes.BAD_INPUT
    assert "--device cuda" in error_line(capsys, "extract")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# export destinations


def test_export_refuses_an_existing_path_unless_overwrite(finished, tmp_path, capsys):
    dest = tmp_path / "rows.parquet"
    dest.write_bytes(b"precious")
    assert run_cli("query", finished, "export", "--rows", "0", "1", "--to", dest) == exit_codes.BAD_INPUT
    assert "exists; pass --overwrite" in error_line(capsys, "query")
    assert dest.read_bytes() == b"precious"
    assert run_cli("query", finished, "export", "--rows", "0", "1", "--to", dest, "--overwrite") == 0
    assert dest.read_bytes() != b"precious"


@pytest.mark.parametrize("inside", ["samples.parquet", "exported.parquet", "direct/rows", "npy"])
def test_export_never_writes_inside_a_store(inside, finished, capsys):
    before = open(os.path.join(finished, "samples.parquet"), "rb").read()
    dest = os.path.join(finished, inside)
    assert run_cli("query", finished, "export", "--rows", "0", "--to", dest, "--overwrite") == exit_codes.BAD_INPUT
    assert "inside the run store" in error_line(capsys, "query")
    assert open(os.path.join(finished, "samples.parquet"), "rb").read() == before
    assert not os.path.exists(os.path.join(finished, "exported.parquet"))


# ----------------------------------------------------------------------------------------------
# SIGTERM, the stale lock


SLOW_EXTRACT = textwrap.dedent("""
    import sys, time
    from clipscope.pipelines.jobs.extract import job

    def stuck(self, task):
        print("processing", flush=True)
        time.sleep(120)

    job.ShardExtractor.process = stuck
    sys.argv = ["clipscope", *sys.argv[1:]]
    from clipscope.pipelines.cli import entry
    entry()
""")


def test_sigterm_is_handled_like_sigint(shards, tmp_path):
    out = tmp_path / "store.zarr"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXTRACT, *extract_args(shards.paths, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "processing"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == exit_codes.TERMINATED, err
    assert "terminated (SIGTERM); rerun the same command to resume" in err and "Traceback" not in err
    assert not (out / "lock.json").exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_dead_lock(store: str) -> int:
    pid = dead_pid()
    with open(os.path.join(store, "lock.json"), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": pid, "owner": "clipscope extract", "started": 1.0,
                   "heartbeat": 1.0, "token": "dead"}, f)
    return pid


def test_a_dead_owner_is_shown_stale_and_its_lock_is_taken_over_with_one_warning(finished, shards, capsys):
    pid = plant_dead_lock(finished)
    assert run_cli("status", finished) == 0
    text = capsys.readouterr().out
    assert f"lock       stale: left by host {socket.gethostname()!r} pid {pid}" in text and "held by" not in text
    assert run_cli("status", finished, "--json") == 0
    lock = json.loads(capsys.readouterr().out)["lock"]
    assert lock["state"] == "stale" and "is gone" in lock["stale_reason"]
    result = cli(*extract_args(shards.paths, finished))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("taking over the lock") == 1, result.stderr


# ----------------------------------------------------------------------------------------------
# status --verify


def test_status_verify_finds_a_corrupted_chunk(finished, capsys):
    assert run_cli("status", finished, "--verify") == 0
    assert "verify: 2 done shard(s) checked, 0 corrupted" in capsys.readouterr().out
    import zarr

    array = zarr.open_array(os.path.join(finished, "image_embedding"), mode="r+")
    values = np.asarray(array[4:5])
    array[4:5] = values + 1  # row 4: shard 1's first row (3 samples → rows 0–3 are shard 0's)
    assert run_cli("status", finished, "--verify") == exit_codes.CORRUPT
    text = capsys.readouterr().out
    assert "1 corrupted" in text and "corrupted extract shard 1" in text and "rows 4–7 (chunks 1–1)" in text
    assert run_cli("status", finished, "--verify", "--json") == exit_codes.CORRUPT
    corrupt = json.loads(capsys.readouterr().out)["verify"]["corrupt"]
    assert [c["index"] for c in corrupt] == [1] and corrupt[0]["chunks"] == [1, 1]


def test_status_verify_reports_a_chunk_that_no_longer_decodes(finished, capsys):
    chunk_dir = os.path.join(finished, "image_embedding", "c")
    chunks = sorted(os.path.join(d, f) for d, _, fs in os.walk(chunk_dir) for f in fs)
    with open(chunks[0], "r+b") as f:
        f.write(b"\x00garbage\x00" * 4)
    assert run_cli("status", finished, "--verify") == exit_codes.CORRUPT
    assert "corrupted extract shard 0" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# One retry policy, in-process as on Ray


def test_retry_decision_is_one_policy():
    from clipscope.cluster.shard_pool import MAX_ATTEMPTS, retry_decision
    from clipscope.errors import DataError, EnvironmentFault
    from clipscope.pipelines.data.webdataset_input import UnreadableShardError

    assert MAX_ATTEMPTS == 3
    assert retry_decision(RuntimeError("flaky")) == "retry"
    assert retry_decision(DataError("network hiccup")) == "retry"
    assert retry_decision(UnreadableShardError("x.tar is not a readable tar archive")) == "fail"
    assert retry_decision(EnvironmentFault("disk full")) == "abort"


def test_in_process_shards_are_retried_like_on_ray(shards, tmp_path, fast_models):
    from clipscope.pipelines.jobs.extract.job import ShardExtractor, run_extract
    from clipscope.pipelines.jobs.extract.settings import ExtractConfig

    attempts: dict[int, int] = {}

    class Flaky(ShardExtractor):
        def process(self, task):
            attempts[task.index] = attempts.get(task.index, 0) + 1
            if task.index == 0 and attempts[0] < 3:
                raise RuntimeError("transient")  # fails twice, then works
            if task.index == 1:
                raise RuntimeError("always")
            return super().process(task)

    config = ExtractConfig(data=tuple(shards.paths), out=str(tmp_path / "s.zarr"), model=TINY_MODEL,
                           rows_per_chunk=4, batch_size=4, device="cpu")
    summary = run_extract(config, progress_display="off", extractor_class=Flaky)
    assert attempts == {0: 3, 1: 3}
    assert summary.done == 1 and [index for index, _ in summary.failed] == [1]
    assert "failed after 3 attempt(s); last error: RuntimeError: always" in summary.failed[0][1]


# ----------------------------------------------------------------------------------------------
# A worker stops writing when the run it writes for is gone


def test_a_worker_stops_writing_when_its_driver_is_gone(finished, shards, model_cache):
    """As a Ray actor outliving a killed driver: the lock's owner is dead, so no row is written."""
    from clipscope.errors import StoreError
    from clipscope.pipelines.jobs.extract.job import ShardExtractor, ShardTask
    from clipscope.pipelines.jobs.extract.settings import ExtractConfig

    store = RunStore.open(finished, "r")
    before = store.read("image_embedding").copy()
    plant_dead_lock(finished)
    config = ExtractConfig(data=tuple(shards.paths), out=finished, model=TINY_MODEL, rows_per_chunk=4,
                           batch_size=4, device="cpu")
    extractor = ShardExtractor(config, model_cache(TINY_MODEL, 1))  # another model: other bytes if written
    with pytest.raises(StoreError, match="is gone"):
        extractor.process(ShardTask(0, shards.paths[0], 0, 4, 3))
    assert (RunStore.open(finished, "r").read("image_embedding") == before).all()
    os.remove(os.path.join(finished, "lock.json"))
    extractor.process(ShardTask(0, shards.paths[0], 0, 4, 3))  # no lock (a direct call): it writes
    assert not (RunStore.open(finished, "r").read("image_embedding") == before).all()


def test_a_full_disk_on_the_driver_side_is_one_line_too(shards, tmp_path, capsys, monkeypatch, fast_models):
    def full(self, index, record, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.url, "manifest", "extract"))

    monkeypatch.setattr(RunStore, "mark_shard_done", full)
    out = tmp_path / "store.zarr"
    assert run_cli(*extract_args(shards.paths, out)) == exit_codes.ENVIRONMENT
    line = error_line(capsys, "extract")
    assert f"No space left on device: {out}/manifest/extract: the device is full" in line
    assert not (out / "lock.json").exists()


def test_a_reduction_on_a_read_only_store_fails_before_the_work(finished, capsys, monkeypatch):
    from clipscope.pipelines.cli import textspan

    read_only_file_system(monkeypatch)
    monkeypatch.setattr(textspan, "run", lambda args: pytest.fail("textspan ran"))
    assert run_cli("textspan", finished) == exit_codes.ENVIRONMENT
    assert f"STORE {finished}: the file system of {finished} is read-only" in error_line(capsys, "textspan")
