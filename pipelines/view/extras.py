"""The viewer's sections over results of the newer jobs — head roles, segmentation, Rosetta — each shown when
the store holds it, else naming the command that makes it."""

from __future__ import annotations

from typing import Any

import numpy as np

from clipscope.errors import StoreError
from clipscope.pipelines.view.data import NotFound, StoreView, check_int
from clipscope.storage import schema


def _complete(view: StoreView, group: str) -> dict[str, Any] | None:
    return view.store.result_group_attrs(group)


def head_roles(view: StoreView, layer: int | None) -> dict[str, Any] | None:
    """{head: role label} of `layer` from `reductions/roles` (`clipscope roles`), or None when absent."""
    if layer is None:
        return None
    group = schema.ROLES.path()
    attrs = _complete(view, group)
    name = schema.ROLES["label"].path()
    if attrs is None or name not in view.store.array_names():
        return None
    arr = view.store.array(name)
    layers = [int(v) for v in arr.attrs.get("layers", attrs.get("layers", []))]
    properties = list(arr.attrs.get("properties", attrs.get("properties", [])))
    if layer not in layers:
        return {"labels": {}, "properties": properties}
    labels = np.asarray(arr[layers.index(layer)], np.int64)
    return {"labels": {h: (properties[v] if 0 <= v < len(properties) else "none") for h, v in enumerate(labels)},
            "properties": properties}


def segmentation(view: StoreView) -> dict[str, Any]:
    """The stored zero-shot segmentation results (`clipscope segment`): one summary per method and task."""
    prefix = "reductions/segmentation/"
    groups = sorted({"/".join(name.split("/")[:4]) for name in view.store.array_names()
                     if name.startswith(prefix) and len(name.split("/")) == 5})
    results = []
    for group in groups:
        attrs = _complete(view, group)
        if attrs is None:
            continue
        _, _, method, task = group.split("/")
        shown = {k: attrs.get(k) for k in ("pixel_acc", "miou", "map", "n", "class_mode", "threshold", "clip",
                                            "target", "geometry") if k in attrs}
        results.append({"method": method, "task": task, "group": group, "summary": shown})
    return {"name": "segmentation", "results": results,
            "command": f"clipscope segment {view.url} --method tokens --task TASK "
                       f"(needs `clipscope extract … --masks mask.png --token-sum`)",
            "columns": ["method", "task", "pixel_acc", "miou", "map", "n", "class_mode", "threshold", "target"]}


def segmentation_of_row(view: StoreView, row: int) -> list[dict[str, Any]]:
    """Per stored segmentation result, this row's scores (one row of each array)."""
    out = []
    for result in segmentation(view)["results"]:
        group = result["group"]
        names = set(view.store.array_names())
        item = {"method": result["method"], "task": result["task"]}
        for leaf in ("correct", "labelled", "ap"):
            if f"{group}/{leaf}" in names:
                item[leaf] = float(view.store.array(f"{group}/{leaf}")[row])
        for leaf in ("intersection", "union"):
            if f"{group}/{leaf}" in names:
                item[leaf] = [float(v) for v in view.store.array(f"{group}/{leaf}")[row]]
        if "intersection" in item and "union" in item and item["union"][1] > 0:
            item["iou_foreground"] = item["intersection"][1] / item["union"][1]
        out.append(item)
    return out


ROSETTA_PREFIX = "reductions/rosetta/"


def rosetta_names(view: StoreView) -> list[str]:
    """Names of the complete Rosetta results (their `summary` group is written last)."""
    names = sorted({name.split("/")[2] for name in view.store.array_names()
                    if name.startswith(ROSETTA_PREFIX) and name.endswith("/summary/n_units")})
    return [n for n in names if _complete(view, f"{ROSETTA_PREFIX}{n}/summary") is not None]


def rosetta(view: StoreView, name: str | None = None, page: int = 0, per_page: int = 12) -> dict[str, Any]:
    """Rosetta concepts (`clipscope rosetta`) with their dictionary images, one page of concepts of one result:
    per concept its tuples (the first one's units, ``model:layer:channel``) and its top images of this store."""
    names = rosetta_names(view)
    out: dict[str, Any] = {"name": "rosetta", "names": names, "results": [], "concepts": [],
                           "command": f"clipscope rosetta {view.url} OTHER_STORE … (after `clipscope maps` of each "
                                      f"model, see README)", "columns": ["group"]}
    if not names:
        return out
    name = names[0] if name is None else name
    if name not in names:
        raise NotFound(f"no Rosetta result {name!r} in {view.url}; stored: {names}")
    base = f"{ROSETTA_PREFIX}{name}"
    attrs = _complete(view, f"{base}/summary") or {}
    arrays = set(view.store.array_names())
    rows = view.store.array(f"{base}/dictionary/example_rows")
    scores = view.store.array(f"{base}/dictionary/example_scores")
    n_concepts = int(rows.shape[0])
    pages = max(1, -(-n_concepts // per_page))
    page = check_int(page, "page", 0, pages - 1)
    shown = range(page * per_page, min(n_concepts, (page + 1) * per_page))
    tuple_concepts = (np.asarray(view.store.array(f"{base}/tuples/concept")[...], np.int64)
                      if f"{base}/tuples/concept" in arrays else np.zeros(0, np.int64))
    models = list(attrs.get("models", []))
    inputs = attrs.get("inputs") or []
    concepts = []
    for concept in shown:
        members = np.flatnonzero(tuple_concepts == concept)
        units = []
        if members.size and f"{base}/tuples/members" in arrays:
            first = np.asarray(view.store.array(f"{base}/tuples/members")[int(members[0])], np.int64)
            units = [_describe_unit(view, base, model, int(unit), inputs) for model, unit in enumerate(first)]
        examples = view.samples_at(np.asarray(rows[concept], np.int64), np.asarray(scores[concept], np.float64))
        concepts.append({"concept": concept, "n_tuples": int(members.size), "units": units, "examples": examples})
    out.update({"result": name, "models": models, "page": page, "pages": pages, "n_concepts": n_concepts,
                "n_tuples": int(tuple_concepts.size), "concepts": concepts,
                "results": [{"group": base, "summary": {k: attrs.get(k) for k in ("k", "self_k", "rule", "score",
                                                                                   "n_images") if k in attrs}}]})
    return out


def _describe_unit(view: StoreView, base: str, model: int, unit: int, inputs: list) -> str:
    """``label:layer:channel`` of a unit, as `rosetta.Result.describe_unit` writes it."""
    label = "anchor" if model == 0 else f"m{model}"
    if unit < 0:
        return f"{label}:—"
    try:
        layer_index = int(view.store.array(f"{base}/units/{label}/layer_index")[unit])
        channel = int(view.store.array(f"{base}/units/{label}/channel")[unit])
        layers = inputs[model]["layers"]
        return f"{label}:{layers[layer_index]}:{channel}"
    except (KeyError, IndexError, TypeError, StoreError):
        return f"{label}:unit {unit}"
