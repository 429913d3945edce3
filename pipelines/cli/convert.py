"""`clipscope convert imagenet-seg gtsegs_ijcv.mat --out shards/` (→ shards with masks, then `clipscope extract
shards/ --masks …` and `clipscope segment`) and `clipscope convert waterbirds ROOT --out shards/` (→ shards with
groups, then `clipscope extract` and `clipscope worst-group`)."""

from __future__ import annotations

FORMATS = ("imagenet-seg", "waterbirds")


def add_arguments(parser) -> None:
    parser.add_argument("format", help=f"the input layout: {', '.join(FORMATS)} (imagenet-seg: gtsegs_ijcv.mat, HDF5, needs h5py; "
                        "waterbirds: the folder holding metadata.csv)")
    parser.add_argument("source", help="the input file or folder")
    parser.add_argument("--out", required=True, help="folder for the shards")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    parser.add_argument("--image-format", default="jpg", help="imagenet-seg: jpg (quality 95) or png (lossless)")
    parser.add_argument("--split", choices=("train", "val", "test"), default="test", help="waterbirds: the split")


def run(args) -> int:
    from clipscope.errors import ConfigError
    from clipscope.pipelines.data.imagenet_seg import convert

    if args.format not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    if args.format == "waterbirds":
        from clipscope.pipelines.data.waterbirds import convert_waterbirds

        paths = convert_waterbirds(args.source, args.out, split=args.split, per_shard=args.per_shard)
        print(f"wrote {len(paths)} shard(s) to {args.out}; next: clipscope extract {args.out} "
              f"--model … --pretrained … --out STORE, then clipscope worst-group STORE --task waterbirds")
        return 0
    paths = convert(args.source, args.out, per_shard=args.per_shard, image_format=args.image_format)
    print(f"wrote {len(paths)} shard(s) to {args.out}; next: clipscope extract {args.out} --masks --token-sum "
          f"--model … --pretrained … --out STORE")
    return 0
