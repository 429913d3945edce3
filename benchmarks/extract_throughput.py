"""End-to-end extraction throughput on CPU, against the bare model and the input pipeline alone.

On a generated webdataset of 224-px JPEGs, times, alternately in one process (best of --rounds):

* extract: `ShardExtractor.process` over every shard (tar read, decode, preprocess, decompose with
  heads + MLPs + one second-order layer, float16 store writes, sample index);
* decompose: `decompose` alone on the same preprocessed batches;
* encode_image: the bare `model.encode_image` on the same preprocessed batches;
* decode+preprocess: tar read, decode and the model's preprocess alone;

and prints images/s of each and the ratios extract / encode_image and extract / decode+preprocess.

    python benchmarks/extract_throughput.py [--model ViT-B-32] [--images 64] [--shards 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from clipscope.kernels.decompose import decompose  # noqa: E402
from clipscope.pipelines.jobs.extract.job import (  # noqa: E402
    ShardExtractor,
    build_request,
    open_or_create_store,
    plan_run,
)
from clipscope.pipelines.jobs.extract.settings import ExtractConfig  # noqa: E402
from clipscope.pipelines.models.loading import load_model  # noqa: E402
from bench_data import even_counts, make_dataset  # noqa: E402  (sibling module of this script)
from clipscope.pipelines.data.webdataset_input import decode_or_error, iter_shard_samples  # noqa: E402


def decode_and_preprocess(paths: list[str], preprocess) -> list[torch.Tensor]:
    out = []
    for path in paths:
        for raw in iter_shard_samples(path):
            image, error = decode_or_error(raw)
            if error is None:
                out.append(preprocess(image))
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--second-order-layer", type=int, default=8)
    parser.add_argument("--rows-per-chunk", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="clipscope-bench-") as tmp:
        paths = make_dataset(tmp, even_counts(args.images, args.shards))
        mib = sum(os.path.getsize(p) for p in paths) / 2**20
        config = ExtractConfig(data=tuple(paths), out=os.path.join(tmp, "store.zarr"), model=args.model,
                               second_order_layers=(args.second_order_layer,), dtype="float16",
                               batch_size=args.batch, rows_per_chunk=args.rows_per_chunk, device="cpu")
        loaded = load_model(config.model, config.pretrained, seed=config.seed)
        plan = plan_run(config)
        open_or_create_store(config, plan, loaded)
        extractor = ShardExtractor(config, loaded)
        request = build_request(config).validated(loaded.spec)

        # Per shard, the same preprocessed batches for the model-only timings.
        shard_batches = []
        for path in paths:
            tensors = decode_and_preprocess([path], loaded.preprocess)
            shard_batches.append([torch.stack(tensors[i:i + args.batch]) for i in range(0, len(tensors), args.batch)])
        n = sum(len(b) for batches in shard_batches for b in batches)

        def run_decompose(batches):
            for batch in batches:
                decompose(loaded.spec, batch, request)

        def run_encode(batches):
            with torch.inference_mode():
                for batch in batches:
                    loaded.model.encode_image(batch)

        run_encode(shard_batches[0][:1])  # warm-up
        run_decompose(shard_batches[0][:1])
        # The four jobs alternate shard by shard, so a change in machine load hits all of them alike.
        rounds = []
        for _ in range(args.rounds):
            total = dict.fromkeys(("extract", "decompose", "encode_image", "decode+preprocess"), 0.0)
            for task, path, batches in zip(plan.tasks, paths, shard_batches):
                total["extract"] += timed(lambda: extractor.process(task))  # rewrites the shard whole
                total["decompose"] += timed(lambda: run_decompose(batches))
                total["encode_image"] += timed(lambda: run_encode(batches))
                total["decode+preprocess"] += timed(lambda: decode_and_preprocess([path], loaded.preprocess))
            rounds.append(total)
        best = {name: min(r[name] for r in rounds) for name in rounds[0]}

    ips = {name: n / seconds for name, seconds in best.items()}
    print(f"torch {torch.__version__}, CPU, {args.threads} threads; {args.model} random init; {n} JPEGs "
          f"({mib:.1f} MiB) of 224 px in {args.shards} shards; batch {args.batch}; heads + MLPs + second-order "
          f"layer {args.second_order_layer}; float16 store, {args.rows_per_chunk} rows per chunk; "
          f"best of {args.rounds}")
    for name, value in ips.items():
        print(f"  {name:18s} {value:8.2f} img/s")
    print(f"  ratio extract / encode_image      = {ips['extract'] / ips['encode_image']:.3f}")
    print(f"  ratio extract / decompose         = {ips['extract'] / ips['decompose']:.3f}")
    print(f"  ratio extract / decode+preprocess = {ips['extract'] / ips['decode+preprocess']:.3f}")


if __name__ == "__main__":
    main()
