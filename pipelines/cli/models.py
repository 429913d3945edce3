"""`clipscope models`: what can be loaded."""

from __future__ import annotations

from clipscope.pipelines.models.loading import list_models, list_pretrained_tags, list_tiny_models


def add_arguments(parser) -> None:
    parser.add_argument("--tags", action="store_true", help="also list each model's pretrained tags")
    parser.add_argument("--tiny", action="store_true", help="only clipscope's tiny test configs")


def run(args) -> int:
    names = list_tiny_models() if args.tiny else list_models()
    for name in names:
        if args.tags:
            tags = list_pretrained_tags(name)
            print(f"{name}\t{' '.join(tags) if tags else '-'}")
        else:
            print(name)
    return 0
