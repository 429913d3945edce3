"""Resuming `clipscope extract`: finished shards are skipped, unfinished ones rewritten whole, a
different run is refused without touching the store, the writer lock keeps a second run out and is
taken over from a dead one, and runs killed with SIGKILL at random points resume to the same bytes
as an uninterrupted run."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from clipscope.storage.lock import StaleLockWarning
from clipscope.storage.store import RunStore

from extract_helpers import TINY_MODEL, extract_args, run_cli, write_tiny_shards

DONE_DIR = os.path.join("manifest", "extract")


def snapshot(url: str) -> dict[str, bytes]:
    """Every file of a local store by relative path."""
    out = {}
    for folder, _, files in os.walk(url):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, url)] = f.read()
    return out


def arrays_of(url: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(url, mode="r")


    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        members = [(n, a) for n, a in group.members(max_depth=None) if isinstance(a, zarr.Array)]
    return {name: np.asarray(arr[...]) for name, arr in members}


def done_records(url: str) -> dict[int, dict]:
    store = RunStore.open(url, "r")
    return {i: r for i, r in store.shard_records(stage="extract").items() if r["status"] == "done"}


def assert_same_store(url: str, reference: str) -> None:
    """Same arrays (dtype, shape, bytes), sample index, finished shards and row checksums."""
    got, want = arrays_of(url), arrays_of(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name
    assert pq.read_table(os.path.join(url, "samples.parquet")).equals(
        pq.read_table(os.path.join(reference, "samples.parquet")))
    mine, theirs = done_records(url), done_records(reference)
    assert sorted(mine) == sorted(theirs)
    for index in theirs:
        for key in ("count", "valid", "errors", "start", "capacity", "checksum", "shard_errors"):
            assert mine[index][key] == theirs[index][key], (index, key)
    assert zarr.open_group(url, mode="r").attrs.asdict() == zarr.open_group(reference, mode="r").attrs.asdict()
    assert not os.path.exists(os.path.join(url, "lock.json"))


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory, fast_models):
    """Three small shards and a finished store made from them."""
    data = write_tiny_shards(tmp_path_factory.mktemp("resume-shards"), (3, 4, 2), seed=11)
    base = str(tmp_path_factory.mktemp("resume") / "base.zarr")
    assert run_cli(*extract_args(data.pattern, base, "--second-order-layers", "1")) == 0
    return data, base


def copy_of(base: str, tmp_path) -> str:
    out = str(tmp_path / "copy.zarr")
    shutil.copytree(base, out)
    return out


# ----------------------------------------------------------------------------------------------
# Skip, rewrite, refuse


def test_rerun_of_a_finished_run_changes_nothing(resume_data, tmp_path, capsys):
    data, base = resume_data
    store = copy_of(base, tmp_path)
    before = snapshot(store)
    assert run_cli(*extract_args(data.pattern, store, "--second-order-layers", "1")) == 0
    assert "0 shards extracted, 3 already done, 0 failed" in capsys.readouterr().out
    assert snapshot(store) == before


def test_resume_rewrites_an_unfinished_shard_whole(resume_data, tmp_path, capsys):
    data, base = resume_data
    store = copy_of(base, tmp_path)
    # Shard 1 (rows 4..7) was being written when the run died: no done record, garbage rows, no index part.
    os.remove(os.path.join(store, DONE_DIR, "done-000001.json"))
    os.remove(os.path.join(store, "samples", "part-000001.parquet"))
    os.remove(os.path.join(store, "samples.parquet"))
    writer = RunStore.open(store, "r+")
    rng = np.random.default_rng(0)
    garbage = {name: rng.standard_normal((4, *writer.array(name).shape[1:])).astype(np.float32)
               for name in writer.array_names(per_sample=True) if name != "valid"}
    writer.write_rows(4, garbage, np.ones(4, bool))
    assert run_cli(*extract_args(data.pattern, store, "--second-order-layers", "1")) == 0
    assert "1 shards extracted, 2 already done, 0 failed" in capsys.readouterr().out
    assert_same_store(store, base)


def test_a_store_left_half_created_by_a_killed_run_is_created_again(resume_data, tmp_path, model_cache):
    from clipscope.pipelines.jobs.extract.job import array_specs, plan_run, store_attrs
    from clipscope.pipelines.jobs.extract.settings import ExtractConfig

    data, base = resume_data
    store = str(tmp_path / "half.zarr")
    config = ExtractConfig(data=(data.pattern,), out=store, model=TINY_MODEL, rows_per_chunk=4,
                           second_order_layers=(1,))
    plan, loaded = plan_run(config), model_cache(TINY_MODEL)
    # The group and its attributes exist, two arrays do, the rest and the directions never got written.
    RunStore.create(store, arrays=array_specs(config, loaded.spec)[:2], n_rows=plan.n_rows, rows_per_chunk=4,
                    attrs=store_attrs(config, plan, loaded))
    assert run_cli(*extract_args(data.pattern, store, "--second-order-layers", "1")) == 0
    assert_same_store(store, base)


REFUSALS = [
    (["--heads-layers", "1", "2"], "heads_layers"),
    (["--second-order-layers", "0"], "second_order_layers"),
    (["--token-layers", "2"], "token_layers"),
    (["--activation-layers", "0"], "activation_layers"),
    (["--ln-convention", "center"], "ln_convention"),
    (["--dtype", "float16"], "dtype"),
    (["--rows-per-chunk", "2"], "rows_per_chunk"),
    (["--seed", "1"], "seed"),
    (["--model", "clipscope-tiny-ls"], "model"),
    (None, "data"),
]


@pytest.mark.parametrize("flags,field", REFUSALS, ids=[f for _, f in REFUSALS])
def test_resume_with_a_different_run_is_refused_and_leaves_the_store_alone(flags, field, resume_data, tmp_path,
                                                                          capsys):
    data, base = resume_data
    store = copy_of(base, tmp_path)
    before = snapshot(store)
    if flags is None:  # the same options over fewer shards
        args = extract_args(data.paths[:2], store, "--second-order-layers", "1")
    else:
        args = extract_args(data.pattern, store, *(["--second-order-layers", "1"] if field != "second_order_layers"
                                                   else []), *flags)
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    # Shards are compared by what they name; a real difference is one short line.
    expected = "the store has 3 shards, this run 2" if field == "data" else f"{field}: store has"
    assert err.startswith("clipscope extract: error: cannot resume") and expected in err, err
    assert snapshot(store) == before


# ----------------------------------------------------------------------------------------------
# The writer lock

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from clipscope.storage.lock import acquire_lock
    with acquire_lock(sys.argv[1], owner="test lock holder"):
        print("locked", flush=True)
        time.sleep(300)
""")


def test_a_live_writer_keeps_others_out_and_a_dead_ones_lock_is_taken_over(resume_data, tmp_path, capsys):
    data, base = resume_data
    store = str(tmp_path / "locked.zarr")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, store], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = extract_args(data.pattern, store, "--second-order-layers", "1")
        assert run_cli(*args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "locked by another writer" in err, err
        assert f"host {socket.gethostname()!r}" in err and f"pid {holder.pid}" in err, err
        assert os.listdir(store) == ["lock.json"]
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, owned by a dead pid
        holder.wait()
    assert os.listdir(store) == ["lock.json"]
    with pytest.warns(StaleLockWarning, match=f"process {holder.pid} on this host is gone"):
        assert run_cli(*args) == 0
    assert_same_store(store, base)


# ----------------------------------------------------------------------------------------------
# SIGKILL at random points, then resume

KILL_ARGS = ("--batch-size", "2", "--second-order-layers", "2", "--token-layers", "3")


def n_done(store: str) -> int:
    folder = os.path.join(store, DONE_DIR)
    return sum(n.startswith("done-") for n in os.listdir(folder)) if os.path.isdir(folder) else 0


def test_runs_killed_at_random_points_resume_to_the_uninterrupted_bytes(tmp_path, fast_models, one_thread):
    data = write_tiny_shards(tmp_path / "shards", (10,) * 6, seed=5, corrupt=((2, 4),))
    reference = str(tmp_path / "reference.zarr")
    assert run_cli(*extract_args(data.pattern, reference, *KILL_ARGS)) == 0

    # Kill points: (finished shards to wait for — 0 means "the store's zarr.json exists", extra delay).
    rng = random.Random(20240917)
    points = [(0, rng.uniform(0.0, 0.1)), (rng.choice((1, 2)), rng.uniform(0.0, 0.1)),
              (rng.choice((3, 4)), rng.uniform(0.0, 0.1))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    stores, procs = [], []
    for i in range(len(points)):
        store = str(tmp_path / f"killed-{i}.zarr")
        cmd = [sys.executable, "-m", "clipscope.pipelines.cli", *extract_args(data.pattern, store, *KILL_ARGS)]
        stores.append(store)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    fire_at: list[float | None] = [None] * len(points)
    killed_with = [None] * len(points)
    deadline = time.monotonic() + 300
    try:
        while any(k is None for k in killed_with) and time.monotonic() < deadline:
            now = time.monotonic()
            for i, ((after_done, delay), store, proc) in enumerate(zip(points, stores, procs)):
                if killed_with[i] is not None:
                    continue
                if proc.poll() is not None:
                    killed_with[i] = -1  # finished (or died) before its kill point: reported below
                    continue
                if fire_at[i] is None:
                    reached = (os.path.exists(os.path.join(store, "zarr.json")) if after_done == 0
                               else n_done(store) >= after_done)
                    if reached:
                        fire_at[i] = now + delay
                elif now >= fire_at[i]:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    killed_with[i] = n_done(store)
            time.sleep(0.005)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, proc in enumerate(procs):
        assert proc.returncode == -signal.SIGKILL, f"run {i} was not killed mid-run (exit {proc.returncode})"
        assert killed_with[i] < len(data.paths), f"run {i} had finished every shard when killed"

    for store in stores:
        with pytest.warns(StaleLockWarning):
            assert run_cli(*extract_args(data.pattern, store, *KILL_ARGS)) == 0
        assert_same_store(store, reference)
    assert RunStore.open(reference).read_valid().sum() == 59
