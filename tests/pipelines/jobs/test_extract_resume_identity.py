"""Resume compares what a run names, not how it was typed: shards by their
resolved identity (relative or absolute, from another working directory, a folder or its list of
tars, `file://` URLs), a checkpoint by its sha256 (not its path); a real difference is named in one
short line (the first differing shard, the counts)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from extract_helpers import extract_args, run_cli, write_tiny_shards


def files_of(url: str) -> dict[str, bytes]:
    out = {}
    for folder, _, names in os.walk(url):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), url)] = f.read()
    return out


@pytest.fixture()
def finished(tmp_path, fast_models):
    data = write_tiny_shards(tmp_path / "shards", (3, 2), seed=21)
    store = str(tmp_path / "store.zarr")
    assert run_cli(*extract_args(data.paths, store)) == 0
    return data, store


def spellings(data, tmp_path):
    rel = os.path.relpath(data.folder, tmp_path)
    return {
        "folder": [data.folder],
        "relative-from-another-cwd": [os.path.join(rel, os.path.basename(p)) for p in data.paths],
        "brace-pattern": [data.pattern],
        "file-urls": [f"file://{p}" for p in data.paths],
        "glob": [os.path.join(data.folder, "*.tar")],
    }


@pytest.mark.parametrize("spelling", ["folder", "relative-from-another-cwd", "brace-pattern", "file-urls", "glob"])
def test_the_same_shards_spelled_differently_resume(spelling, finished, tmp_path, monkeypatch, capsys):
    data, store = finished
    before = files_of(store)
    monkeypatch.chdir(tmp_path)
    assert run_cli(*extract_args(spellings(data, tmp_path)[spelling], store)) == 0, capsys.readouterr().err
    assert "0 shards extracted, 2 already done" in capsys.readouterr().out
    after = files_of(store)
    assert sorted(after) == sorted(before)


def test_a_real_difference_names_the_first_differing_shard_in_one_line(finished, tmp_path, capsys):
    data, store = finished
    other = write_tiny_shards(tmp_path / "other", (3,), seed=1)
    assert run_cli(*extract_args([data.paths[0], other.paths[0]], store)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    difference = err.split("; a store ")[0]  # the hint after it repeats the command line
    assert len(difference) < 400, difference
    assert f"shard 1 differs: store has {data.paths[1]}, this run has {other.paths[0]}" in err


def test_a_changed_sample_count_is_named_with_both_counts(finished, tmp_path, capsys):
    data, store = finished
    write_tiny_shards(data.folder, (3, 4), seed=21)  # shard 1 now holds 4 samples
    assert run_cli(*extract_args(data.paths, store)) == 2
    assert f"shard 1 ({data.paths[1]}) holds 4 samples now, 2 when the store was created" in capsys.readouterr().err


def test_the_same_checkpoint_by_another_path_resumes(tmp_path, model_cache, fast_models, capsys):
    data = write_tiny_shards(tmp_path / "shards", (2,), seed=3)
    first = tmp_path / "a" / "tiny.pt"
    first.parent.mkdir()
    torch.save(model_cache("clipscope-tiny").model.state_dict(), first)
    second = tmp_path / "b" / "copy.pt"
    second.parent.mkdir()
    shutil.copy(first, second)
    store = tmp_path / "store.zarr"
    assert run_cli(*extract_args(data.paths, store, "--pretrained", first)) == 0
    assert run_cli(*extract_args(data.paths, store, "--pretrained", second)) == 0, capsys.readouterr().err
    # Another checkpoint (other bytes) is still refused.
    state = model_cache("clipscope-tiny").model.state_dict()
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, second)
    assert run_cli(*extract_args(data.paths, store, "--pretrained", second)) == 2
    assert "model sha256: store has" in capsys.readouterr().err


def test_a_resume_with_another_forward_thread_count_is_refused(tmp_path, fast_models, capsys, monkeypatch):
    """Rows of a 1-thread forward (a Ray actor's) and a 2-thread one (in-process) differ in their last
    bits; a store mixing them would match neither run, so the mix is refused."""
    data = write_tiny_shards(tmp_path / "shards", (3, 2), seed=9)
    store = tmp_path / "store.zarr"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert run_cli(*extract_args(data.paths, store)) == 0
    done = os.path.join(store, "manifest", "extract", "done-000001.json")
    with open(done) as f:
        assert '"forward": {"device": "cpu", "threads": 1}' in f.read()
    os.remove(done)  # shard 1 is left to do
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert run_cli(*extract_args(data.paths, store)) == 2
    err = capsys.readouterr().err
    assert "this in-process run computes on cpu with 2 torch thread(s), the done shards" in err
    assert "on cpu with 1 torch thread(s)" in err and not os.path.exists(done)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert run_cli(*extract_args(data.paths, store)) == 0
