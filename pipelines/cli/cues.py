"""`clipscope cues STORE --true C1 --wrong C2`: mine the words whose neurons push class C1 towards C2 (second-order
paper §5.1, Eq. 6), write the prompt for a text-to-image pipeline, optionally run a user's generator on it;
`clipscope cues evaluate STORE --true C1 --wrong C2`: the fooling rate of an extracted set of generated images."""

from __future__ import annotations

from clipscope.pipelines.cli import reduction_options
from clipscope.pipelines.cli._executor_args import add_executor_arguments, check_executor_args, executor_from_args

PARAMETER_FLAGS = {"true": "--true", "wrong": "--wrong", "task": "--templates", "spec": "--generate"}


def add_arguments(parser) -> None:
    parser.add_argument("store", metavar="STORE|evaluate",
                        help="run store path or URL (results go under reductions/cues); `evaluate STORE` scores an "
                             "extracted store of generated images instead")
    parser.add_argument("evaluated", nargs="?", default=None, metavar="STORE", help="with `evaluate`: the store")
    parser.add_argument("--true", required=True, help="the class c₁ the images show (a bare class name)")
    parser.add_argument("--wrong", required=True, help="the class c₂ the cues push towards")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="neuron layers with `second-order` and `neurons` results (paper: 8 9 10)")
    parser.add_argument("--neurons", type=int, default=100, help="neurons of largest |⟨v, r_n⟩| (reference code: 50)")
    parser.add_argument("--words", type=int, default=25, help="cue words kept (reference code: 20)")
    parser.add_argument("--ranking", choices=("eq6", "reference"), default="eq6",
                        help="eq6: Σ over neurons per text; reference: single (neuron, text) entries, top --entries")
    parser.add_argument("--entries", type=int, default=20, help="with --ranking reference: entries kept")
    parser.add_argument("--m", type=int, default=None,
                        help="OMP sparsity (default: the largest stored m ≤ embedding dimension / 4; the paper: 128)")
    parser.add_argument("--synonym-cosine", type=float, default=0.6,
                        help="drop texts whose embedding has at least this cosine with C2's (synonyms)")
    parser.add_argument("--block", nargs="*", default=[], help="further texts that may not be cues")
    parser.add_argument("--templates", default=None, metavar="TASK",
                        help="take t̂(C1), t̂(C2) from this zero-shot task's class weights (its templates) instead of "
                             "the bare class names")
    parser.add_argument("--random-neurons", type=int, default=None, metavar="SEED",
                        help="baseline: the same Eq. 6 sum over --neurons random neurons (seeded)")
    parser.add_argument("--prompt-out", default=None, help="write the text-to-image request filled with the cues here")
    parser.add_argument("--generate", default=None, metavar="python:MODULE:FUNCTION",
                        help="call FUNCTION(prompt=, words=, true=, wrong=) and write its images as a shard to "
                             "--generated-out (then `clipscope extract` it and run `cues evaluate`)")
    parser.add_argument("--generated-out", default=None, help="shard path for --generate's images")
    reduction_options.add_arguments(parser)
    add_executor_arguments(parser)


def _evaluate(args) -> int:
    from clipscope.errors import ConfigError
    from clipscope.pipelines.jobs import cues
    from clipscope.storage.store import RunStore

    if args.evaluated is None:
        raise ConfigError("`clipscope cues evaluate` needs the STORE of the extracted generated images")
    check_executor_args(args)
    store = RunStore.open(args.evaluated, "r+")
    with executor_from_args(args, store=args.evaluated) as executor:
        rate, fooled, n = cues.fooling_rate(store, args.true, args.wrong, executor, task=args.templates)
    print(cues.report.format_fooling(args.true, args.wrong, rate, fooled, n))
    return 0


def _layers(store, args) -> tuple[int, ...]:
    from clipscope.errors import ConfigError
    from clipscope.storage import schema

    if args.layers:
        return tuple(args.layers)
    found = sorted(int(fields["layer"]) for fields in map(schema.OMP["support"].matches, store.array_names())
                   if fields is not None)
    if not found:
        raise ConfigError(f"{store.url} has no neuron decompositions; run `clipscope neurons {store.url} --layer L` "
                          "(or pass --layers)")
    return tuple(found)


def run(args) -> int:
    if args.store == "evaluate":
        return _evaluate(args)
    from clipscope.errors import ConfigError
    from clipscope.pipelines.cli.notices import warn_if_random_init
    from clipscope.pipelines.jobs import cues
    from clipscope.storage.store import RunStore

    if args.evaluated is not None:
        raise ConfigError(f"unexpected second STORE {args.evaluated!r} (only `cues evaluate STORE` takes one)")
    if (args.generate is None) != (args.generated_out is None):
        raise ConfigError("--generate and --generated-out go together")
    check_executor_args(args)
    store = RunStore.open(args.store, "r+")
    warn_if_random_init(store.attrs.get("model"))
    settings = cues.Settings(true=args.true, wrong=args.wrong, layers=_layers(store, args), neurons=args.neurons,
                             words=args.words, ranking=args.ranking, entries=args.entries, m=args.m,
                             synonym_cosine=args.synonym_cosine, block=tuple(args.block), task=args.templates,
                             random_neurons=args.random_neurons,
                             **reduction_options.job_options(args))
    generator = None
    if args.generate is not None:
        from clipscope.pipelines.data.generated_shards import load_generator

        generator = load_generator(args.generate)  # a bad spec fails before the work
    with executor_from_args(args, store=args.store) as executor:
        result = cues.run(store, settings, executor)
    print(cues.report.format_cues(result))
    prompt = cues.report.format_prompt(result)
    if args.prompt_out:
        with open(args.prompt_out, "w", encoding="utf-8") as fh:
            fh.write(prompt + "\n")
        print(f"prompt written to {args.prompt_out}")
    if generator is not None:
        from clipscope.pipelines.data.generated_shards import write_generated

        images = generator(prompt=prompt, words=result.cues, true=args.true, wrong=args.wrong)
        n = write_generated(args.generated_out, images, {"true": args.true, "wrong": args.wrong, "cues": result.cues})
        print(f"{n} generated images written to {args.generated_out}; extract them with `clipscope extract "
              f"{args.generated_out} --out STORE --model …` and score them with `clipscope cues evaluate STORE "
              f"--true {args.true!r} --wrong {args.wrong!r}`")
    return 0
