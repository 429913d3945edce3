"""TextSpan statistics as a stored reduction: written by the first search, read (no row streamed) by every
later one, merged with the rows of shards done since, recomputed when a covered shard changed."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipscope.pipelines.data.webdataset_input import write_shard
from clipscope.pipelines.jobs import textspan as textspan_job
from clipscope.pipelines.jobs.extract.job import run_extract
from clipscope.pipelines.jobs.extract.settings import ExtractConfig
from clipscope.pipelines.jobs.means import job as means_job
from clipscope.pipelines.jobs.means.job import head_statistics
from clipscope.pipelines.jobs.textspan import TextSpanSettings
from clipscope.pipelines.jobs.textspan.statistics import group, read_statistics, stored_head_statistics
from clipscope.storage.store import RunStore

TEXTS = ("a red circle", "a blue square", "a green triangle", "a yellow star", "a purple heart", "top left",
         "bottom right", "centre", "large", "small", "one shape", "two shapes", "a photo", "a drawing")
LAYERS = (2, 3)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("textspan-statistics")
    rng = np.random.default_rng(11)
    for s in range(3):
        samples = [{"__key__": f"s{s}-{i:03d}", "png": Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8))}
                   for i in range(12)]
        write_shard(str(root / f"shard-{s}.tar"), samples)
    config = ExtractConfig(data=(str(root / "shard-{0..2}.tar"),), out=str(root / "store"), rows_per_chunk=4,
                           batch_size=12)
    run_extract(config, progress_display="off")
    return config.out


@pytest.fixture
def fresh(extracted, tmp_path):
    def copy(name: str) -> RunStore:
        shutil.copytree(extracted, tmp_path / name)
        return RunStore.open(str(tmp_path / name), "r+")
    return copy


@pytest.fixture
def mapped_rows(monkeypatch):
    """The row blocks the statistics' map function reads, in call order."""
    seen: list[slice] = []
    original = means_job.HeadStatsBlock.__call__

    def spy(self, rows):
        seen.append(rows)
        return original(self, rows)

    monkeypatch.setattr(means_job.HeadStatsBlock, "__call__", spy)
    return seen


def assert_same_stats(a, b, exact=True):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.count == y.count
        for field in ("sum", "gram", "shift"):
            u, v = getattr(x, field), getattr(y, field)
            if exact:
                assert torch.equal(u, v), field
            else:
                torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12 * float(v.abs().max()))


def picks(store, layer):
    return store.read_result(f"reductions/textspan/layer_{layer}/indices")


def test_first_search_stores_the_statistics_later_ones_read_no_row(fresh, mapped_rows):
    store = fresh("a")
    textspan_job.run(store, TextSpanSettings(layers=LAYERS, texts=TEXTS, basis_size=4))
    assert mapped_rows  # the first run streamed the rows…
    reference = head_statistics(store, LAYERS)
    for layer, expected in zip(LAYERS, reference):
        stored, attrs = read_statistics(store, layer, True)
        assert_same_stats(stored, expected)  # …and stored exactly what head_statistics streams
        assert [entry[0] for entry in attrs["shards"]] == [0, 1, 2] and attrs["n_rows"] == store.n_rows
    mapped_rows.clear()
    # another m, another span rank, another pool: not one row read, the picks of a store without statistics
    for settings in (dict(basis_size=3), dict(basis_size=5, span_rank=12), dict(basis_size=4, texts=TEXTS[:9])):
        full = TextSpanSettings(layers=LAYERS, **{"texts": TEXTS, **settings})
        textspan_job.run(store, full)
        assert mapped_rows == []
        other = fresh(f"b{len(str(settings))}{full.basis_size}")
        for layer in LAYERS:
            shutil.rmtree(Path(other.url.removeprefix("file://")) / group(layer, True), ignore_errors=True)
        other = RunStore.open(other.url, "r+")
        with pytest.MonkeyPatch.context() as patch:  # the same search on rows streamed today
            patch.setattr("clipscope.pipelines.jobs.textspan.job.stored_head_statistics",
                          lambda store, layers, **kw: head_statistics(store, layers, normalize=kw["normalize"]))
            textspan_job.run(other, full)
        mapped_rows.clear()
        for layer in LAYERS:
            np.testing.assert_array_equal(picks(store, layer), picks(other, layer))
            for leaf in ("variances", "explained_ratio"):
                name = f"reductions/textspan/layer_{layer}/{leaf}"
                assert store.read_result(name).tobytes() == other.read_result(name).tobytes()


def _done_record(store: RunStore, shard: int) -> Path:
    return Path(store.url.removeprefix("file://")) / "manifest" / "extract" / f"done-{shard:06d}.json"


def test_added_shards_are_reduced_alone_and_merged(fresh, mapped_rows):
    store = fresh("grow")
    record = _done_record(store, 2)
    assert record.exists()
    saved = record.read_text()
    record.unlink()  # shard 2 not done yet: its rows are not valid
    store = RunStore.open(store.url, "r+")
    partial = stored_head_statistics(store, LAYERS, allow_incomplete=True)
    blocks = store.attrs["row_blocks"]
    assert read_statistics(store, 3, True)[1]["shards"] == [
        [i, json.loads(_done_record(store, i).read_text())["checksum"], *blocks[i]] for i in (0, 1)]
    record.write_text(saved)  # the shard is done now
    store = RunStore.open(store.url, "r+")
    mapped_rows.clear()
    grown = stored_head_statistics(store, LAYERS)
    start = int(store.shard_records(stage="extract")[2]["start"])
    assert mapped_rows and all(rows.start >= start for rows in mapped_rows)  # only shard 2's rows were read
    full = head_statistics(store, LAYERS)
    for a, b, before in zip(grown, full, partial):
        assert_same_stats(a, b, exact=False)  # a merge is exact up to float64 rounding
        assert a[0].count > before[0].count
    assert [entry[0] for entry in read_statistics(store, 2, True)[1]["shards"]] == [0, 1, 2]
    mapped_rows.clear()
    assert_same_stats(stored_head_statistics(store, LAYERS)[1], grown[1])  # read back, nothing streamed
    assert mapped_rows == []


def test_a_changed_shard_or_force_streams_every_row_again(fresh, mapped_rows):
    store = fresh("changed")
    stored_head_statistics(store, LAYERS)
    path = _done_record(store, 0)
    record = json.loads(path.read_text())
    record["checksum"] = "0" * 64  # another extraction of shard 0's rows
    path.write_text(json.dumps(record))
    store = RunStore.open(store.url, "r+")
    mapped_rows.clear()
    again = stored_head_statistics(store, LAYERS)
    assert len(mapped_rows) >= 3  # every block, as head_statistics streams them
    for a, b in zip(again, head_statistics(store, LAYERS)):
        assert_same_stats(a, b)
    mapped_rows.clear()
    stored_head_statistics(store, LAYERS, force=True)
    assert mapped_rows


def test_a_read_only_store_streams_and_writes_nothing(fresh):
    store = fresh("readonly")
    stats = stored_head_statistics(RunStore.open(store.url, "r"), LAYERS)
    assert read_statistics(store, 2, True) is None
    for a, b in zip(stats, head_statistics(store, LAYERS)):
        assert_same_stats(a, b)


def _synthetic_shard(store: RunStore, index: int, start: int, capacity: int, n: int, rng) -> None:
    heads = np.zeros((capacity, 1, 2, 8), np.float32)
    heads[:n] = rng.normal(size=(n, 1, 2, 8)) + 1.0
    store.write_rows(start, {"direct/heads": heads, "image_embedding": heads.sum(axis=(1, 2))},
                     np.arange(capacity) < n)
    store.mark_shard_done(index, {"url": f"s{index}", "count": n, "valid": n, "errors": 0, "seconds": 0.0,
                                  "checksum": store.rows_checksum(start, capacity)})


def test_a_store_that_grows_by_shards_merges_only_the_new_rows(tmp_path, mapped_rows):
    from clipscope.storage.layout import ArraySpec

    rng = np.random.default_rng(2)
    blocks = [[0, 8], [8, 8]]
    store = RunStore.create(str(tmp_path / "grown"), n_rows=16, rows_per_chunk=4,
                            arrays=[ArraySpec("direct/heads", ("sample", "layer", "head", "embed"), (1, 2, 8),
                                              "float32"), ArraySpec("image_embedding", ("sample", "embed"), (8,),
                                                                    "float32")],
                            attrs={"model": {"name": "synthetic"}, "layers": {"heads": [0]}, "row_blocks": blocks})
    for i, (start, capacity) in enumerate(blocks):
        _synthetic_shard(store, i, start, capacity, 7, rng)
    store = RunStore.open(store.url, "r+")
    before = stored_head_statistics(store, [0])[0]
    store.grow(24, {"row_blocks": [*blocks, [16, 8]]})  # a third shard is added, then extracted
    store = RunStore.open(store.url, "r+")
    _synthetic_shard(store, 2, 16, 8, 5, rng)
    store = RunStore.open(store.url, "r+")
    mapped_rows.clear()
    after = stored_head_statistics(store, [0])[0]
    assert mapped_rows and all(rows.start >= 16 for rows in mapped_rows)
    assert [s.count for s in after] == [s.count + 5 for s in before]
    assert_same_stats(after, head_statistics(store, [0])[0], exact=False)
    assert read_statistics(store, 0, True)[1]["n_rows"] == 24
