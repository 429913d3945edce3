"""Store write speed of `RunStore.write_rows` against raw zarr, and bytes per image per array.

The arrays are those `clipscope extract` writes for ViT-B-32 with heads + MLPs of every layer and
one second-order layer, stored as float16 (taken from `extract.array_specs`, so they are the
pipeline's own). Both writers get the same random rows, chunk by chunk (`rows_per_chunk` rows per
call, every array at once, as `ShardExtractor` flushes), into fresh local stores, alternating
RunStore / raw zarr round by round (best of --rounds). Raw zarr is `zarr.create_array` with the
same shape, chunks, dtype, fill value and default codecs, then slice assignment.

Bytes per image: from the shapes (uncompressed) and measured from the stored chunk files (random
values barely compress; real decompositions compress a little better).

    python benchmarks/store_write.py [--rows 512] [--rows-per-chunk 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import zarr  # noqa: E402
from zarr.storage import LocalStore  # noqa: E402

from clipscope.pipelines.jobs.extract.job import array_specs  # noqa: E402
from clipscope.pipelines.jobs.extract.settings import ExtractConfig  # noqa: E402
from clipscope.pipelines.models.loading import load_model  # noqa: E402
from clipscope.storage.store import RunStore  # noqa: E402


def folder_bytes(path: str) -> int:
    """Bytes of the chunk files under an array's folder (metadata excluded)."""
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files if f != "zarr.json")
    return total


def write_runstore(url: str, specs, data, valid, rpc: int) -> float:
    store = RunStore.create(url, arrays=specs, n_rows=len(valid), rows_per_chunk=rpc, attrs={})
    start = time.perf_counter()
    for lo in range(0, len(valid), rpc):
        store.write_rows(lo, {name: values[lo:lo + rpc] for name, values in data.items()}, valid[lo:lo + rpc])
    return time.perf_counter() - start


def write_raw(url: str, specs, data, valid, rpc: int) -> float:
    store = LocalStore(url)
    root = zarr.create_group(store, zarr_format=3)
    arrays = {"valid": root.create_array("valid", shape=valid.shape, chunks=(rpc,), dtype="bool", fill_value=0,
                                         dimension_names=("sample",))}
    for spec in specs:
        arrays[spec.name] = root.create_array(spec.name, shape=(len(valid), *spec.shape_tail),
                                              chunks=(rpc, *spec.shape_tail), dtype=spec.dtype, fill_value=0,
                                              dimension_names=spec.dims)
    start = time.perf_counter()
    for lo in range(0, len(valid), rpc):
        rows = slice(lo, lo + rpc)
        for name, values in data.items():
            arrays[name][rows] = values[rows]
        arrays["valid"][rows] = valid[rows]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--second-order-layer", type=int, default=8)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--rows-per-chunk", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rpc = args.rows_per_chunk
    n_rows = -(-args.rows // rpc) * rpc

    spec = load_model(args.model, "none").spec
    config = ExtractConfig(data=("unused.tar",), out="unused", model=args.model, dtype="float16",
                           second_order_layers=(args.second_order_layer,), rows_per_chunk=rpc)
    specs = array_specs(config, spec)
    rng = np.random.default_rng(0)
    data = {s.name: rng.standard_normal((n_rows, *s.shape_tail), dtype=np.float32).astype(np.float16) for s in specs}
    valid = np.ones(n_rows, bool)
    payload = sum(v.nbytes for v in data.values()) + valid.nbytes

    times = {"RunStore.write_rows": [], "raw zarr": []}
    tmp = tempfile.mkdtemp(prefix="clipscope-store-bench-")
    try:
        for r in range(args.rounds):
            for name, writer in (("RunStore.write_rows", write_runstore), ("raw zarr", write_raw)):
                url = os.path.join(tmp, f"{name.split('.')[0]}-{r}.zarr")
                times[name].append(writer(url, specs, data, valid, rpc))
                if r < args.rounds - 1:
                    shutil.rmtree(url)
        kept = os.path.join(tmp, f"RunStore-{args.rounds - 1}.zarr")
        stored = {s.name: folder_bytes(os.path.join(kept, s.name)) for s in specs}
        raw_stored = sum(folder_bytes(os.path.join(tmp, f"raw zarr-{args.rounds - 1}.zarr", s.name)) for s in specs)
    finally:
        shutil.rmtree(tmp)

    mbs = {name: payload / 1e6 / min(t) for name, t in times.items()}
    print(f"{args.model} (L={spec.n_layers}, H={spec.n_heads}, D={spec.embed_dim}, N={spec.mlp_width}), heads + MLPs "
          f"of every layer, second-order layer {args.second_order_layer}, float16; {n_rows} rows, {rpc} rows per "
          f"chunk, {payload / 1e6:.1f} MB per round, best of {args.rounds}")
    for name, value in mbs.items():
        print(f"  {name:20s} {value:8.1f} MB/s")
    print(f"  ratio RunStore / raw zarr = {mbs['RunStore.write_rows'] / mbs['raw zarr']:.3f}")
    print(f"\n  {'array':34s} {'dims':38s} {'B/image (shape)':>16s} {'B/image (stored)':>17s}")
    total_shape = total_stored = 0
    for s in specs:
        per_image = int(np.prod(s.shape_tail)) * np.dtype(s.dtype).itemsize
        measured = stored[s.name] / n_rows
        total_shape += per_image
        total_stored += measured
        print(f"  {s.name:34s} {','.join(s.dims):38s} {per_image:16,d} {measured:17,.0f}")
    print(f"  {'total':34s} {'':38s} {total_shape:16,d} {total_stored:17,.0f}")
    print(f"  (raw zarr stores {raw_stored / n_rows:,.0f} B/image for the same arrays; "
          "valid adds 1 B/image before compression)")


if __name__ == "__main__":
    main()
