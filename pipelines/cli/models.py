"""`clipscope models`: what can be loaded, and which architectures extraction supports."""

from __future__ import annotations

from clipscope.pipelines.models.loading import (list_models, list_pretrained_tags, list_tiny_models,
                                                unsupported_reason)


def add_arguments(parser) -> None:
    parser.add_argument("--tags", action="store_true", help="also list each model's pretrained tags")
    parser.add_argument("--tiny", action="store_true", help="only clipscope's tiny test configs")
    parser.add_argument("--supported", action="store_true", help="only the architectures extraction supports")


def run(args) -> int:
    names = list_tiny_models() if args.tiny else list_models()
    reasons = {name: unsupported_reason(name) for name in names}
    if args.supported:
        names = [n for n in names if reasons[n] is None]
    if not args.tiny:
        n_ok = sum(reasons[n] is None for n in names)
        print(f"# {n_ok} of {len(names)} architectures can be extracted (open_clip ViTs with class-token pooling); "
              f"the others are listed with the reason extraction refuses them")
    for name in names:
        mark = "" if args.tiny else ("\tsupported" if reasons[name] is None else f"\tunsupported: {reasons[name]}")
        tags = ""
        if args.tags:
            found = list_pretrained_tags(name)
            tags = f"\t{' '.join(found) if found else '-'}"
        print(f"{name}{mark}{tags}")
    return 0
