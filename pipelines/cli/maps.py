"""`clipscope maps DATA... --out STORE --zoo SPEC`: activation maps of any torch vision model (Rosetta's inputs)."""

from __future__ import annotations

import argparse

from clipscope.pipelines.cli import exit_codes
from clipscope.pipelines.cli._executor_args import add_executor_arguments, address_from, workers_from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="+", metavar="DATA", help="webdataset shards (as for extract)")
    parser.add_argument("--out", required=True, help="the maps store: a path or fsspec URL")
    parser.add_argument("--zoo", required=True,
                        help="torchvision:NAME, open_clip:NAME, timm:NAME, python:pkg.module:factory, or a "
                             "registered model (shapes-oracle, shapes-cnn)")
    parser.add_argument("--checkpoint", default=None, help="state dict of the network (default: random init)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random init")
    parser.add_argument("--layers", nargs="+", default=(), metavar="MODULE",
                        help="named modules to hook (default: the model's own, e.g. layer1..layer4)")
    parser.add_argument("--geometry", type=int, default=224,
                        help="shared field of view S: shorter side to S, centre crop S×S (recorded, checked by rosetta)")
    parser.add_argument("--dtype", default="float16", help="storage dtype: float16 or float32")
    parser.add_argument("--unit-chunk", type=int, default=256,
                        help="units per inner zarr chunk (a Rosetta tile decodes only its units' chunks); 0: none")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--rows-per-chunk", type=int, default=256, help="zarr chunk rows along `sample`")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_executor_arguments(parser)
    parser.add_argument("--retry-failed", action="store_true", help="retry shards recorded as failed")
    parser.add_argument("--allow-local-store", action="store_true",
                        help="allow a local path on a multi-node cluster (it is on a shared mount)")
    parser.add_argument("--progress", choices=["auto", "bar", "log", "off"], default="auto", help="progress display")


def run(args) -> int:
    from clipscope.pipelines.jobs.maps.job import run_maps
    from clipscope.pipelines.jobs.maps.settings import MapsConfig

    config = MapsConfig(
        data=tuple(args.data), out=args.out, zoo=args.zoo, checkpoint=args.checkpoint, seed=args.seed,
        layers=tuple(args.layers), geometry=args.geometry, unit_chunk=args.unit_chunk or None, dtype=args.dtype,
        batch_size=args.batch_size,
        rows_per_chunk=args.rows_per_chunk, device=args.device, workers=workers_from(args),
        address=address_from(args), retry_failed=args.retry_failed, allow_local_store=args.allow_local_store)
    summary = run_maps(config, progress_display=args.progress)
    print(f"store {summary.store}: {summary.done} shards mapped, {summary.skipped} already done, "
          f"{len(summary.failed)} failed, {summary.images} images in {summary.seconds:.1f}s")
    for index, error in summary.failed:
        print(f"  failed shard {index}: {error}")
    if summary.failed:
        return exit_codes.FAILED_SHARDS
    return exit_codes.PARTIAL if summary.partial else exit_codes.OK
