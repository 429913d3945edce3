"""`clipscope query STORE {image,text,neuron,export} ...`: read a store as tables."""

from __future__ import annotations

import argparse

from clipscope.pipelines.cli import query_interpret


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="run store path or URL")
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    image = sub.add_parser("image", formatter_class=parser.formatter_class, help="an image's embedding and its largest direct-effect components")
    image.add_argument("sample", help="sample key, or a row number")
    image.add_argument("--top", type=int, default=10, help="largest components shown")
    text = sub.add_parser("text", formatter_class=parser.formatter_class, help="top-k images for a (layer, head) along a text direction")
    text.add_argument("--layer", type=int, required=True, help="layer of the head (0-based resblock index)")
    text.add_argument("--head", type=int, required=True, help="head index within the layer")
    text.add_argument("--text", default=None,
                      help="the text whose direction (its embedding with the store's model) images are ranked along")
    text.add_argument("--textspan-pick", type=int, default=None, metavar="I",
                      help="instead of --text: the head's I-th TextSpan text (0 = first; needs `clipscope textspan`)")
    text.add_argument("--no-normalize", action="store_true",
                      help="rank by the raw ⟨c_head, t⟩ instead of the papers' ⟨c_head/‖M(I)‖, t⟩")
    text.add_argument("-k", type=int, default=10, help="images shown")
    neuron = sub.add_parser("neuron", formatter_class=parser.formatter_class, help="top-k images by second-order effect norm of a neuron")
    neuron.add_argument("--layer", type=int, required=True,
                        help="MLP layer extracted with --second-order-layers (0-based)")
    neuron.add_argument("--neuron", type=int, required=True, help="neuron index within the layer's MLP")
    neuron.add_argument("-k", type=int, default=10, help="images shown")
    pools = sub.add_parser("pools", formatter_class=parser.formatter_class,
                           help="the text pools cached in the store (name, size, key), or one pool's texts")
    pools.add_argument("--texts", default=None, metavar="KEY",
                       help="print the texts of the pool with this key (a results' texts_key attribute)")
    query_interpret.add_subcommands(sub, parser.formatter_class)  # neighbours, topic, contrast (CLIP-InterpreT)
    export = sub.add_parser("export", formatter_class=parser.formatter_class, help="export rows of chosen arrays to .parquet or a folder of .npy")
    export.add_argument("--rows", type=int, nargs="*", default=[], help="row numbers to export")
    export.add_argument("--keys", nargs="*", default=[], help="sample keys to export (with or instead of --rows)")
    export.add_argument("--arrays", nargs="+", default=["image_embedding"],
                        help="per-sample arrays to export (names as in `clipscope status`)")
    export.add_argument("--to", required=True, help="DEST.parquet, or a folder for .npy files (outside the store)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --to")
    from clipscope.pipelines.cli.concepts import add_query_parser

    add_query_parser(sub, parser.formatter_class)
    from clipscope.pipelines.cli.rosetta import add_query_parser as add_rosetta_query

    add_rosetta_query(sub, parser.formatter_class)


def _sample(store, text: str):
    """A row number, unless the text is also a sample key (webdataset keys are often all digits)."""
    if not text.isdigit():
        return text
    import pyarrow.compute as pc

    from clipscope.storage.sample_index import read_samples

    return text if pc.any(pc.equal(read_samples(store)["key"], text)).as_py() else int(text)


def run(args) -> int:
    from clipscope.pipelines.cli.notices import warn_if_random_init
    import numpy as np

    from clipscope.errors import ConfigError
    from clipscope.pipelines.query import store_queries as queries
    from clipscope.storage.query import export_rows, open_run, rows_for_keys

    store = open_run(args.store)
    warn_if_random_init(store.attrs.get("model"))
    if args.what == "image":
        header, table = queries.image_summary(store, _sample(store, args.sample), args.top)
        print(f"sample {args.sample}: ‖embedding‖ = {header['embedding_norm']:.4f}; components along it sum to "
              f"{header['sum_of_components_along_embedding']:.4f}")
        print(queries.format_table(table))
    elif args.what == "text":
        if (args.text is None) == (args.textspan_pick is None):
            raise ConfigError("query text needs --text or --textspan-pick (one of them)")
        text = args.text
        if args.textspan_pick is not None:
            from clipscope.pipelines.query.interpret import textspan_text

            text = textspan_text(store, args.layer, args.head, args.textspan_pick)
            print(f"TextSpan pick {args.textspan_pick} of L{args.layer}H{args.head}: {text!r}")
        print(queries.format_table(queries.top_images_for_text(store, args.layer, args.head, text, args.k,
                                                               normalize=not args.no_normalize)))
    elif args.what in query_interpret.WHATS:
        return query_interpret.run(args, store)
    elif args.what == "neuron":
        print(queries.format_table(queries.top_images_for_neuron(store, args.layer, args.neuron, args.k)))
    elif args.what == "pools":
        from clipscope.pipelines.texts.embedding_cache import cached_pools, stored_texts

        if args.texts:
            print("\n".join(stored_texts(store, args.texts)))
        else:
            for key, info in cached_pools(store).items():
                stored = "" if info["texts_stored"] else "  (texts not stored: cached by an older clipscope)"
                print(f"{key}  {info['pool']}  {info['n_texts']} texts{stored}")
    elif args.what == "concepts":
        from clipscope.pipelines.cli.concepts import run_query

        run_query(args, store, _sample(store, args.sample))
    elif args.what == "rosetta":
        from clipscope.pipelines.cli.rosetta import run_query as run_rosetta_query

        return run_rosetta_query(args, store)
    elif args.what == "export":
        rows = list(args.rows) + (rows_for_keys(store, args.keys).tolist() if args.keys else [])
        if not rows:
            raise ConfigError("export needs --rows or --keys")
        dest = export_rows(store, np.asarray(rows), args.arrays, args.to, overwrite=args.overwrite)
        print(f"exported {len(rows)} rows of {', '.join(args.arrays)} to {dest}")
    return 0
