"""Every parameter of `clipscope cues`, declared as data and validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from clipscope.params import Boolean, Each, Interval, NoneValue, Options, Text, Validated

RANKINGS = ("eq6", "reference")


@dataclass(frozen=True)
class Settings(Validated):
    """`true`, `wrong`: the class names c₁, c₂ (bare names: v = t̂(c₂) − t̂(c₁), unit text embeddings of the
    run's model); `layers`: neuron layers whose PCs and OMP decompositions are used (one text pool);
    `neurons`: |𝒩|, the neurons of largest |⟨v, r_n⟩| (paper 100, reference code 50); `words`: cue words
    kept; `ranking`: `eq6` (w_j = Σ_{n∈𝒩} γ_j^n⟨v, r_n⟩) or `reference` (single (neuron, text) entries ranked,
    the top `entries` kept, then de-duplicated); `m`: the OMP sparsity (None: the largest stored ≤ embed/4);
    `synonym_cosine`: texts whose unit embedding has at least this cosine with t̂(c₂) are dropped, and so are
    c₂ itself and `block`; `allowed`: when given, only these texts may be cues (e.g. a world's vocabulary);
    `task`: take t̂(c) from this zero-shot task's class weights (its templates) instead of the bare names;
    `random_neurons`: a seed — 𝒩 is then `neurons` neurons drawn at random (Table 3's "random neurons"
    baseline; stored under its own group)."""

    true: str
    wrong: str
    layers: tuple[int, ...]
    neurons: int = 100
    words: int = 25
    ranking: str = "eq6"
    entries: int = 20
    m: int | None = None
    synonym_cosine: float = 0.6
    block: tuple[str, ...] = ()
    allowed: tuple[str, ...] | None = None
    task: str | None = None
    random_neurons: int | None = None
    allow_incomplete: bool = False
    force: bool = False

    parameter_constraints: ClassVar = {
        "true": [Text()],
        "wrong": [Text()],
        "layers": [Each(Interval(int, 0), min_len=1)],
        **{name: [Interval(int, 1)] for name in ("neurons", "words", "entries")},
        "ranking": [Options(*RANKINGS)],
        "m": [Interval(int, 1), NoneValue()],
        "synonym_cosine": [Interval(float, -1.0, 1.0)],
        "block": [Each(Text())],
        "allowed": [NoneValue(), Each(Text(), min_len=1)],
        "task": [NoneValue(), Text()],
        "random_neurons": [NoneValue(), Interval(int, 0)],
        "allow_incomplete": [Boolean()],
        "force": [Boolean()],
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "block", tuple(self.block))
        if self.allowed is not None:
            object.__setattr__(self, "allowed", tuple(self.allowed))
