"""The GPU path, measured in one command: half-precision extraction against the bare forward.

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check.json            # one GPU, ≤ 6 min on an H200
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --quick --out q.json  # tiny models on CPU, ~20 s

No network, no Ray. Random-init open_clip ViT-B-32, ViT-B-16 and ViT-L-14 (`--quick`: the tiny
random-init config) read generated JPEGs that are first written as webdataset shards. Per model and
forward dtype (float16, bfloat16, float32) it measures:

- `bare_images_per_s`: the bare image tower (what `encode_image` computes, normalize=False) on
  random batches already on the device, and its peak device memory;
- `decompose_images_per_s`: the decomposition forward alone on the same batches (direct effects of
  every head and MLP), its peak memory;
- `extract`: `clipscope extract` end to end into a local store (tar read, decode on CPU threads
  through the bounded prefetch queue, pinned host batches, forward, store writes, sample index),
  once with direct effects of all heads and MLPs (`direct`) and once adding the second-order terms
  of one layer (`second_order`): images/s over every shard but the first (the warm-up), the run's
  wall time, peak device memory, and the ratio to the bare forward;
- `deviation`: against the float32 forward on the same images — the image embedding, the direct
  terms, the cosine of the embeddings — and the decomposition identity's max relative deviation
  (Σ terms vs the embedding, per image relative to max |embedding|, summed in float64) of the
  forward's own outputs and of the rows read back from the store; `within_bounds` compares them
  with `clipscope.pipelines.jobs.extract.precision.BOUNDS`;
- `batch_size_auto`: what `--batch-size auto` picks there (from the estimate and, on CUDA, from the
  measured per-image peak);

and the Rosetta accumulation (`kernels.rosetta.pair_stats_update`, a ViT-B/16 MLP layer against a
ResNet stage: 3072 × 2048 units over 14 × 14 positions) in TFLOP/s against `torch.matmul` of the
same shapes in the same dtype (every matmul dtype the accumulation offers). Float32 runs with TF32
off (recorded in `meta`). Last, the batched OMP path (`kernels.omp.dictionary_omp_path`, 512 neurons,
5,000 atoms, m = 8/32/128) on the device against the same call on the CPU: picks identical,
coefficients within 1e-10 of each neuron's largest, and both times. Results land in one JSON (`--out`), rewritten after every measurement, so
a run stopped by a time limit leaves what it had; `--budget-s` skips what would start after it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_data, a sibling script module

from bench_data import even_counts, make_dataset  # noqa: E402
from clipscope.kernels import rosetta  # noqa: E402
from clipscope.kernels.decompose import DecomposeRequest, decompose, folding  # noqa: E402
from clipscope.pipelines.jobs.extract import job as extract_job  # noqa: E402
from clipscope.pipelines.jobs.extract.batch_size import (  # noqa: E402
    estimated_bytes_per_image,
    measured_bytes_per_image,
    resolve_batch_size,
)
from clipscope.pipelines.jobs.extract.precision import BOUNDS, identity_deviation, relative_deviation  # noqa: E402
from clipscope.pipelines.jobs.extract.settings import ExtractConfig  # noqa: E402
from clipscope.pipelines.models.loading import load_model  # noqa: E402
from clipscope.storage.store import RunStore  # noqa: E402

FULL_MODELS = ("ViT-B-16", "ViT-L-14", "ViT-B-32")
QUICK_MODELS = ("clipscope-tiny",)
DTYPES = ("bfloat16", "float16", "float32")
GOAL_EXTRACT_RATIO = 0.85  # extraction / bare forward, bf16, ViT-B-16 and ViT-L-14, direct effects only
GOAL_ROSETTA_RATIO = 0.5  # Rosetta accumulation / same-dtype matmul


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    sync(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def rate(fn: Callable[[], Any], items: int, device: torch.device, rounds: int, warmup: int = 2) -> float:
    """items/s of fn over `rounds` calls after `warmup` calls (device synchronised around them)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    sync(device)
    return items * rounds / (time.perf_counter() - start)


def meta(args, device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "device": device.type,
        "cpu_count": os.cpu_count(), "quick": args.quick, "argv": sys.argv[1:],
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return info


class Results:
    """The JSON of results, rewritten whole after every measurement."""

    def __init__(self, path: str, head: dict[str, Any]):
        self.path = path
        self.data: dict[str, Any] = {"meta": head, "runs": [], "rosetta": [], "goals": {}}
        self.write()

    def write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=False)
        os.replace(tmp, self.path)


def forward_measurements(loaded, spec32, dtype: torch.dtype, device: torch.device, batch: int, rounds: int,
                         so_layer: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(0)
    images32 = torch.randn(batch, 3, *spec32.image_size, generator=gen).to(device)
    images = images32.to(dtype)
    visual = copy.deepcopy(loaded.model.visual).to(device=device, dtype=dtype).eval()
    with torch.inference_mode():
        reset_peak(device)
        out["bare_images_per_s"] = round(rate(lambda: visual(images), batch, device, rounds), 1)
        out["bare_peak_gib"] = peak_gib(device)
    del visual
    spec = spec32.to(dtype=dtype)
    direct = DecomposeRequest()
    fold = folding(spec, "split")
    with torch.inference_mode():
        reset_peak(device)
        out["decompose_images_per_s"] = round(
            rate(lambda: decompose(spec, images, direct, fold=fold), batch, device, rounds), 1)
        out["decompose_peak_gib"] = peak_gib(device)
        out["decompose_ratio"] = round(out["decompose_images_per_s"] / out["bare_images_per_s"], 3)
        # Exactness against float32 on the same images.
        n = min(batch, 16)
        request = DecomposeRequest(second_order_layers=(so_layer,))
        ref = decompose(spec32, images32[:n], request)
        low = decompose(spec, images[:n], request, fold=None)
    scale = ref.image_embedding.to(torch.float64).abs().amax(-1)
    d, r = low.direct, ref.direct
    q, q_ref = low.second_order[so_layer].weights, ref.second_order[so_layer].weights
    q_scale = q_ref.to(torch.float64).abs().reshape(n, -1).amax(-1)
    cos = torch.nn.functional.cosine_similarity(low.image_embedding.double(), ref.image_embedding.double(), dim=-1)
    dev = {
        "embedding": relative_deviation(low.image_embedding, ref.image_embedding, scale),
        "terms": max(relative_deviation(a, b, scale) for a, b in ((d.heads, r.heads), (d.mlps, r.mlps),
                                                                   (d.embedding, r.embedding))),
        "second_order": relative_deviation(q, q_ref, q_scale),
        "identity": float(identity_deviation(low.image_embedding, d.embedding, d.mlps, d.heads, d.bias).max()),
        "cosine_min": float(cos.min()),
    }
    bound = BOUNDS[str(dtype).removeprefix("torch.")]
    dev["within_bounds"] = bool(all(dev[k] <= getattr(bound, k) for k in ("embedding", "terms", "second_order",
                                                                          "identity"))
                                and dev["cosine_min"] >= bound.cosine)
    out["deviation"] = {k: (round(v, 7) if k == "cosine_min" else float(f"{v:.3e}") if isinstance(v, float) else v)
                        for k, v in dev.items()}
    # What --batch-size auto picks here.
    auto = {"estimated_mib_per_image": round(estimated_bytes_per_image(spec, direct, dtype) / 2**20, 2),
            "choice_from_estimate": resolve_batch_size("auto", spec, direct, dtype, device)}
    if device.type == "cuda":
        def forward(k: int) -> None:
            with torch.inference_mode():
                decompose(spec, images[:1].expand(k, -1, -1, -1).contiguous(), direct, fold=fold)

        per_image = measured_bytes_per_image(forward, device, sizes=(8, 32))
        auto["measured_mib_per_image"] = round(per_image / 2**20, 2)
        auto["choice_from_measurement"] = resolve_batch_size("auto", spec, direct, dtype, device, per_image=per_image)
    out["batch_size_auto"] = auto
    del spec, fold, images, images32, ref, low
    return out


def extract_measurement(name: str, dtype: str, shards: list[str], work: Path, device: torch.device, batch: int,
                        rows_per_chunk: int, decode_threads: int, second_order: tuple[int, ...]) -> dict[str, Any]:
    out_dir = work / f"store-{name}-{dtype}-{len(second_order)}"
    storage = "float32" if dtype == "float32" else "float16"
    config = ExtractConfig(data=tuple(shards), out=str(out_dir), model=name, pretrained="none", dtype=storage,
                           compute_dtype=dtype, device=device.type, batch_size=batch, rows_per_chunk=rows_per_chunk,
                           second_order_layers=second_order, decode_threads=decode_threads)
    reset_peak(device)
    started = time.perf_counter()
    summary = extract_job.run_extract(config, progress_display="off")
    wall = time.perf_counter() - started
    if not summary.ok:
        raise RuntimeError(f"extraction not ok: failed {summary.failed}, partial {summary.partial}")
    store = RunStore.open(str(out_dir), "r")
    records = sorted(store.shard_records().values(), key=lambda r: r["index"])
    steady = records[1:] if len(records) > 1 else records
    images = sum(r["count"] for r in steady)
    seconds = sum(r["seconds"] for r in steady)
    t = time.perf_counter()
    store.rows_checksum(steady[0]["start"], steady[0]["capacity"])  # what every shard's done record costs
    checksum_s = time.perf_counter() - t
    rows = slice(0, min(64, records[0]["count"]))
    arrays = {k: torch.from_numpy(store.read(k, rows)) for k in
              ("image_embedding", "direct/embedding", "direct/mlps", "direct/heads", "direct/bias")}
    identity = identity_deviation(arrays["image_embedding"], arrays["direct/embedding"], arrays["direct/mlps"],
                                  arrays["direct/heads"], arrays["direct/bias"])
    result = {"storage_dtype": storage, "images_per_s": round(images / seconds, 1), "steady_images": images,
              "wall_s": round(wall, 2), "peak_gib": peak_gib(device), "batch_size": batch,
              "decode_threads": decode_threads, "checksum_s_per_shard": round(checksum_s, 3), "identity_store": float(f"{float(identity.max()):.3e}"),
              "forward": records[0].get("forward")}
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def decode_rate(loaded, shards: list[str], threads: int, batch: int) -> float:
    """images/s of the extraction's input side alone: tar read, JPEG decode and the model's
    preprocess on `threads` threads through the bounded prefetch queue (the shards after the first)."""
    from clipscope.pipelines.data.prefetch import prefetch_batches
    from clipscope.pipelines.data.webdataset_input import decode_or_error, iter_shard_samples

    def samples():
        for path in shards[1:] or shards:
            yield from iter_shard_samples(path)

    def prepare(raw):
        image, _ = decode_or_error(raw)
        return None if image is None else loaded.preprocess(image)

    started, n = time.perf_counter(), 0
    for batch_ in prefetch_batches(samples(), batch_size=batch, depth=2, transform=prepare, image_of=lambda t: t,
                                   threads=threads):
        n += len(batch_.positions)
    return n / (time.perf_counter() - started)


def rosetta_measurement(device: torch.device, quick: bool, rounds: int) -> list[dict[str, Any]]:
    """pair_stats_update's TFLOP/s (the Σxyᵀ product: 2·P·U1·U2 flops) against torch.matmul."""
    if quick:
        n, u1, u2, size1, size2 = 4, 96, 64, 8, 4
    else:
        n, u1, u2, size1, size2 = 32, 3072, 2048, 14, 7
    params = inspect.signature(rosetta.pair_stats_update).parameters
    dtypes = [torch.float64] + ([torch.float32] if "matmul_dtype" in params else [])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, u1, size1, size1, generator=gen).to(device)
    y = torch.randn(n, u2, size2, size2, generator=gen).to(device)
    positions = n * size1 * size1
    flops = 2.0 * positions * u1 * u2
    rows = []
    for dt in dtypes:
        kwargs = {"matmul_dtype": dt} if "matmul_dtype" in params else {}
        stats = rosetta.init_pair_stats(x, y)
        update = lambda: rosetta.pair_stats_update(stats, x, y, **kwargs)  # noqa: E731
        with torch.inference_mode():
            reset_peak(device)
            accumulate = rate(update, 1, device, rounds, warmup=1) * flops / 1e12
            acc_peak = peak_gib(device)
            a = torch.randn(u1, positions, generator=gen).to(device=device, dtype=dt)
            b = torch.randn(positions, u2, generator=gen).to(device=device, dtype=dt)
            matmul = rate(lambda: a @ b, 1, device, rounds, warmup=1) * flops / 1e12
        rows.append({"matmul_dtype": str(dt).removeprefix("torch."), "units": [u1, u2],
                     "positions": positions, "accumulate_tflops": float(f"{accumulate:.4g}"),
                     "matmul_tflops": float(f"{matmul:.4g}"), "ratio": round(accumulate / matmul, 3),
                     "accumulate_peak_gib": acc_peak})
        del a, b, stats
    return rows


def omp_measurement(device: torch.device, quick: bool) -> dict[str, Any]:
    """The batched OMP path on the device against the same call on the CPU: identical picks, coefficients to
    1e-10 of each neuron's largest, and the time of each (the CPU's is the 2-core benchmark's kernel)."""
    from clipscope.kernels.omp import dictionary_omp_path

    neurons, atoms, width, sizes = (24, 300, 32, (2, 8, 16)) if quick else (512, 5000, 512, (8, 32, 128))
    g = np.random.default_rng(5)
    x = g.normal(size=(atoms, width))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = g.normal(size=(neurons, width))
    began = time.perf_counter()
    cpu = dictionary_omp_path(torch.from_numpy(x), torch.from_numpy(y), sizes)
    cpu_s = time.perf_counter() - began
    xd, yd = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    dictionary_omp_path(xd[:64], yd[:4], sizes[:1])  # warm-up (kernels, allocator)
    sync(device)
    began = time.perf_counter()
    dev = dictionary_omp_path(xd, yd, sizes)
    sync(device)
    dev_s = time.perf_counter() - began
    scale = cpu.coef.abs().amax(dim=-1, keepdim=True).clamp_min(1e-300)
    return {"neurons": neurons, "atoms": atoms, "width": width, "m": list(sizes),
            "support_device": dev.support.device.type, "picks_equal": bool(torch.equal(dev.support.cpu(), cpu.support)),
            "max_coef_deviation": float(((dev.coef.cpu() - cpu.coef).abs() / scale).max()),
            "cpu_s": round(cpu_s, 4), "device_s": round(dev_s, 4), "speedup": round(cpu_s / dev_s, 2)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the JSON of results")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models, few images (the CPU test's mode)")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--dtypes", nargs="+", default=None,
                        help="forward dtypes (default bfloat16 float16 float32; on CPU bfloat16 float32)")
    parser.add_argument("--images", type=int, default=None, help="images in the shards (default 2048, quick 24)")
    parser.add_argument("--shards", type=int, default=None, help="shards (default 8, quick 3); the first warms up")
    parser.add_argument("--batch", type=int, default=None, help="images per forward (default 256, quick 8)")
    parser.add_argument("--rounds", type=int, default=None, help="timed forwards per measurement (default 10, quick 2)")
    parser.add_argument("--decode-threads", type=int, default=None,
                        help="extraction decode threads (default: CPU count − 2, at most 14; quick 1)")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="start no measurement after this many seconds (default 330)")
    parser.add_argument("--work", default=None, help="folder for shards and stores (default: a temporary one)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (use --device cpu --quick on a CPU machine)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    quick = args.quick
    models = args.models or list(QUICK_MODELS if quick else FULL_MODELS)
    dtypes = args.dtypes or (list(DTYPES) if device.type == "cuda" else ["bfloat16", "float32"])
    n_images = args.images or (24 if quick else 2048)
    n_shards = args.shards or (3 if quick else 8)
    batch = args.batch or (8 if quick else 256)
    rounds = args.rounds or (2 if quick else 10)
    threads = args.decode_threads or (1 if quick else max(1, min(14, (os.cpu_count() or 2) - 2)))
    results = Results(args.out, meta(args, device))
    results.data["meta"].update(models=models, dtypes=dtypes, images=n_images, shards=n_shards, batch=batch,
                                rounds=rounds, decode_threads=threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        size = 64 if quick else 224
        shards = make_dataset(str(work), even_counts(n_images, n_shards), size=size)
        results.data["meta"]["dataset_s"] = round(time.perf_counter() - t, 1)
        cache: dict[str, Any] = {}
        decode_rates: dict[str, float] = {}

        def cached_load(name, pretrained="none", *, device="cpu", seed=0):
            if pretrained in ("none", None, "") and str(device) == "cpu":
                if (name, seed) not in cache:
                    cache[(name, seed)] = load_model(name, "none", seed=seed)
                return cache[(name, seed)]
            return load_model(name, pretrained, device=device, seed=seed)

        extract_job.load_model = cached_load  # the extraction loads each model once for all its runs
        print(f"gpu_check: {device} {results.data['meta'].get('gpu', '')} models {models} dtypes {dtypes} "
              f"{n_images} images in {n_shards} shards, batch {batch}", flush=True)
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for name in models:
                run: dict[str, Any] = {"model": name, "dtype": dtype_name}
                results.data["runs"].append(run)
                if time.perf_counter() - began > args.budget_s:
                    run["not_run"] = f"time budget of {args.budget_s:g}s spent"
                    results.write()
                    continue
                try:
                    loaded = cached_load(name)
                    if name not in decode_rates:
                        decode_rates[name] = round(decode_rate(loaded, shards, threads, batch), 1)
                    run["decode_images_per_s"] = decode_rates[name]
                    spec32 = loaded.spec.to(device=device)
                    so_layer = max(spec32.n_layers - 4, 0)
                    run.update(forward_measurements(loaded, spec32, dtype, device, batch, rounds, so_layer))
                    results.write()
                    for variant, layers in (("direct", ()), ("second_order", (so_layer,))):
                        try:
                            ex = extract_measurement(name, dtype_name, shards, work, device, batch, batch, threads,
                                                     layers)
                            ex["ratio_to_bare"] = round(ex["images_per_s"] / run["bare_images_per_s"], 3)
                        except Exception as err:  # noqa: BLE001 - a refusal (float16 on CPU) or a failure, recorded
                            ex = {"error": f"{type(err).__name__}: {err}"}
                        run[f"extract_{variant}"] = ex
                        results.write()
                    del spec32
                except Exception as err:  # noqa: BLE001 - one failing combination must not lose the others
                    run["error"] = f"{type(err).__name__}: {err}"
                    run["traceback"] = traceback.format_exc(limit=4)
                results.write()
                print(summary_line(run), flush=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if time.perf_counter() - began <= args.budget_s:
            try:
                results.data["rosetta"] = rosetta_measurement(device, quick, rounds)
            except Exception as err:  # noqa: BLE001
                results.data["rosetta"] = [{"error": f"{type(err).__name__}: {err}"}]
            for row in results.data["rosetta"]:
                print("rosetta " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        else:
            results.data["rosetta"] = [{"not_run": f"time budget of {args.budget_s:g}s spent"}]
        if time.perf_counter() - began <= args.budget_s:
            try:
                results.data["omp"] = omp_measurement(device, quick)
            except Exception as err:  # noqa: BLE001
                results.data["omp"] = {"error": f"{type(err).__name__}: {err}"}
            print("omp " + "  ".join(f"{k}={v}" for k, v in results.data["omp"].items()), flush=True)
        else:
            results.data["omp"] = {"not_run": f"time budget of {args.budget_s:g}s spent"}
        open_clip = sys.modules.get("open_clip")  # imported by the model loader (its CPU-torch workaround)
        results.data["meta"]["open_clip"] = getattr(open_clip, "__version__", None)
        results.data["goals"] = goals(results.data)
        results.data["meta"]["total_s"] = round(time.perf_counter() - began, 1)
        results.write()
        print(json.dumps(results.data["goals"]), flush=True)
        return results.data
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def summary_line(run: dict[str, Any]) -> str:
    parts = [f"{run['model']} {run['dtype']}:"]
    if "error" in run:
        return " ".join(parts + ["error", run["error"]])
    if "not_run" in run:
        return " ".join(parts + [run["not_run"]])
    parts.append(f"bare {run['bare_images_per_s']} img/s, decompose {run['decompose_images_per_s']}, "
                 f"decode {run['decode_images_per_s']}")
    for variant in ("direct", "second_order"):
        ex = run.get(f"extract_{variant}", {})
        parts.append(f"extract {variant} " + (f"{ex['images_per_s']} img/s (x{ex['ratio_to_bare']})"
                                              if "images_per_s" in ex else ex.get("error", "?")))
    parts.append(f"identity {run['deviation']['identity']:.1e}")
    return ", ".join(parts)


def goals(data: dict[str, Any]) -> dict[str, Any]:
    """The performance goals, judged on this run's numbers (None where it did not measure them)."""
    out: dict[str, Any] = {}
    for run in data["runs"]:
        if run["dtype"] == "bfloat16" and run["model"] in ("ViT-B-16", "ViT-L-14"):
            ratio = run.get("extract_direct", {}).get("ratio_to_bare")
            out[f"extract_direct_bf16_{run['model']}"] = {
                "ratio_to_bare": ratio, "goal": GOAL_EXTRACT_RATIO,
                "met": None if ratio is None else ratio >= GOAL_EXTRACT_RATIO}
    for row in data.get("rosetta", []):
        if "ratio" in row:
            out[f"rosetta_{row['matmul_dtype']}"] = {"ratio_to_matmul": row["ratio"], "goal": GOAL_ROSETTA_RATIO,
                                                     "met": row["ratio"] >= GOAL_ROSETTA_RATIO}
    return out


if __name__ == "__main__":
    main()
