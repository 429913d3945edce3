"""`clipscope extract DATA... --model NAME --pretrained TAG|PATH|none --out STORE`."""

from __future__ import annotations

import argparse

from clipscope.errors import ConfigError
from clipscope.pipelines.cli import exit_codes
from clipscope.pipelines.cli._executor_args import add_executor_arguments, address_from, workers_from


def layer_list(text: str) -> tuple[int, ...] | None:
    """'9 10 11', '9,10,11', 'all' (None) or 'none' (empty)."""
    text = text.strip().lower()
    if text == "all":
        return None
    if text in ("", "none"):
        return ()
    try:
        return tuple(int(part) for part in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer numbers like '9 10 11', 'all' or 'none', got {text!r}")


def batch_size(text: str) -> int | str:
    """A number of images, or 'auto' (validated further by ExtractConfig)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of images or 'auto', got {text!r}")


def _layers(values) -> tuple[int, ...] | None:
    if values is None:
        return ()
    out: list[int] = []
    for v in values:
        if v is None:
            return None
        out.extend(v)
    return tuple(out)


MODEL_REQUIRED = (
    "--model is required: a trained CLIP, e.g. `--model ViT-B-32 --pretrained /path/to/ViT-B-32.pt` (a local "
    "open_clip checkpoint; `--pretrained openai` when online), the bundled shapes-world CLIP "
    "`--model clipscope-shapes --pretrained pipelines/worlds/shapes/assets/clipscope-shapes.safetensors`, or a random-init "
    "config for trying the machinery (`--model clipscope-tiny --pretrained none`); `clipscope models` lists them"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="+", metavar="DATA",
                        help="webdataset shards: paths, brace patterns (shards/{000..009}.tar), dirs, globs or URLs")
    parser.add_argument("--out", required=True, help="the run store: a path or fsspec URL (s3://, gs://, file://)")
    parser.add_argument("--model", default=None,
                        help="required: an open_clip architecture (`clipscope models` marks the supported ones), "
                             "local-dir:PATH or hf-hub:ORG/REPO")
    parser.add_argument("--pretrained", default="none",
                        help="pretrained tag (offline: a local checkpoint .pt/.safetensors instead), checkpoint "
                             "path, or none (random init: a warning says so, results describe noise)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random init (--pretrained none)")
    parser.add_argument("--heads-layers", type=layer_list, nargs="+", default=[None], metavar="L",
                        help="layers whose heads/MLPs are stored (default all)")
    parser.add_argument("--second-order-layers", type=layer_list, nargs="+", metavar="L", help="neuron layers")
    parser.add_argument("--token-layers", type=layer_list, nargs="+", metavar="L",
                        help="layers whose per-token head terms are stored")
    parser.add_argument("--activation-layers", type=layer_list, nargs="+", metavar="L",
                        help="layers whose post-activation MLP maps are stored (Rosetta, segmentation)")
    parser.add_argument("--masks", nargs="?", const="mask.png", default=None, metavar="MEMBER",
                        help="store each sample's mask member (default mask.png; .png or .npy) as `masks`, after "
                             "the image's resize and crop (segmentation)")
    parser.add_argument("--mask-geometry", default="preprocess",
                        help="preprocess (the image's geometry) or reference (squash to the input size, as the "
                             "official segmentation code)")
    parser.add_argument("--group-key", default="group", help="json key of a sample's group (samples.parquet `group`)")
    parser.add_argument("--token-sum", action="store_true",
                        help="store direct/token_sum: per token, the sum over every layer and head (segmentation)")
    parser.add_argument("--attention-layers", type=layer_list, nargs="+", metavar="L",
                        help="layers whose class-token attention row is stored (raw-attention baseline)")
    # Validated by ExtractConfig (one-line error), not argparse choices (a usage dump).
    parser.add_argument("--ln-convention", default="split", help="ln_post convention: split or center")
    parser.add_argument("--dtype", default="float32", help="storage dtype: float16 or float32")
    parser.add_argument("--compute-dtype", default="auto",
                        help="the forward's dtype: auto (the storage dtype on CUDA, float32 on CPU), float32, "
                             "bfloat16, or float16 (CUDA only); docs/methods.md gives their exactness bounds")
    parser.add_argument("--batch-size", type=batch_size, default=32,
                        help="images per forward pass, or auto (from the device's free memory)")
    parser.add_argument("--decode-threads", type=int, default=None,
                        help="CPU threads decoding images beside the forward (default 8 with CUDA, 1 on CPU)")
    parser.add_argument("--rows-per-chunk", type=int, default=256, help="zarr chunk rows along `sample`")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_executor_arguments(parser)
    parser.add_argument("--retry-failed", action="store_true", help="retry shards recorded as failed")
    parser.add_argument("--allow-partial", action="store_true",
                        help="exit 0 even when samples of some shards were lost (truncated tar, stale counts)")
    parser.add_argument("--allow-local-store", action="store_true",
                        help="allow a local path on a multi-node cluster (it is on a shared mount)")
    parser.add_argument("--progress", choices=["auto", "bar", "log", "off"], default="auto",
                        help="progress display: a bar on a terminal, log lines otherwise (auto)")


def config_from_args(args):
    from clipscope.pipelines.jobs.extract.settings import ExtractConfig

    return ExtractConfig(
        data=tuple(args.data), out=args.out, model=args.model, pretrained=args.pretrained, seed=args.seed,
        heads_layers=_layers(args.heads_layers), second_order_layers=_layers(args.second_order_layers) or (),
        token_layers=_layers(args.token_layers) or (), activation_layers=_layers(args.activation_layers) or (),
        ln_convention=args.ln_convention, dtype=args.dtype, batch_size=args.batch_size,
        compute_dtype=args.compute_dtype, decode_threads=args.decode_threads,
        rows_per_chunk=args.rows_per_chunk, device=args.device, workers=workers_from(args), address=address_from(args),
        retry_failed=args.retry_failed, allow_local_store=args.allow_local_store,
        masks=args.masks, mask_geometry=args.mask_geometry, group_key=args.group_key, token_sum=args.token_sum,
        attention_layers=_layers(args.attention_layers) or (),
    )


def run(args) -> int:
    from clipscope.pipelines.jobs.extract.job import run_extract

    if args.model is None:
        raise ConfigError(MODEL_REQUIRED)
    config = config_from_args(args)
    if config.heads_layers == ():
        raise ConfigError("--heads-layers none would store no direct effects; name layers or use all")
    summary = run_extract(config, progress_display=args.progress)
    print(f"store {summary.store}: {summary.done} shards extracted, {summary.skipped} already done, "
          f"{len(summary.failed)} failed, {summary.images} images in {summary.seconds:.1f}s")
    for index, error in summary.failed:
        print(f"  failed shard {index}: {error}")
    if summary.partial:
        known = sum(loss.lost or 0 for loss in summary.partial)
        unknown = any(loss.lost is None for loss in summary.partial)
        lost = f"{known}+" if known and unknown else ("an unknown number of" if unknown else str(known))
        print(f"  {len(summary.partial)} shard(s) not read whole: {lost} samples lost")
        for loss in summary.partial:
            print(f"  partial {loss.describe()}")
    if summary.failed:
        return exit_codes.FAILED_SHARDS
    if summary.partial and not args.allow_partial:
        return exit_codes.PARTIAL
    return exit_codes.OK
