"""The roles job's result: each head's label, its property shares and matches, and the two scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from clipscope.errors import ParameterError, StoreError
from clipscope.pipelines.jobs.roles.settings import RolesSettings
from clipscope.storage import schema
from clipscope.storage.results import Reduction
from clipscope.storage.store import RunStore

GROUP = schema.ROLES.path()
SCORES = ("entanglement", "entanglement_shared", "association")


@dataclass(frozen=True)
class Result:
    settings: RolesSettings
    layers: tuple[int, ...]
    properties: tuple[str, ...]
    label: np.ndarray  # [layer head] index into properties, −1 = none
    share: np.ndarray  # [layer head property]
    matches: np.ndarray  # [layer head]; −1 when no text tags were available (labels from a CSV only)
    entanglement: float
    entanglement_shared: float
    association: float  # NaN when no text tags were available
    pool: str
    tags: str  # where the tags came from

    def write(self, run: Reduction) -> None:
        attrs = {"layers": list(self.layers), "properties": list(self.properties), "m": self.settings.m,
                 "min_match": self.settings.min_match, "pool": self.pool, "tags": self.tags,
                 **{name: _json_float(getattr(self, name)) for name in SCORES}}
        arrays = {leaf: (getattr(self, leaf), schema.ROLES.dims(leaf)) for leaf in schema.ROLES.leaves}
        run.write_group(GROUP, arrays, attrs)

    @classmethod
    def read(cls, store: RunStore, settings: RolesSettings | None = None) -> Result:
        """The stored roles (`settings`: recorded as given; None reads whatever `clipscope roles` stored)."""
        attrs = store.result_group_attrs(GROUP)
        if attrs is None:
            raise StoreError(f"{store.url} has no head roles; run `clipscope roles {store.url}` first")
        arrays = {leaf: store.read_result(f"{GROUP}/{leaf}") for leaf in schema.ROLES.leaves}
        if settings is None:
            recorded = dict((attrs.get("clipscope_result") or {}).get("settings") or {})
            fields = set(RolesSettings.__dataclass_fields__)
            settings = RolesSettings(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in recorded.items()
                                        if k in fields})
        return cls(settings, tuple(int(l) for l in attrs["layers"]), tuple(attrs["properties"]), arrays["label"],
                   arrays["share"], arrays["matches"], *(_float(attrs[name]) for name in SCORES),
                   str(attrs["pool"]), str(attrs["tags"]))

    def label_of(self, layer: int, head: int) -> str:
        index = int(self.label[self.layers.index(layer), head])
        return "none" if index < 0 else self.properties[index]

    def heads_with(self, prop: str) -> list[tuple[int, int]]:
        """The (layer, head) pairs labelled `prop`, in layer then head order."""
        if prop not in self.properties:
            raise ParameterError("property", f"must be one of {', '.join(self.properties)}, got {prop!r}")
        p = self.properties.index(prop)
        return [(self.layers[i], int(h)) for i, h in zip(*np.nonzero(self.label == p))]

    def table(self) -> pa.Table:
        """One row per head: layer, head, label, matches, and its share per property."""
        rows = [(l, h) for l in self.layers for h in range(self.label.shape[1])]
        columns = {"layer": [l for l, _ in rows], "head": [h for _, h in rows],
                   "label": [self.label_of(l, h) for l, h in rows],
                   "matches": [int(self.matches[self.layers.index(l), h]) for l, h in rows]}
        for p, prop in enumerate(self.properties):
            columns[f"share_{prop}"] = [float(self.share[self.layers.index(l), h, p]) for l, h in rows]
        return pa.table(columns)


def _json_float(value: float) -> float | None:
    return None if value != value else float(value)  # NaN is not JSON


def _float(value) -> float:
    return float("nan") if value is None else float(value)
