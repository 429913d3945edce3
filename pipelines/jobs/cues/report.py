"""Text of a `clipscope cues` result, and the prompt for a text-to-image pipeline."""

from __future__ import annotations

from clipscope.pipelines.jobs.cues.result import Result

# The request the reference sends to an LLM before its text-to-image model, restated (not copied): it
# asks for descriptions of c_true that use the cue words and never name c_wrong.
PROMPT_TEMPLATE = (
    "Write {n} different one-sentence descriptions of photographs. Every description must show {yes} and "
    "must not mention {no}. Use several of these words in each description, naturally: {words}. "
    "Answer with one description per line and nothing else."
)


def format_cues(result: Result) -> str:
    a = result.attrs
    lines = [f"cues pushing {a['true']!r} towards {a['wrong']!r} (layers {a['layers']}, {a['n_neurons']} neurons, "
             f"OMP m = {a['m']}, pool {a['pool']}, ranking {a['ranking']}, ‖v‖ = {a['v_norm']:.3f})"]
    lines += [f"  {s:+.4g}  {w}" for w, s in zip(result.cues, result.score)]
    return "\n".join(lines)


def format_prompt(result: Result, *, n: int = 50) -> str:
    """The LLM request of the reference pipeline filled with the mined words (yes = c_true, no = c_wrong)."""
    return PROMPT_TEMPLATE.format(n=n, yes=result.attrs["true"], no=result.attrs["wrong"],
                                  words=", ".join(result.cues))


def format_fooling(true: str, wrong: str, rate: float, fooled: int, n: int) -> str:
    return (f"fooling rate ⟨M(I), t̂({wrong}) − t̂({true})⟩ > 0: {rate:.3f} ({fooled} of {n} images)")
