"""What `clipscope rosetta` makes: ``reductions/rosetta/{name}/`` — units, top lists and best buddies per
model, self best buddies, tuples with their concepts, strongest buddies, the dictionary (storage.schema)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipscope.errors import StoreError
from clipscope.pipelines.jobs.rosetta.settings import RosettaSettings
from clipscope.storage import schema
from clipscope.storage.results import RESULT_ATTR, Reduction
from clipscope.storage.store import RunStore

SUMMARY = "summary"


def model_label(model: int) -> str:
    """`anchor` for model 0, `m1`, `m2`, … for the others (group names in the store)."""
    return "anchor" if model == 0 else f"m{model}"


def result_group(name: str, sub: str | None = None) -> str:
    base = schema.ROSETTA_SUMMARY.pattern.split("/summary/")[0].format(name=name)
    return base if sub is None else f"{base}/{sub}"


@dataclass(frozen=True, eq=False)
class Result:
    """`arrays`: name under the result group (``pairs/m1/buddies``, …) → array; `attrs`: K, rule, score,
    inputs (urls, model identities, layers, geometry), n_images."""

    settings: RosettaSettings
    arrays: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        return (self.settings == other.settings and self.attrs == other.attrs
                and self.arrays.keys() == other.arrays.keys()
                and all(np.array_equal(v, other.arrays[k], equal_nan=True) for k, v in self.arrays.items()))

    @property
    def models(self) -> list[str]:
        return list(self.attrs.get("models", []))

    def units(self, model: str) -> dict[str, np.ndarray]:
        prefix = f"units/{model}/"
        return {k[len(prefix):]: v for k, v in self.arrays.items() if k.startswith(prefix)}

    def describe_unit(self, model: int, unit: int) -> str:
        """``label:layer:channel`` of a unit."""
        label = model_label(model)
        table = self.units(label)
        layers = self.attrs["inputs"][model]["layers"]
        return f"{label}:{layers[int(table['layer_index'][unit])]}:{int(table['channel'][unit])}"

    def write(self, run: Reduction) -> None:
        """Replace the whole result group; `summary` goes last (the result counts only once it exists)."""
        base = result_group(self.settings.name)
        if any(n.startswith(base + "/") for n in run.store.array_names()):
            run.store.delete_results(base)
        groups: dict[str, dict[str, tuple]] = {}
        for name, value in self.arrays.items():
            sub, _, leaf = name.rpartition("/")
            dims = schema.declaration(f"{base}/{name}")[0].dims
            groups.setdefault(sub, {})[leaf] = (value, dims)
        for sub in sorted(g for g in groups if g != SUMMARY):
            run.write_group(f"{base}/{sub}", groups[sub], {})
        run.write_group(f"{base}/{SUMMARY}", groups[SUMMARY], self.attrs)

    @classmethod
    def read(cls, store: RunStore, settings: RosettaSettings) -> Result:
        base = result_group(settings.name)
        attrs = store.result_group_attrs(f"{base}/{SUMMARY}")
        if attrs is None:
            raise StoreError(f"{store.url} has no Rosetta result {settings.name!r}; run `clipscope rosetta "
                             f"{store.url} OTHER... --name {settings.name}` first")
        arrays = {name[len(base) + 1:]: store.read_result(name) for name in sorted(store.array_names())
                  if name.startswith(base + "/")}
        return cls(settings, arrays, {k: v for k, v in attrs.items() if k != RESULT_ATTR})


def read_any(store: RunStore, name: str) -> Result:
    """The stored result `name` with the settings it was made with (for queries)."""
    base = result_group(name)
    attrs = store.result_group_attrs(f"{base}/{SUMMARY}")
    if attrs is None:
        raise StoreError(f"{store.url} has no Rosetta result {name!r}; run `clipscope rosetta {store.url} OTHER... "
                         f"--name {name}` first")
    record = attrs.get(RESULT_ATTR, {}).get("settings", {})
    settings = RosettaSettings(others=tuple(record.get("others", ["?"])), name=name,
                               k=int(attrs.get("k", 5)), self_k=int(attrs.get("self_k", 5)))
    return Result.read(store, settings)
