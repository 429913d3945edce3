"""Neuron segmentation (second-order paper §5.2) as methods of `clipscope segment`.

For each class c, 𝒩_c = the `top_neurons` neurons of largest |⟨r_n, w_c⟩| (with `--centre-classes`:
|⟨r_n, w_c − w̄⟩|, w̄ the mean class direction) over the layers Ls (`--layers`,
paper 8 9 10; default: every layer with both `activations/layer_l` and a second-order PC), with r_n the
neuron's rank-1 PC (`reductions/second_order/layer_l/pc`) and w_c the task's class direction; flat index n =
offset_l + neuron, ties to the lower index. For an image of class ĉ (predicted or label, as the job says),
    heat(p) = mean_{n∈𝒩_ĉ} p_p^{l,n}(I)          (post-activation values at the patch tokens p)
then the job's protocol: bilinear to the input size, min–max, foreground > 0.5, no clipping (the reference's
`compute_segmentation.py`). `neurons-random` is the reference's `--random` baseline: 𝒩_c = `top_neurons`
neurons drawn without replacement by numpy's generator seeded with (seed, c).

Registered on import as "neurons" and "neurons-random" (`methods.register_method`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from clipscope.errors import ParameterError, StoreError
from clipscope.pipelines.jobs.segment.methods import Context, Method, register_method
from clipscope.storage import schema
from clipscope.storage.store import RunStore


def neuron_layers(store: RunStore, settings: Any) -> tuple[int, ...]:
    """Ls: `settings.layers`, or every layer with activations and a second-order PC."""
    names = set(store.array_names())

    def ready(layer: int) -> bool:
        return (schema.ACTIVATIONS.path(layer=layer) in names
                and f"{schema.SECOND_ORDER.path(layer=layer)}/pc" in names)

    if settings.layers:
        for layer in settings.layers:
            if schema.ACTIVATIONS.path(layer=layer) not in names:
                raise StoreError(f"the neurons method needs activations/layer_{layer} in {store.url}; extract with "
                                 f"--activation-layers {layer}")
            if not ready(layer):
                raise StoreError(f"the neurons method needs the PCs of layer {layer}; run `clipscope second-order "
                                 f"{store.url} --layer {layer}`")
        return tuple(settings.layers)
    found = tuple(sorted(int(f["layer"]) for f in map(schema.ACTIVATIONS.matches, names) if f and ready(int(f["layer"]))))
    if not found:
        raise StoreError(f"the neurons method needs activations (--activation-layers L) and `clipscope second-order "
                         f"--layer L` of some layer L in {store.url}")
    return found


def selected_neurons(pcs: np.ndarray, weights: np.ndarray, top: int, *, random: bool = False,
                     seed: int = 0) -> np.ndarray:
    """[class, rank] flat neuron indices: per class the `top` of largest |⟨r_n, w_c⟩| (ties: lower index), or
    `top` random ones (seeded by (seed, class))."""
    n_neurons, n_classes = pcs.shape[0], weights.shape[1]
    if top > n_neurons:
        raise ParameterError("top_neurons", f"must be ≤ the {n_neurons} neurons of the layers, got {top}")
    if random:
        return np.stack([np.random.default_rng([seed, c]).choice(n_neurons, size=top, replace=False)
                         for c in range(n_classes)]).astype(np.int64)
    scores = np.abs(pcs @ weights)  # [neuron class]
    return np.argsort(-scores.T, axis=1, kind="stable")[:, :top].astype(np.int64)


def _pcs(store: RunStore, layers: tuple[int, ...]) -> np.ndarray:
    return np.concatenate([store.read_result(f"{schema.SECOND_ORDER.path(layer=l)}/pc").astype(np.float64)
                           for l in layers])


def chosen_neurons(store: RunStore, context: Context, random: bool) -> np.ndarray:
    """[class, rank] the neurons of `context`'s settings (flat index over `neuron_layers`)."""
    settings = context.settings
    weights = context.weights
    if settings.centre_classes:
        weights = weights - weights.mean(1, keepdims=True)
    return selected_neurons(_pcs(store, neuron_layers(store, settings)), weights, settings.top_neurons,
                            random=random, seed=int(settings.seed))


def _heat(store: RunStore, rows: slice, context: Context, random: bool) -> np.ndarray:
    layers = neuron_layers(store, context.settings)
    chosen = chosen_neurons(store, context, random)
    acts = np.concatenate([store.read(schema.ACTIVATIONS.path(layer=l), rows)[:, 1:].astype(np.float64)
                           for l in layers], axis=2)  # [rows patch neuron], flat over the layers
    picked = chosen[np.maximum(context.classes, 0)]  # [rows top]
    heat = np.take_along_axis(acts, picked[:, None, :], axis=2).mean(2)
    return heat.reshape(len(heat), *context.grid)


def neuron_heat(store: RunStore, rows: slice, context: Context) -> np.ndarray:
    return _heat(store, rows, context, random=False)


def random_neuron_heat(store: RunStore, rows: slice, context: Context) -> np.ndarray:
    return _heat(store, rows, context, random=True)


def _selection(random: bool):
    def selection(store: RunStore, context: Context) -> tuple[np.ndarray, dict[str, Any]]:
        layers = neuron_layers(store, context.settings)
        sizes = [store.array(schema.ACTIVATIONS.path(layer=l)).shape[2] for l in layers]
        return chosen_neurons(store, context, random), {
            "layers": list(layers), "offsets": [int(o) for o in np.cumsum([0, *sizes[:-1]])], "random": random,
            "centre_classes": bool(context.settings.centre_classes)}
    return selection


def _check(store: RunStore, settings: Any) -> None:
    layers = neuron_layers(store, settings)
    n = sum(store.array(schema.ACTIVATIONS.path(layer=l)).shape[2] for l in layers)
    if settings.top_neurons > n:
        raise ParameterError("top_neurons", f"must be ≤ the {n} neurons of layers {list(layers)}, got "
                                            f"{settings.top_neurons}")


register_method(Method("neurons", neuron_heat, clip=False, threshold=0.5, check=_check, selection=_selection(False)),
                replace=True)
register_method(Method("neurons-random", random_neuron_heat, clip=False, threshold=0.5, check=_check,
                       selection=_selection(True)), replace=True)
