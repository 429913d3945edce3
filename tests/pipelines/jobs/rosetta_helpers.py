"""Helpers of the Rosetta tests: synthetic maps stores (row-aligned, like `clipscope maps` makes them) and the
naive reference computations (np.corrcoef of naively resized maps, a literal official per-batch loop)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clipscope.storage import schema
from clipscope.storage.store import RunStore


def write_maps_store(path, layers: dict[str, np.ndarray], *, rows_per_chunk: int = 4, geometry: int = 48,
                     invalid: tuple[int, ...] = (), name: str = "synthetic", keys=None) -> str:
    """A maps store of N samples (rows padded to whole chunks, `invalid` rows not decoded) in 2 shards."""
    n = next(iter(layers.values())).shape[0]
    half = (n + 1) // 2
    sizes = [half, n - half]
    blocks, start = [], 0
    for count in sizes:
        capacity = -(-count // rows_per_chunk) * rows_per_chunk
        blocks.append((start, capacity, count))
        start += capacity
    specs = [schema.MAPS.spec(v.shape[1:], "float32", layer=k) for k, v in layers.items()]
    attrs = {"maps": {"layers": list(layers), "shapes": {k: list(v.shape[1:]) for k, v in layers.items()}},
             "geometry": {"size": geometry}, "model": {"name": name}, "shards": [f"s{i}" for i in range(2)],
             "shard_counts": sizes, "row_blocks": [[s, c] for s, c, _ in blocks]}
    store = RunStore.create(str(path), arrays=specs, n_rows=start, rows_per_chunk=rows_per_chunk, attrs=attrs)
    keys = keys or [f"k{i:04d}" for i in range(n)]
    sample = 0
    for index, (s, capacity, count) in enumerate(blocks):
        valid = np.zeros(capacity, bool)
        data = {spec.name: np.zeros((capacity, *spec.shape_tail), np.float32) for spec in specs}
        rows = []
        for i in range(count):
            valid[i] = sample not in invalid
            for k, v in layers.items():
                data[schema.MAPS.path(layer=k)][i] = v[sample]
            rows.append({"row": s + i, "key": keys[sample], "shard": f"s{index}", "shard_index": index,
                         "label": None, "caption": None, "error": None})
            sample += 1
        for c in range(0, capacity, rows_per_chunk):
            store.write_rows(s + c, {k: v[c:c + rows_per_chunk] for k, v in data.items()},
                             valid[c:c + rows_per_chunk])
        store.write_samples_part(index, rows)
        store.mark_shard_done(index, {"url": f"s{index}", "count": count, "valid": int(valid.sum()), "errors": 0,
                                      "seconds": 0.0, "checksum": "-"})
    store.merge_samples()
    return str(path)


def resized_flat(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[unit, image·position] of maps bilinearly resized to `size` (align_corners=False), float64."""
    t = torch.from_numpy(maps.astype(np.float64))
    if tuple(t.shape[2:]) != size:
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return t.permute(1, 0, 2, 3).reshape(maps.shape[1], -1).numpy()


def naive_matrix(x_layers: list[np.ndarray], y_layers: list[np.ndarray]) -> np.ndarray:
    """Pearson of every unit pair (layer-major units) by np.corrcoef of naively resized maps; 0 for constants."""
    rows = []
    for x in x_layers:
        cols = []
        for y in y_layers:
            size = (max(x.shape[2], y.shape[2]), max(x.shape[3], y.shape[3]))
            fx, fy = resized_flat(x, size), resized_flat(y, size)
            with np.errstate(invalid="ignore", divide="ignore"):
                c = np.corrcoef(np.concatenate([fx, fy]))[: len(fx), len(fx):]
            const_x = fx.std(axis=1) < 1e-9 * (1 + np.abs(fx).max(axis=1))
            const_y = fy.std(axis=1) < 1e-9 * (1 + np.abs(fy).max(axis=1))
            c[const_x, :] = 0
            c[:, const_y] = 0
            cols.append(c)
        rows.append(np.concatenate(cols, axis=1))
    return np.concatenate(rows, axis=0)
