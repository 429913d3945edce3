"""Response time of every page of `clipscope view` on a store of ≥ 100,000 rows.

Builds (once, in --dir) a synthetic store shaped like a shapes-world extraction — 4 layers × 4 heads, embed 32,
per-token terms of the last layer, TextSpan results of two layers, second-order statistics and OMP texts of
256 neurons — over real shapes-world shards (--shards × --per-shard images, 48 px PNGs), with random float16
values for the per-sample arrays (the viewer's cost depends on the bytes it reads, not on their values). Its
model identity is the shipped shapes-world CLIP, so text queries encode texts for real. Then serves the app
with waitress on 127.0.0.1 and times each page over HTTP: the first request (cold: sample index, model,
member index, thumbnail not yet cached) and the median of --repeat later ones.

    python benchmarks/view_latency.py [--dir /tmp/clipscope-view-bench] [--shards 10] [--per-shard 10000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import urllib.parse
import urllib.request

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from clipscope.pipelines.data.member_index import build_member_index  # noqa: E402
from clipscope.pipelines.texts.embedding_cache import embeddings_key, write_texts  # noqa: E402
from clipscope.pipelines.texts.pools import get_pool  # noqa: E402
from clipscope.storage import schema  # noqa: E402
from clipscope.storage.layout import plan_row_blocks, total_rows  # noqa: E402
from clipscope.storage.manifest import mark_shard_done  # noqa: E402
from clipscope.storage.sample_index import merge_samples, write_samples_part  # noqa: E402
from clipscope.storage.store import RunStore  # noqa: E402

LAYERS, HEADS, EMBED, GRID, NEURONS, RPC = 4, 4, 32, 6, 256, 1024
NEURON_LAYER, PICKS, TOP_K, M = 2, 5, 20, (1, 2, 4, 8)


def build(folder: str, shards: int, per_shard: int, seed: int = 0) -> str:
    from clipscope.pipelines.models.loading import sha256_file
    from clipscope.pipelines.worlds.shapes.train import CHECKPOINT, SHAPES_MODEL
    from clipscope.pipelines.worlds.shapes.world import generate_scenes, to_sample, world_config
    from clipscope.pipelines.data.webdataset_input import write_shard

    url = os.path.join(folder, "store")
    if os.path.exists(os.path.join(url, "samples.parquet")):
        return url
    data = os.path.join(folder, "data")
    os.makedirs(data, exist_ok=True)
    config = world_config(48)
    started = time.perf_counter()
    paths, keys = [], []
    for shard in range(shards):
        path = os.path.join(data, f"shapes-{shard:05d}.tar")
        samples = [to_sample(scene, seed=seed, index=shard * per_shard + i, config=config)
                   for i, scene in enumerate(generate_scenes(per_shard, seed, start=shard * per_shard, config=config))]
        write_shard(path, samples)
        paths.append(path)
        keys.append([s["__key__"] for s in samples])
    print(f"shards: {shards} × {per_shard} images in {time.perf_counter() - started:.1f} s")
    blocks = plan_row_blocks([per_shard] * shards, RPC)
    n_rows = total_rows(blocks)
    tokens = 1 + GRID * GRID
    specs = [schema.IMAGE_EMBEDDING.spec((EMBED,), "float16"), schema.DIRECT_EMBEDDING.spec((EMBED,), "float16"),
             schema.DIRECT_BIAS.spec((EMBED,), "float16"), schema.DIRECT_MLPS.spec((LAYERS, EMBED), "float16"),
             schema.DIRECT_HEADS.spec((LAYERS, HEADS, EMBED), "float16"),
             schema.DIRECT_TOKENS.spec((1, HEADS, tokens, EMBED), "float16"),
             schema.SECOND_ORDER_WEIGHTS.spec((1, HEADS, NEURONS), "float16", layer=NEURON_LAYER)]
    attrs = {"model": {"name": SHAPES_MODEL, "pretrained": str(CHECKPOINT), "sha256": sha256_file(CHECKPOINT)},
             "model_spec": {"n_layers": LAYERS, "n_heads": HEADS, "width": 64, "embed_dim": EMBED,
                            "n_tokens": tokens, "image_size": [48, 48], "patch_size": [8, 8]},
             "shards": paths, "shard_counts": [per_shard] * shards, "ln_convention": "split",
             "row_blocks": [[b.start, b.capacity] for b in blocks],
             "layers": {"heads": list(range(LAYERS)), "tokens": [LAYERS - 1],
                        "second_order": {str(NEURON_LAYER): [LAYERS - 1]}, "activations": []},
             "config": {"benchmark": "view_latency"}}
    store = RunStore.create(url, arrays=specs, n_rows=n_rows, rows_per_chunk=RPC, attrs=attrs)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    for block, shard_keys in zip(blocks, keys):
        for start in range(block.start, block.stop, RPC):
            arrays = {s.name: rng.standard_normal((RPC, *s.shape_tail)).astype(np.float16)
                      for s in specs if not s.name.startswith("second_order/")}
            valid = np.arange(start, start + RPC) < block.start + block.count
            store.write_rows(start, arrays, valid)
        write_samples_part(store, block.index, [
            {"row": block.start + i, "key": key, "shard": paths[block.index], "label": i % 56}
            for i, key in enumerate(shard_keys)])
        mark_shard_done(store, block.index, {"url": paths[block.index], "count": block.count, "valid": block.count,
                                             "errors": 0, "seconds": 0.0, "checksum": "synthetic"})
    merge_samples(store)
    print(f"rows: {n_rows} written in {time.perf_counter() - started:.1f} s")
    pool = get_pool("shapes-all")
    key = embeddings_key(pool.texts, store.info.model.to_dict())
    write_texts(store, key, pool.texts, pool.name)
    n_texts = len(pool.texts)
    for layer in (2, 3):
        attrs = {"pool": pool.name, "n_texts": n_texts, "texts_key": key, "basis_size": PICKS,
                 "span_ranks_used": [16] * HEADS}
        ratios = np.sort(rng.random((HEADS, PICKS)))[:, ::-1] / PICKS
        store.write_result_group(f"reductions/textspan/layer_{layer}", {
            "indices": (rng.choice(n_texts, (HEADS, PICKS)).astype(np.int64), ("head", "pick"), attrs),
            "variances": (ratios * 0.01, ("head", "pick"), attrs),
            "explained_ratio": (ratios, ("head", "pick"), attrs)}, attrs)
    valid_rows = np.flatnonzero(store.read_valid())
    group = schema.SECOND_ORDER.path(layer=NEURON_LAYER)
    edges = 2.0 ** (np.arange(-80, 41) / 8)
    arrays = {leaf: (rng.random(NEURONS), ("neuron",)) for leaf in
              ("norm_mean", "norm_max", "norm_p98", "energy_topk", "significant_share", "pc_explained")}
    arrays["norm_histogram"] = (rng.integers(0, 1000, (NEURONS, edges.size - 1)), ("neuron", "bin"))
    arrays["norm_bin_edges"] = (edges, ("edge",))
    arrays["topk_rows"] = (np.stack([rng.choice(valid_rows, TOP_K, replace=False) for _ in range(NEURONS)]),
                           ("neuron", "rank"))
    arrays["topk_norms"] = (np.sort(rng.random((NEURONS, TOP_K)))[:, ::-1], ("neuron", "rank"))
    arrays["pc"] = (rng.standard_normal((NEURONS, EMBED)), ("neuron", "embed"))
    store.write_result_group(group, arrays, {"top_k": TOP_K})
    omp_attrs = {"pool": pool.name, "pool_hash": pool.hash, "n_texts": n_texts, "texts_key": key, "m": list(M),
                 "preprocessing": "none", "pc_sha256": "synthetic"}
    store.write_result_group(schema.OMP.path(layer=NEURON_LAYER), {
        "m": (np.asarray(M, np.int64), ("m",), omp_attrs),
        "support": (np.stack([rng.choice(n_texts, max(M), replace=False) for _ in range(NEURONS)]),
                    ("neuron", "pick"), omp_attrs),
        "coefs": (rng.standard_normal((len(M), NEURONS, max(M))), ("m", "neuron", "pick"), omp_attrs),
        "residual_norm": (rng.random((NEURONS, len(M))), ("neuron", "m"), omp_attrs)}, omp_attrs)
    build_member_index(store)
    return url


def fetch(url: str) -> tuple[float, int, int]:
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(url) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    return time.perf_counter() - started, status, len(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/clipscope-view-bench")
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--per-shard", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    url = build(args.dir, args.shards, args.per_shard)

    from waitress import create_server

    from clipscope.pipelines.view import StoreView, create_app

    view = StoreView(url)
    print(f"store: {url}, {view.info.n_rows} rows ({view.store.rows_per_chunk} per chunk)")
    started = time.perf_counter()
    view.model()
    print(f"model load (once per server, before the first text query): {time.perf_counter() - started:.2f} s")
    server = create_server(create_app(view), host="127.0.0.1", port=0, threads=4)
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{server.effective_port}"
    key = "shapes-s0-00054321"
    text = urllib.parse.quote("a red circle")
    pages = [
        ("run", "/"), ("heads", "/heads?layer=3"), ("head, top images for a text (scan)", f"/heads/3/1?text={text}"),
        ("neurons", f"/neurons?layer={NEURON_LAYER}"), ("neuron", f"/neurons/{NEURON_LAYER}/17"),
        ("images (48 keys)", "/images?page=1000"), ("image", f"/image/{key}"),
        ("image + neighbours (scan)", f"/image/{key}?layer=3&head=2"),
        ("neighbours (json, scan)", f"/api/neighbours?key={key}&layer=3&head=2"),
        ("topic map (json)", f"/api/map?key={key}&text={text}"), ("topic map (png)", f"/map.png?key={key}&text={text}"),
        ("contrastive map, one head (json)", f"/api/map?key={key}&text={text}&contrast=blue&map=3:1"),
        ("thumbnail 96 px", f"/thumb?key={key}&size=96"), ("segmentation", "/segmentation"), ("rosetta", "/rosetta"),
        ("bad key (404 page)", "/image/no-such-key"),
    ]
    print(f"{'page':40s} {'status':>6s} {'first (s)':>10s} {'median (s)':>11s} {'bytes':>9s}")
    for name, path in pages:
        first, status, size = fetch(base + path)
        times = [fetch(base + path)[0] for _ in range(args.repeat)]
        print(f"{name:40s} {status:6d} {first:10.3f} {statistics.median(times):11.3f} {size:9d}")
    other = [fetch(base + f"/thumb?key=shapes-s0-{i:08d}&size=128")[0] for i in range(20000, 20020)]
    print(f"{'thumbnail, 20 other keys (uncached)':40s} {200:6d} {'':10s} {statistics.median(other):11.3f}")


if __name__ == "__main__":
    main()
