"""Throughput of the decomposition forward relative to bare `encode_image`, on the same batches.

Prints, per model and request, images/s of both and their ratio (decompose / encode_image), with
the two timed alternately in one process so machine noise hits both alike. Then the peak resident
memory per image of ViT-L-14 at batch 8, measured in fresh subprocesses (bare vs decompose).

    python benchmarks/extract_overhead.py [--models ViT-B-32 ViT-B-16] [--batch 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from clipscope.kernels.decompose import DecomposeRequest, decompose, folding
from clipscope.pipelines.models.loading import load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def requests_for(n_layers: int) -> dict[str, DecomposeRequest]:
    last = n_layers - 1
    return {
        "(a) heads+mlps": DecomposeRequest(),
        "(b) + second order": DecomposeRequest(second_order_layers=(last - 3,)),
        "(c) + tokens of last layer": DecomposeRequest(second_order_layers=(last - 3,), token_layers=(last,)),
    }


def time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def throughput(name: str, batch: int, rounds: int) -> list[dict]:
    loaded = load_model(name, "none")
    model, spec = loaded.model, loaded.spec
    images = torch.randn(batch, 3, *spec.image_size)
    bare = lambda: model.encode_image(images)  # noqa: E731
    rows = []
    with torch.inference_mode():
        bare()  # warm-up
        for label, req in requests_for(spec.n_layers).items():
            fold = folding(spec, req.convention)  # built once per model, as the extractor does
            ours = lambda req=req, fold=fold: decompose(spec, images, req, fold=fold)  # noqa: E731
            ours()
            t_bare, t_ours = [], []
            for _ in range(rounds):
                t_bare.append(time_once(bare))
                t_ours.append(time_once(ours))
            bare_ips, ours_ips = batch / min(t_bare), batch / min(t_ours)
            # Each round times both back to back; the median of those paired ratios is robust to the
            # machine's load drifting between rounds (a shared 2-core box drifts by 2x).
            paired = sorted(b / o for b, o in zip(t_bare, t_ours))
            rows.append({"model": name, "request": label, "batch": batch, "encode_image img/s": round(bare_ips, 2),
                         "decompose img/s": round(ours_ips, 2), "ratio of bests": round(ours_ips / bare_ips, 3),
                         "median paired ratio": round(paired[len(paired) // 2], 3)})
    return rows


def _peak_child(name: str, mode: str, batch: int) -> None:
    loaded = load_model(name, "none")
    spec = loaded.spec
    images = torch.randn(batch, 3, *spec.image_size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        if mode == "bare":
            loaded.model.encode_image(images)
        else:
            decompose(spec, images, DecomposeRequest(second_order_layers=(spec.n_layers - 4,),
                                                     token_layers=(spec.n_layers - 1,)))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_kib": after, "baseline_kib": before}))


def peak_memory(name: str, batch: int) -> dict:
    result = {"model": name, "batch": batch}
    for mode in ("bare", "decompose"):
        run = subprocess.run([sys.executable, __file__, "--peak-child", name, mode, str(batch)],
                             capture_output=True, text=True, check=True)
        data = json.loads(run.stdout.strip().splitlines()[-1])
        result[f"{mode} MiB/image"] = round((data["peak_kib"] - data["baseline_kib"]) / 1024 / batch, 1)
    result["ratio"] = round(result["decompose MiB/image"] / max(result["bare MiB/image"], 1e-9), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-model", default="ViT-L-14", help="'none' skips the memory measurement")
    parser.add_argument("--memory-batch", type=int, default=8)
    parser.add_argument("--peak-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_child:
        name, mode, batch = args.peak_child
        _peak_child(name, mode, int(batch))
        return
    print(f"torch {torch.__version__}, {args.threads} threads, CPU, batch {args.batch}, best of {args.rounds}")
    for name in args.models:
        for row in throughput(name, args.batch, args.rounds):
            print("  ".join(f"{k}={v}" for k, v in row.items()))
    if args.memory_model and args.memory_model != "none":
        row = peak_memory(args.memory_model, args.memory_batch)
        print("peak memory  " + "  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
