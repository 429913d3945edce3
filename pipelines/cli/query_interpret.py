"""`clipscope query STORE neighbours|topic|contrast …`: the CLIP-InterpreT analyses (spec S5), wired into
`clipscope query` (pipelines/cli/query.py adds these sub-commands and calls `run`)."""

from __future__ import annotations

import argparse

from clipscope.pipelines.cli._executor_args import add_executor_arguments

WHATS = ("neighbours", "topic", "contrast")


def _query_image(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--sample", help="the query image: a sample key or a row number of the store")
    group.add_argument("--image", help="the query image: a new image file (decomposed with the store's model)")


def add_subcommands(sub, formatter_class) -> None:
    near = sub.add_parser("neighbours", formatter_class=formatter_class,
                          help="nearest neighbours of an image by one head, a set of heads or a role's heads")
    _query_image(near)
    near.add_argument("--layer", type=int, help="layer of the head (with --head)")
    near.add_argument("--head", type=int, help="head index (with --layer)")
    near.add_argument("--heads", help="a set of heads, L8H1,L9H3,… (property-based neighbours)")
    near.add_argument("--property", help="the heads labelled with this property by `clipscope roles`")
    near.add_argument("-k", type=int, default=None, help="neighbours shown (default 8 for one head, 4 for a set)")
    near.add_argument("--score", default="dot", help="dot (the reference code) or cosine (the paper's wording)")
    near.add_argument("--no-normalize", action="store_true", help="score the raw head terms, not c/‖M(I)‖")
    add_executor_arguments(near)
    for name, what in (("topic", "maps of texts over an image for one head or all heads (aggregate)"),
                       ("contrast", "the difference of two texts' maps over an image (diverging colours)")):
        p = sub.add_parser(name, formatter_class=formatter_class, help=what)
        _query_image(p)
        p.add_argument("--text", action="append", required=True,
                       help="a text (repeat it; contrast takes exactly two)")
        p.add_argument("--layer", type=int, help="layer of the head (needs its direct/tokens)")
        p.add_argument("--head", type=int, help="head index")
        p.add_argument("--aggregate", action="store_true", help="all layers and heads (needs direct/token_sum)")
        p.add_argument("--png", help="write the overlay on the image to this PNG")
        p.add_argument("--baseline", action="append", default=None, metavar="TEXT",
                       help="subtract the mean map of these texts (repeat it), e.g. 'a red shape' with baselines "
                            "'a blue shape', 'a green shape', …: what all of them share is removed")
        if name == "topic":
            p.add_argument("--textspan-extremes", action="store_true",
                           help="thesis Fig. 2.6: the head's TextSpan texts of largest and smallest coefficient, "
                                "each minus the mean map over --task's classes (ignores --text)")
            p.add_argument("--task", default=None, help="zero-shot task of the --textspan-extremes baseline")


def _head_choice(args) -> tuple[int | None, int | None]:
    from clipscope.errors import ConfigError

    if args.aggregate:
        if args.layer is not None or args.head is not None:
            raise ConfigError("--aggregate sums every layer and head: leave out --layer and --head")
        return None, None
    if args.layer is None or args.head is None:
        raise ConfigError("name a head with --layer and --head, or pass --aggregate")
    return args.layer, args.head


def run(args, store) -> int:
    from clipscope.errors import ConfigError
    from clipscope.pipelines.cli._executor_args import executor_from_args
    from clipscope.pipelines.query import interpret
    from clipscope.pipelines.query.store_queries import format_table

    sample = None if args.sample is None else _sample(store, args.sample)
    if args.what == "neighbours":
        one = args.layer is not None or args.head is not None
        if sum([one, args.heads is not None, args.property is not None]) != 1:
            raise ConfigError("name one head (--layer L --head H), a set (--heads L8H1,…) or --property NAME")
        with executor_from_args(args, store=args.store, progress="off") as executor:
            common = dict(sample=sample, image=args.image, normalize=not args.no_normalize, score=args.score,
                          executor=executor)
            if one:
                if args.layer is None or args.head is None:
                    raise ConfigError("--layer and --head go together")
                table = interpret.head_image_neighbours(store, args.layer, args.head, k=args.k or 8, **common)
            else:
                heads = interpret.parse_heads(args.heads) if args.heads else None
                table = interpret.property_neighbours(store, heads=heads, property=args.property, k=args.k or 4,
                                                      **common)
        print(format_table(table))
        return 0
    layer, head = _head_choice(args)
    figures = _figures(args, store, sample)
    if args.what == "contrast":
        if len(args.text) != 2:
            raise ConfigError(f"contrast takes exactly two --text, got {len(args.text)}")
        contrast = interpret.contrast_map(store, args.text[0], args.text[1], sample=sample, image=args.image,
                                          layer=layer, head=head, loaded=figures.loaded, baseline=args.baseline)
        d = contrast.difference
        print(f"contrast {args.text[0]!r} − {args.text[1]!r}: max |D| {contrast.scale:.4g}; "
              f"{(d > 0).mean():.0%} of pixels closer to the first, {(d < 0).mean():.0%} to the second")
        if args.png:
            figures.contrast(contrast, args.png, _where(layer, head))
        return 0
    if getattr(args, "textspan_extremes", False):
        if layer is None:
            raise ConfigError("--textspan-extremes needs one head (--layer, --head)")
        from clipscope.pipelines.texts.zero_shot import classifier, default_task, get_task

        baseline = classifier(store, get_task(args.task or default_task(store)), figures.loaded).astype(float)
        maps = interpret.textspan_extremes(store, layer, head, sample=sample, image=args.image, baseline=baseline,
                                           loaded=figures.loaded)
        labels = [f"largest: {maps[0].text} − mean", f"smallest: {maps[1].text} − mean"]
    else:
        maps = interpret.topic_maps(store, args.text, sample=sample, image=args.image, layer=layer, head=head,
                                    loaded=figures.loaded, baseline=args.baseline)
        labels = [m.text for m in maps]
    for m, label in zip(maps, labels):
        peak = divmod(int(m.pixels.argmax()), m.pixels.shape[1])
        print(f"{label}: map range [{m.pixels.min():.4g}, {m.pixels.max():.4g}], peak at (y, x) = {peak}")
    if args.png:
        figures.topic(maps, labels, args.png, _where(layer, head))
    return 0


def _where(layer, head) -> str:
    return "all layers and heads (aggregate)" if layer is None else f"layer {layer}, head {head}"


def _sample(store, text: str):
    from clipscope.pipelines.cli.query import _sample as parse

    return parse(store, text)


class _Figures:
    """The model (loaded once) and the picture under the maps."""

    def __init__(self, store, sample, image):
        from clipscope.pipelines.models.loading import load_run_model

        self.store, self.sample, self.image = store, sample, image
        self.loaded = load_run_model(store)

    def picture(self):
        from clipscope.pipelines.query import interpret
        from clipscope.pipelines.query.interpret_figures import input_picture, sample_image

        source = self.image if self.image is not None else sample_image(
            self.store, interpret.resolve_row(self.store, self.sample))
        return input_picture(self.loaded, source)

    def _name(self) -> str:
        return f"image {self.image}" if self.image is not None else f"sample {self.sample}"

    def topic(self, maps, labels, path, where) -> None:
        from clipscope.pipelines.query.interpret_figures import plot_topic

        plot_topic(self.picture(), maps, path, labels=labels, title=f"Topic maps, {where}; {self._name()}")
        print(f"wrote {path}")

    def contrast(self, contrast, path, where) -> None:
        from clipscope.pipelines.query.interpret_figures import plot_contrast

        plot_contrast(self.picture(), contrast, path, title=f"Contrastive map, {where}; {self._name()}")
        print(f"wrote {path}")


def _figures(args, store, sample) -> _Figures:
    return _Figures(store, sample, args.image)
