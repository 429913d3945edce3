"""`clipscope query STORE {image,text,neuron,export} ...`: read a store as tables."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="run store path or URL")
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    image = sub.add_parser("image", help="an image's embedding and its largest direct-effect components")
    image.add_argument("sample", help="sample key, or a row number")
    image.add_argument("--top", type=int, default=10)
    text = sub.add_parser("text", help="top-k images for a (layer, head) along a text direction")
    text.add_argument("--layer", type=int, required=True)
    text.add_argument("--head", type=int, required=True)
    text.add_argument("--text", required=True)
    text.add_argument("-k", type=int, default=10)
    neuron = sub.add_parser("neuron", help="top-k images by second-order effect norm of a neuron")
    neuron.add_argument("--layer", type=int, required=True)
    neuron.add_argument("--neuron", type=int, required=True)
    neuron.add_argument("-k", type=int, default=10)
    export = sub.add_parser("export", help="export rows of chosen arrays to .parquet or a folder of .npy")
    export.add_argument("--rows", type=int, nargs="*", default=[])
    export.add_argument("--keys", nargs="*", default=[])
    export.add_argument("--arrays", nargs="+", default=["image_embedding"])
    export.add_argument("--to", required=True, help="DEST.parquet, or a folder for .npy files")


def _sample(store, text: str):
    """A row number, unless the text is also a sample key (webdataset keys are often all digits)."""
    if not text.isdigit():
        return text
    import pyarrow.compute as pc

    from clipscope.storage.sample_index import read_samples

    return text if pc.any(pc.equal(read_samples(store)["key"], text)).as_py() else int(text)


def run(args) -> int:
    import numpy as np

    from clipscope.errors import ConfigError
    from clipscope.pipelines.query import store_queries as queries
    from clipscope.storage.query import export_rows, open_run, rows_for_keys

    store = open_run(args.store)
    if args.what == "image":
        header, table = queries.image_summary(store, _sample(store, args.sample), args.top)
        print(f"sample {args.sample}: ‖embedding‖ = {header['embedding_norm']:.4f}; components along it sum to "
              f"{header['sum_of_components_along_embedding']:.4f}")
        print(queries.format_table(table))
    elif args.what == "text":
        print(queries.format_table(queries.top_images_for_text(store, args.layer, args.head, args.text, args.k)))
    elif args.what == "neuron":
        print(queries.format_table(queries.top_images_for_neuron(store, args.layer, args.neuron, args.k)))
    elif args.what == "export":
        rows = list(args.rows) + (rows_for_keys(store, args.keys).tolist() if args.keys else [])
        if not rows:
            raise ConfigError("export needs --rows or --keys")
        dest = export_rows(store, np.asarray(rows), args.arrays, args.to)
        print(f"exported {len(rows)} rows of {', '.join(args.arrays)} to {dest}")
    return 0
