"""The Rosetta job against brute force: exact Pearson (np.corrcoef of naively resized maps), best buddies
(the kernel on the full matrix; a literal loop of the official rule), the official per-batch score (a literal
loop), tile-size and executor independence of every byte, resume after a crash, refusals."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from clipscope.kernels.rosetta import best_buddies, self_best_buddies
from clipscope.pipelines.jobs import rosetta
from clipscope.storage.store import RunStore
from extract_helpers import run_cli
from rosetta_helpers import naive_matrix, resized_flat, write_maps_store

N = 23
INVALID = (4, 17)  # rows not decoded in one store each: every store's valid rows are used together


def _zoo(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    g = np.random.default_rng(seed)
    a6 = g.normal(size=(N, 4, 6, 6)) * 0.1 + 1e4  # large mean, small variance
    a6[:, 2] = 1e4  # a dead (constant) unit
    a3 = g.normal(size=(N, 3, 3, 3))
    b12 = g.normal(size=(N, 5, 12, 12))
    b12[:, :2] += 3 * resized_flat(a6[:, :2] - 1e4, (12, 12)).reshape(2, N, 12, 12).transpose(1, 0, 2, 3) * 10
    b46 = g.normal(size=(N, 3, 4, 6))  # non-square
    c3 = g.normal(size=(N, 4, 3, 3))
    c3[:, 0] += a3[:, 1]
    maps = {"anchor": {"l6": a6, "l3": a3}, "m1": {"b12": b12, "b46": b46}, "m2": {"c3": c3}}
    # the stores hold float32: compare with exactly what they hold
    return {model: {k: v.astype(np.float32).astype(np.float64) for k, v in layers.items()}
            for model, layers in maps.items()}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rosetta")
    maps = _zoo()
    urls = {name: write_maps_store(folder / f"{name}.zarr", layers, invalid=(INVALID[0],) if name == "anchor" else
                                   (INVALID[1],) if name == "m1" else ())
            for name, layers in maps.items()}
    return folder, urls, maps


def _copy(zoo, tmp_path) -> tuple[RunStore, tuple[str, str]]:
    folder, urls, _ = zoo
    anchor = tmp_path / "anchor.zarr"
    shutil.copytree(urls["anchor"], anchor)
    return RunStore.open(str(anchor), "r+"), (urls["m1"], urls["m2"])


def _valid() -> np.ndarray:
    valid = np.ones(N, bool)
    valid[list(INVALID)] = False
    return valid


def _settings(others, **kw) -> rosetta.Settings:
    return rosetta.Settings(others=others, **{"k": 2, "self_k": 2, "k_keep": 16, "tile": 3, **kw})


def _naive(maps, model: str, valid: np.ndarray) -> np.ndarray:
    return naive_matrix([v[valid] for v in maps["anchor"].values()], [v[valid] for v in maps[model].values()])


def test_correlations_equal_np_corrcoef_of_naively_resized_maps(zoo, tmp_path):
    store, others = _copy(zoo, tmp_path)
    result = rosetta.run(store, _settings(others, keep_matrix=True))
    maps, valid = zoo[2], _valid()
    for m, model in ((1, "m1"), (2, "m2")):
        ref = _naive(maps, model, valid)
        # k_keep 16 ≥ every model's unit count: the row lists hold whole rows, in float64
        index, corr = result.arrays[f"pairs/m{m}/row_top_index"], result.arrays[f"pairs/m{m}/row_top_corr"]
        for i in range(ref.shape[0]):
            real = index[i] >= 0
            assert real.sum() == ref.shape[1]
            np.testing.assert_allclose(corr[i, real], ref[i, index[i, real]], rtol=0, atol=1e-10)
            assert np.all(np.diff(corr[i, real]) <= 0)
        cindex, ccorr = result.arrays[f"pairs/m{m}/col_top_index"], result.arrays[f"pairs/m{m}/col_top_corr"]
        for j in range(ref.shape[1]):
            real = cindex[j] >= 0
            np.testing.assert_allclose(ccorr[j, real], ref[cindex[j, real], j], rtol=0, atol=1e-10)
        np.testing.assert_allclose(result.arrays[f"pairs/m{m}/corr"], ref, rtol=0, atol=1e-6)  # float32
        assert np.all(ref[2] == 0) and np.all(corr[2][index[2] >= 0] == 0)  # the dead unit


def test_best_buddies_equal_the_kernel_on_the_full_matrix(zoo, tmp_path):
    store, others = _copy(zoo, tmp_path)
    result = rosetta.run(store, _settings(others))
    maps, valid = zoo[2], _valid()
    for m, model in ((1, "m1"), (2, "m2")):
        expected = best_buddies(torch.from_numpy(_naive(maps, model, valid)), 2).numpy()
        np.testing.assert_array_equal(result.arrays[f"pairs/m{m}/buddies"], expected)
    anchor = [v[valid] for v in maps["anchor"].values()]
    expected_self = self_best_buddies(torch.from_numpy(naive_matrix(anchor, anchor)), 2).numpy()
    # only the rows of the tuples' anchor units are computed, so the pairs among them (all a concept needs)
    in_tuples = set(result.arrays["tuples/members"][:, 0].tolist())
    expected_self = expected_self[[i in in_tuples and j in in_tuples for i, j in expected_self.tolist()]]
    assert len(expected_self) >= 2
    np.testing.assert_array_equal(result.arrays["self/buddies"], expected_self)
    # Eq. 4.4 over both models and one concept id per tuple
    members = result.arrays["tuples/members"]
    pairs = [set(map(tuple, result.arrays[f"pairs/m{m}/buddies"].tolist())) for m in (1, 2)]
    assert members.shape[1] == 3 and all((t[0], t[1]) in pairs[0] and (t[0], t[2]) in pairs[1] for t in members)
    assert result.arrays["tuples/concept"].shape == (len(members),)


def _reference_rule(corr: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The official `universal.py` loop, written from its description: for each row unit its top-1 column,
    kept when the row is among that column's top-k rows."""
    out = []
    for i in range(corr.shape[0]):
        j = int(np.lexsort((np.arange(corr.shape[1]), -corr[i]))[0])
        back = np.lexsort((np.arange(corr.shape[0]), -corr[:, j]))[:k]
        if i in back:
            out.append((i, j))
    return out


def test_reference_rule_equals_a_literal_loop(zoo, tmp_path):
    store, others = _copy(zoo, tmp_path)
    result = rosetta.run(store, _settings(others, bb_rule="reference", k=3, self_k=3))
    maps, valid = zoo[2], _valid()
    for m, model in ((1, "m1"), (2, "m2")):
        expected = _reference_rule(_naive(maps, model, valid), 3)
        assert [tuple(p) for p in result.arrays[f"pairs/m{m}/buddies"].tolist()] == expected


def _official_scores(x_layers, y_layers, batch: int) -> np.ndarray:
    """The official two passes, literally: pass 1 averages per-batch means and unbiased variances; pass 2
    standardises each batch at native size, upsamples both maps to the larger size and accumulates the
    per-batch cosine (NaN → 0) into the full table, divided by the number of batches."""
    import torch.nn.functional as F

    def units(layers, rows):
        return [torch.from_numpy(layer[rows]) for layer in layers]

    n = x_layers[0].shape[0]
    batches = [np.arange(s, min(s + batch, n)) for s in range(0, n, batch)]
    stats = []
    for layers in (x_layers, y_layers):
        means = [np.zeros(l.shape[1]) for l in layers]
        variances = [np.zeros(l.shape[1]) for l in layers]
        for rows in batches:
            for i, t in enumerate(units(layers, rows)):
                flat = t.permute(1, 0, 2, 3).reshape(t.shape[1], -1)
                means[i] += flat.mean(1).numpy()
                variances[i] += flat.var(1, unbiased=True).numpy()
        stats.append([(m / len(batches), np.sqrt(v / len(batches))) for m, v in zip(means, variances)])
    total = np.zeros((sum(l.shape[1] for l in x_layers), sum(l.shape[1] for l in y_layers)))
    for rows in batches:
        r0 = 0
        for xi, x in enumerate(units(x_layers, rows)):
            c0 = 0
            for yi, y in enumerate(units(y_layers, rows)):
                (mx, sx), (my, sy) = stats[0][xi], stats[1][yi]
                g = (x - torch.from_numpy(mx)[None, :, None, None]) / (torch.from_numpy(sx)[None, :, None, None] + 1e-5)
                d = (y - torch.from_numpy(my)[None, :, None, None]) / (torch.from_numpy(sy)[None, :, None, None] + 1e-5)
                size = (max(g.shape[2], d.shape[2]), max(g.shape[3], d.shape[3]))
                g = F.interpolate(g, size=size, mode="bilinear", align_corners=False)
                d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
                for a in range(g.shape[1]):
                    for b in range(d.shape[1]):
                        num = (g[:, a] * d[:, b]).sum()
                        den = torch.sqrt((g[:, a] ** 2).sum() * (d[:, b] ** 2).sum())
                        total[r0 + a, c0 + b] += float(torch.nan_to_num(num / den, nan=0.0))
                c0 += d.shape[1]
            r0 += x.shape[1]
    return total / len(batches)


def test_reference_score_equals_the_literal_official_loop_and_differs_from_pearson(zoo, tmp_path):
    store, others = _copy(zoo, tmp_path)
    result = rosetta.run(store, _settings(others[:1], score="reference", reference_batch=5, keep_matrix=True))
    maps, valid = zoo[2], _valid()
    official = _official_scores([v[valid] for v in maps["anchor"].values()],
                                [v[valid] for v in maps["m1"].values()], 5)
    np.testing.assert_allclose(result.arrays["pairs/m1/corr"], official, rtol=0, atol=2e-6)
    # Batch means that differ (a drift across images) make the averaged per-batch score differ from Pearson.
    pearson = _naive(maps, "m1", valid)
    assert np.abs(official - pearson).max() > 1e-3


def _same_bytes(a: rosetta.Result, b: rosetta.Result) -> None:
    assert a.arrays.keys() == b.arrays.keys()
    for name in a.arrays:
        assert a.arrays[name].dtype == b.arrays[name].dtype
        assert a.arrays[name].tobytes() == b.arrays[name].tobytes(), name


def test_tile_size_does_not_change_a_byte(zoo, tmp_path):
    results = []
    for tile in (3, 1000):
        store, others = _copy(zoo, tmp_path / f"t{tile}")
        results.append(rosetta.run(store, _settings(others, tile=tile, keep_matrix=True)))
    _same_bytes(*results)


def test_one_task_per_tile_row_block_gives_the_bytes_of_one_task_per_tile(zoo, tmp_path):
    results = []
    for split in (False, True):
        store, others = _copy(zoo, tmp_path / f"s{split}")
        results.append(rosetta.run(store, _settings(others, split_rows=split, chunks_per_block=1)))
    _same_bytes(*results)


@pytest.fixture(scope="module")
def ray2():
    from clipscope.cluster.runtime import ray_runtime

    with ray_runtime(num_cpus=2, object_store_memory=150 * 1024 * 1024) as runtime:
        yield runtime


def test_two_ray_workers_give_the_bytes_of_a_local_run(zoo, tmp_path, ray2):
    from clipscope.cluster.executor import LocalExecutor, RayExecutor

    local_store, others = _copy(zoo, tmp_path / "local")
    local = rosetta.run(local_store, _settings(others), LocalExecutor(progress="off"))
    ray_store, _ = _copy(zoo, tmp_path / "ray")
    remote = rosetta.run(ray_store, _settings(others), RayExecutor(progress="off", workers=2))
    _same_bytes(local, remote)
    split_store, _ = _copy(zoo, tmp_path / "split")
    split = rosetta.run(split_store, _settings(others, split_rows=True), RayExecutor(progress="off", workers=2))
    _same_bytes(local, split)


def test_a_crashed_run_resumes_without_recomputing_finished_tiles(zoo, tmp_path):
    """A crash in the model tiles; the self tiles (planned from the tuples) are then computed by the rerun."""
    fresh_store, others = _copy(zoo, tmp_path / "fresh")
    fresh = rosetta.run(fresh_store, _settings(others))
    store, _ = _copy(zoo, tmp_path / "crash")
    seen: list[tuple[int, bool]] = []

    def crash_after_some(tile, reused):
        seen.append((tile.index, reused))
        if len(seen) == 10:
            raise KeyboardInterrupt  # the driver dies here; its done markers stay

    with pytest.raises(KeyboardInterrupt):
        rosetta.run(store, _settings(others), on_tile=crash_after_some)
    assert not any(name.startswith("reductions/rosetta") for name in store.array_names())
    done = len(seen)
    seen.clear()
    resumed = rosetta.run(RunStore.open(store.url, "r+"), _settings(others), on_tile=lambda t, r: seen.append((t.index, r)))
    reused = [i for i, r in seen if r]
    assert len(reused) == done >= 8 and len(seen) > done
    _same_bytes(resumed, fresh)
    for name, value in fresh.arrays.items():
        assert RunStore.open(store.url, "r").read_result(f"reductions/rosetta/default/{name}").tobytes() == value.tobytes()
    # the finished result needs its tiles' done markers no more; a rerun with the same settings is a no-op
    assert not RunStore.open(store.url, "r").shard_records(stage="rosetta-default")
    seen.clear()
    again = rosetta.run(RunStore.open(store.url, "r+"), _settings(others), on_tile=lambda t, r: seen.append(1))
    assert again == resumed and not seen


def _untouched(url: str) -> bool:
    store = RunStore.open(url, "r")
    return not any(n.startswith("reductions") for n in store.array_names()) and not \
        store.shard_records(stage="rosetta-default")


@pytest.mark.parametrize("case", ["rows", "keys", "geometry", "layer"])
def test_mismatched_stores_are_refused_with_one_line(zoo, tmp_path, capsys, case):
    folder, urls, maps = zoo
    anchor = tmp_path / "anchor.zarr"
    shutil.copytree(urls["anchor"], anchor)
    if case == "rows":
        other = write_maps_store(tmp_path / "o.zarr", {k: v[:-12] for k, v in maps["m1"].items()})
    elif case == "keys":
        other = write_maps_store(tmp_path / "o.zarr", maps["m1"], keys=[f"x{i}" for i in range(N)])
    elif case == "geometry":
        other = write_maps_store(tmp_path / "o.zarr", maps["m1"], geometry=224)
    else:
        other = urls["m1"]
    extra = ["--layers", f"{other}=nope"] if case == "layer" else []
    capsys.readouterr()
    assert run_cli("rosetta", str(anchor), other, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("clipscope rosetta: error:")
    assert {"rows": "rows", "keys": "row-aligned", "geometry": "geometry", "layer": "'nope'"}[case] in err
    assert _untouched(str(anchor))


def test_cli_prints_concepts_and_tile_counts(zoo, tmp_path, capsys):
    store, others = _copy(zoo, tmp_path)
    capsys.readouterr()
    assert run_cli("rosetta", store.url, *others, "-k", "2", "--self-k", "2", "--tile", "4") == 0
    out = capsys.readouterr().out
    assert "best buddies" in out and "tiles:" in out and "concept 0" in out


KILL_SCRIPT = """
import os, signal, sys
from clipscope.pipelines.jobs import rosetta
from clipscope.storage.store import RunStore
count = [0]
def on_tile(tile, reused):
    count[0] += 1
    if count[0] == 7:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 of the driver in pass B
settings = rosetta.Settings(others=tuple(sys.argv[2:]), k=2, self_k=2, k_keep=16, tile=3)
rosetta.run(RunStore.open(sys.argv[1], "r+"), settings, on_tile=on_tile)
"""


def test_kill_9_of_the_driver_resumes_to_identical_bytes(zoo, tmp_path):
    import subprocess
    import sys

    fresh_store, others = _copy(zoo, tmp_path / "fresh")
    fresh = rosetta.run(fresh_store, _settings(others))
    store, _ = _copy(zoo, tmp_path / "killed")
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, store.url, *others])
    assert done.returncode == -9
    seen: list[bool] = []
    resumed = rosetta.run(RunStore.open(store.url, "r+"), _settings(others), on_tile=lambda t, r: seen.append(r))
    assert sum(seen) == 7 and len(seen) > 7  # finished tiles are read back, not recomputed
    _same_bytes(resumed, fresh)
