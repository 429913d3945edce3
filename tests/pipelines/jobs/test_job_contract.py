"""The job contract, run over every reduction job (textspan, evaluate, second-order, neurons, means).

Every reduction is safe to interrupt, locked, a no-op when rerun, refuses an incomplete store or one
that lacks its inputs (one line naming the command that makes them), and gives the same bytes on Ray
as in this process.

* kill -9 mid-way (a subprocess whose first array write into the result group kills it): no half
  group is readable, the rerun completes to the bytes of an uninterrupted run;
* a second run while one holds the store's lock is refused with one line naming the holder;
* a rerun with the same settings on the same extraction is a no-op that says so; --force recomputes;
* a store with unfinished or failed shards is refused with one line (how many, how to finish them);
  --allow-incomplete reduces the done shards only, says so and records it; rows of shards without a
  done record are never valid.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from clipscope.storage.results import RESULT_ATTR
from clipscope.storage.store import INCOMPLETE_ATTR, RunStore

from extract_helpers import extract_args, run_cli

LAYER = 1  # the tiny model's second-order layer here

# (job, the group it writes, its command after the store path, prerequisite commands)
REDUCTIONS = {
    "textspan": ("reductions/textspan/layer_3", ["textspan", "--layers", "2", "3", "--pool", "shapes-colours",
                                                "-m", "3"], []),
    "evaluate": ("reductions/evaluation/shapes", ["evaluate", "--task", "shapes", "--keep-last", "2"], []),
    "second-order": (f"reductions/second_order/layer_{LAYER}",
                     ["second-order", "--layer", str(LAYER), "--top-k", "5", "--no-evaluation"], []),
    "neurons": (f"reductions/omp/layer_{LAYER}",
                ["neurons", "--layer", str(LAYER), "--pool", "shapes-colours", "--m", "2", "--no-accuracy"],
                [["second-order", "--layer", str(LAYER), "--top-k", "5", "--no-evaluation"]]),
    "means": ("reductions/means", None, []),
    # the applications
    "concepts": (f"reductions/concepts/layer_{LAYER}", ["concepts", "--layer", str(LAYER), "--top", "3"],
                 [["second-order", "--layer", str(LAYER), "--top-k", "5", "--no-evaluation"],
                  ["neurons", "--layer", str(LAYER), "--pool", "shapes-all", "--m", "2", "--no-accuracy"]]),
}

# Runs in a subprocess: counts array writes under GROUP; at the COUNT-th one, MODE "kill" SIGKILLs the
# process, MODE "pause" writes READY and waits for GO. Then runs the CLI (or the means job).
DRIVER = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    torch.set_num_threads(min(2, torch.get_num_threads()))
    import zarr
    mode, group, count, ready, go = sys.argv[1:6]
    argv = sys.argv[6:]
    original = zarr.Array.__setitem__
    seen = [0]
    def patched(self, key, value):
        original(self, key, value)
        if self.path == group or self.path.startswith(group + "/"):
            seen[0] += 1
            if seen[0] == int(count):
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                open(ready, "w").close()
                while not os.path.exists(go):
                    time.sleep(0.05)
    zarr.Array.__setitem__ = patched
    if argv[0] == "means":
        from clipscope.pipelines.jobs import means
        from clipscope.storage.store import RunStore
        means.run(RunStore.open(argv[1], "r+"), means.Settings())
        sys.exit(0)
    from clipscope.pipelines.cli import main
    sys.exit(main(argv))
""")


@pytest.fixture(scope="module")
def world_store(tmp_path_factory, fast_models) -> str:
    """Labelled shapes-world shards (3 shards) extracted with second-order terms of LAYER."""
    from clipscope.pipelines.worlds.shapes.world import write_world

    folder = tmp_path_factory.mktemp("safety")
    write_world(folder / "shards", 3, 8, seed=5)
    out = folder / "store.zarr"
    code = run_cli(*extract_args(str(folder / "shards" / "shapes-{00000..00002}.tar"), out,
                                 "--second-order-layers", LAYER))
    assert code == 0
    return str(out)


@pytest.fixture
def fresh(world_store, tmp_path):
    """`fresh(name)` → the path of a private copy of the extracted store."""
    def copy(name: str) -> str:
        target = tmp_path / name
        shutil.copytree(world_store, target)
        return str(target)

    return copy


def reduce(job: str, path: str) -> int:
    group, command, before = REDUCTIONS[job]
    for pre in before:
        assert run_cli(pre[0], path, *pre[1:]) == 0
    if command is None:
        from clipscope.pipelines.jobs import means

        means.run(RunStore.open(path, "r+"), means.Settings())
        return 0
    return run_cli(command[0], path, *command[1:])


def driver_args(job: str, path: str) -> list[str]:
    _, command, _ = REDUCTIONS[job]
    return ["means", path] if command is None else [command[0], path, *command[1:]]


def run_driver(mode: str, job: str, path: str, tmp_path: Path, count: int = 1) -> subprocess.Popen:
    group = REDUCTIONS[job][0]
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    return subprocess.Popen([sys.executable, str(script), mode, group, str(count), str(tmp_path / "ready"),
                             str(tmp_path / "go"), *driver_args(job, path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def group_files(path: str, group: str) -> dict[str, bytes]:
    root = Path(path) / group
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".partial")}


def visible(path: str, group: str) -> list[str]:
    return [n for n in RunStore.open(path).array_names() if n.startswith(group + "/")]


# ----------------------------------------------------------------------------------------------
# Interrupt safety


@pytest.mark.parametrize("job", list(REDUCTIONS))
def test_kill_mid_write_leaves_no_half_group_and_rerun_gives_the_same_bytes(job, fresh, tmp_path):
    group = REDUCTIONS[job][0]
    reference = fresh("reference.zarr")
    assert reduce(job, reference) == 0
    expected = group_files(reference, group)
    assert expected and visible(reference, group)

    killed = fresh("killed.zarr")
    for pre in REDUCTIONS[job][2]:
        assert run_cli(pre[0], killed, *pre[1:]) == 0
    proc = run_driver("kill", job, killed, tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == -9, (out, err)
    assert (Path(killed) / group).exists()  # the killed run had started writing the group…
    assert visible(killed, group) == []  # …but no reader sees any of it
    with pytest.raises(Exception, match="no array"):
        RunStore.open(killed).array(visible(reference, group)[0])

    with pytest.warns(Warning, match="taking over the lock"):  # the killed run's lock is dead
        assert reduce(job, killed) == 0
    assert group_files(killed, group) == expected
    assert not (Path(killed) / "lock.json").exists()


def test_kill_between_layers_keeps_the_finished_layer(fresh, tmp_path):
    """TextSpan writes one group per layer: killed in the second, the first stays complete."""
    path = fresh("layers.zarr")
    script_group = "reductions/textspan"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, "kill", script_group, "4", str(tmp_path / "r"),
                             str(tmp_path / "g"), *driver_args("textspan", path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.communicate(timeout=600)
    assert proc.returncode == -9
    names = RunStore.open(path).array_names()
    assert {n for n in names if n.startswith(script_group)} == {
        f"{script_group}/layer_2/{k}" for k in ("indices", "variances", "explained_ratio")}


# ----------------------------------------------------------------------------------------------
# Locking


def test_second_run_is_refused_while_the_first_writes(fresh, tmp_path, capsys):
    path = fresh("race.zarr")
    first = run_driver("pause", "textspan", path, tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "ready").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        capsys.readouterr()
        assert reduce("textspan", path) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is locked by another writer" in err[0] and "clipscope textspan" in err[0], err
        assert visible(path, REDUCTIONS["textspan"][0]) == []
    finally:
        (tmp_path / "go").touch()
        out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert len(visible(path, REDUCTIONS["textspan"][0])) == 3


@pytest.mark.parametrize("job", ["evaluate", "second-order", "neurons"])
def test_every_reduction_takes_the_store_lock(job, fresh, capsys):
    from clipscope.storage.lock import acquire_lock

    path = fresh("locked.zarr")
    for pre in REDUCTIONS[job][2]:
        assert run_cli(pre[0], path, *pre[1:]) == 0
    with acquire_lock(path, owner="someone else"):
        capsys.readouterr()
        command = REDUCTIONS[job][1]
        assert run_cli(command[0], path, *command[1:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "locked by another writer" in err[0] and "someone else" in err[0]


# ----------------------------------------------------------------------------------------------
# Rerun no-op, --force


@pytest.mark.parametrize("job", ["textspan", "evaluate", "second-order", "neurons"])
def test_rerun_is_a_noop_that_says_so_and_force_recomputes(job, fresh, caplog, capsys):
    group, command, before = REDUCTIONS[job]
    path = fresh("noop.zarr")
    for pre in before:
        assert run_cli(pre[0], path, *pre[1:]) == 0
    capsys.readouterr()
    assert run_cli(command[0], path, *command[1:]) == 0
    marker = Path(path) / group / "zarr.json"
    first = (marker.stat().st_mtime_ns, marker.read_bytes())
    first_out = capsys.readouterr().out
    with caplog.at_level(logging.INFO, logger="clipscope"):
        assert run_cli(command[0], path, *command[1:]) == 0
    assert f"{group} is up to date (same settings, same extraction), not recomputed" in caplog.text
    assert (marker.stat().st_mtime_ns, marker.read_bytes()) == first
    assert capsys.readouterr().out == first_out  # the same report, read back from the store
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipscope"):
        assert run_cli(command[0], path, *command[1:], "--force") == 0
    assert "up to date" not in caplog.text
    assert marker.stat().st_mtime_ns != first[0] and marker.read_bytes() == first[1]
    record = json.loads(marker.read_bytes())["attributes"][RESULT_ATTR]
    assert record["inputs"] and record["settings"]


def test_other_settings_recompute(fresh, caplog):
    path = fresh("settings.zarr")
    assert reduce("textspan", path) == 0
    with caplog.at_level(logging.INFO, logger="clipscope"):
        assert run_cli("textspan", path, "--layers", "3", "--pool", "shapes-colours", "-m", "2") == 0
    assert "up to date" not in caplog.text
    assert RunStore.open(path).read_result("reductions/textspan/layer_3/indices").shape[1] == 2


def test_means_noop_and_stale_after_new_extraction(fresh, caplog):
    from clipscope.pipelines.jobs import means
    from clipscope.pipelines.jobs.means.job import stale_means

    path = fresh("means.zarr")
    store = RunStore.open(path, "r+")
    means.run(store, means.Settings())
    with caplog.at_level(logging.INFO, logger="clipscope"):
        means.run(RunStore.open(path, "r+"), means.Settings())
    assert "reductions/means is up to date" in caplog.text
    # another extraction of the same rows (a done record with another checksum) makes every mean stale
    record_path = Path(path) / "manifest" / "extract" / "done-000000.json"
    record = json.loads(record_path.read_text())
    record["checksum"] = "0" * 64
    record_path.write_text(json.dumps(record))
    store = RunStore.open(path, "r+")
    assert stale_means(store, ["image_embedding"]) == ["image_embedding"]


# ----------------------------------------------------------------------------------------------
# Incomplete stores: nothing lost, nothing hidden


def unfinish(path: str, shard: int) -> None:
    """Make shard `shard` look unfinished: its rows stay, its done record goes (a killed extraction)."""
    os.remove(Path(path) / "manifest" / "extract" / f"done-{shard:06d}.json")


def fail(path: str, shard: int) -> None:
    store = RunStore.open(path, "r+")
    store.mark_shard_failed(shard, {"url": store.attrs["shards"][shard], "error": "test: truncated"})


def test_rows_of_shards_without_done_record_are_not_valid(fresh):
    path = fresh("masked.zarr")
    store = RunStore.open(path)
    start, capacity = store.attrs["row_blocks"][1]
    assert store.read_valid()[start:start + capacity].any()
    fail(path, 1)
    store = RunStore.open(path)
    raw, valid = store.read_valid(done_only=False), store.read_valid()
    assert raw[start:start + capacity].any() and not valid[start:start + capacity].any()
    assert (valid == (raw & store.done_rows())).all()
    assert not store.read_valid(slice(start, start + capacity)).any()
    assert not store.read_valid(np.arange(start, start + capacity)).any()
    # and a reduction allowed to run on it averages the done shards only
    from clipscope.pipelines.jobs import means as means_job

    means = means_job.run(RunStore.open(path, "r+"), means_job.Settings(names=("image_embedding",),
                                                                        allow_incomplete=True)).means
    rows = valid.nonzero()[0]
    expected = store.read("image_embedding", rows).astype(np.float64).mean(0)
    np.testing.assert_allclose(means["image_embedding"], expected, rtol=1e-12)


@pytest.mark.parametrize("job", ["textspan", "evaluate", "second-order", "neurons"])
@pytest.mark.parametrize("how", ["unfinished", "failed"])
def test_reduction_refuses_an_incomplete_store(job, how, fresh, capsys):
    path = fresh("incomplete.zarr")
    for pre in REDUCTIONS[job][2]:
        assert run_cli(pre[0], path, *pre[1:]) == 0
    (unfinish if how == "unfinished" else fail)(path, 2)
    capsys.readouterr()
    command = REDUCTIONS[job][1]
    assert run_cli(command[0], path, *command[1:]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "WARNING" not in line]
    assert len(err) == 1, err
    assert f"is incomplete: 1 of 3 shards are not extracted (1 {how})" in err[0]
    assert "clipscope extract" in err[0] and "--allow-incomplete" in err[0]
    assert ("--retry-failed" in err[0]) == (how == "failed")
    assert visible(path, REDUCTIONS[job][0]) == []


def test_allow_incomplete_runs_says_so_and_records_it(fresh, caplog):
    path = fresh("allowed.zarr")
    unfinish(path, 0)
    with caplog.at_level(logging.WARNING, logger="clipscope"):
        assert run_cli("textspan", path, "--layers", "3", "--pool", "shapes-colours", "-m", "2",
                       "--allow-incomplete") == 0
    assert "is incomplete (2 of 3 shards done); reducing the done shards only" in caplog.text
    attrs = json.loads((Path(path) / "reductions/textspan/layer_3/zarr.json").read_text())["attributes"]
    assert attrs[RESULT_ATTR]["incomplete"] == {"shards": 3, "done": 2, "failed": 0, "missing": 1}


def test_query_text_never_lists_rows_of_a_failed_shard(fresh):
    from clipscope.pipelines.query.store_queries import top_images_for_text

    path = fresh("query.zarr")
    fail(path, 1)
    store = RunStore.open(path)
    start, capacity = store.attrs["row_blocks"][1]
    table = top_images_for_text(store, 3, 0, "a red circle", k=100)
    rows = table.column("row").to_pylist()
    assert len(rows) == int(store.read_valid().sum()) == 16
    assert not [r for r in rows if start <= r < start + capacity]


def test_incomplete_flag_hides_a_group_and_its_arrays(tmp_path):
    """The storage rule itself: a group carrying the flag and every array under it are not readable."""
    from clipscope.storage.layout import ArraySpec

    store = RunStore.create(str(tmp_path / "s.zarr"), arrays=[ArraySpec("x", ("sample",), (), "float32")],
                            n_rows=4, rows_per_chunk=4, attrs={})
    store.write_result_group("reductions/a", {"v": (np.arange(3.0), ("i",))}, {"k": 1})
    assert "reductions/a/v" in RunStore.open(store.url).array_names()
    group = RunStore.open(store.url, "r+")._group()["reductions/a"]
    group.update_attributes({INCOMPLETE_ATTR: True})
    reopened = RunStore.open(store.url)
    assert "reductions/a/v" not in reopened.array_names()
    assert reopened.result_group_attrs("reductions/a") is None
    with pytest.raises(Exception, match="no array 'reductions/a/v'"):
        reopened.read_result("reductions/a/v")
    # the next write replaces it whole
    RunStore.open(store.url, "r+").write_result_group("reductions/a", {"w": (np.zeros(2), ("j",))})
    assert [n for n in RunStore.open(store.url).array_names() if n.startswith("reductions")] == ["reductions/a/w"]


# ----------------------------------------------------------------------------------------------
# A store that lacks a job's inputs is refused with one line naming the command that makes them


def _drop(path: str, name: str) -> None:
    shutil.rmtree(Path(path) / name)


LACKING = {
    # job: (how the inputs go missing, the command line, the command the error must name)
    "textspan": (None, ["textspan", "--layers", "7", "--pool", "shapes-colours"], "clipscope extract … --heads-layers 7"),
    "evaluate": ("direct/mlps", ["evaluate", "--task", "shapes"], "clipscope extract"),
    "second-order": (None, ["second-order", "--layer", "2"], "clipscope extract … --second-order-layers 2"),
    "neurons": (None, ["neurons", "--layer", str(LAYER), "--pool", "shapes-colours"], "clipscope second-order"),
}


@pytest.mark.parametrize("job", list(LACKING))
def test_a_store_without_the_inputs_is_refused_naming_the_command(job, fresh, tmp_path, capsys, monkeypatch):
    drop, command, maker = LACKING[job]
    path = fresh("lacking.zarr")
    if drop:
        _drop(path, drop)
    monkeypatch.chdir(tmp_path)
    before = sorted(p for p in Path(path).rglob("*") if "reductions" in p.parts and p.suffix != ".partial")
    capsys.readouterr()
    code = run_cli(command[0], path, *command[1:])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "WARNING" not in line]
    assert code == 2 and len(err) == 1, err
    assert f"`{maker}" in err[0], err
    after = sorted(p for p in Path(path).rglob("*") if "reductions" in p.parts and p.suffix != ".partial")
    assert after == before


def test_the_curve_without_textspan_names_the_command(fresh):
    from clipscope.errors import ConfigError
    from clipscope.pipelines.jobs.textspan import curve

    with pytest.raises(ConfigError, match="run `clipscope textspan` first"):
        curve.run(RunStore.open(fresh("nocurve.zarr"), "r+"), curve.Settings(layers=(3,), task="shapes",
                                                                            basis_sizes=(2,)))


# ----------------------------------------------------------------------------------------------
# The same bytes in this process and on Ray


@pytest.mark.parametrize("job", ["textspan", "evaluate", "second-order", "neurons"])
def test_ray_writes_the_bytes_a_local_run_writes(job, fresh, one_thread):
    group, command, before = REDUCTIONS[job]
    local, remote = fresh("local.zarr"), fresh("ray.zarr")
    assert reduce(job, local) == 0
    for pre in before:
        assert run_cli(pre[0], remote, *pre[1:], "--workers", "2") == 0
    assert run_cli(command[0], remote, *command[1:], "--workers", "2") == 0
    assert group_files(remote, group) == group_files(local, group)


# ----------------------------------------------------------------------------------------------
# Every array the jobs write is declared by the schema, with the declared dims


def test_every_written_array_is_declared_with_its_dims(fresh):
    from clipscope.storage import schema

    path = fresh("schema.zarr")
    for job in ("textspan", "evaluate", "second-order", "neurons", "means"):
        assert reduce(job, path) == 0
    assert run_cli("second-order", path, "--layer", LAYER, "--top-k", "5", "--task", "shapes", "--force") == 0
    store = RunStore.open(path)
    names = store.array_names()
    sources = {n: store.dims(n) for n in names if store.is_per_sample(n)}
    for name in names:
        decl, _ = schema.declaration(name)
        assert store.dims(name) == schema.expected_dims(name, sources), name
        assert store.is_per_sample(name) == decl.per_sample, name
    assert {schema.declaration(n)[0].writer for n in names} >= {"extract", "means", "textspan", "evaluate",
                                                                 "second-order", "neurons"}
