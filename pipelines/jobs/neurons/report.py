"""Text from a neurons Result: each neuron's signed texts (a table and its lines) and the reconstruction accuracy."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from clipscope.errors import ParameterError, StoreError
from clipscope.pipelines.jobs.neurons.result import ReconstructionAccuracy, Result
from clipscope.pipelines.texts.pools import TextPool


def neuron_table(result: Result, pool: TextPool, *, m: int, top: int = 5, neurons: Sequence[int] | None = None,
                 pc_explained: np.ndarray | None = None) -> pa.Table:
    """Per neuron its `top` texts of the m-atom decomposition by |coefficient| (one row per text);
    `pc_explained` [neuron]: the share of variance of each PC (the second-order job's), when known."""
    if result.attrs["pool_hash"] != pool.hash:
        raise StoreError(f"the OMP of layer {result.layer} used pool {result.attrs['pool']!r}, not {pool.name!r} "
                         f"(its texts differ); rerun `clipscope neurons` with this pool")
    if m not in result.m:
        raise ParameterError("m", f"{m} was not solved for layer {result.layer}; stored m: {list(result.m)}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ParameterError("top", f"must be an integer ≥ 1, got {top!r}")
    n_neurons = result.support.shape[0]
    chosen = list(range(n_neurons)) if neurons is None else [int(n) for n in neurons]
    bad = [n for n in chosen if not 0 <= n < n_neurons]
    if bad:
        raise ParameterError("neurons", f"must lie in 0..{n_neurons - 1}, got {bad[0]}")
    i = result.m.index(m)
    columns: dict[str, list] = {k: [] for k in ("layer", "neuron", "rank", "text_index", "text", "coefficient",
                                                "sign", "pc_explained", "residual_norm")}
    for n in chosen:
        support, coefs = result.support[n, :m], result.coefs[i, n, :m]
        picked = np.flatnonzero(support >= 0)
        order = picked[np.argsort(-np.abs(coefs[picked]), kind="stable")][:top]
        for rank, k in enumerate(order):
            columns["layer"].append(result.layer)
            columns["neuron"].append(n)
            columns["rank"].append(rank)
            columns["text_index"].append(int(support[k]))
            columns["text"].append(pool.texts[int(support[k])])
            columns["coefficient"].append(float(coefs[k]))
            columns["sign"].append("+" if coefs[k] > 0 else "-")
            columns["pc_explained"].append(None if pc_explained is None else float(pc_explained[n]))
            columns["residual_norm"].append(float(result.residual_norm[n, i]))
    return pa.table(columns, schema=pa.schema([
        ("layer", pa.int64()), ("neuron", pa.int64()), ("rank", pa.int64()), ("text_index", pa.int64()),
        ("text", pa.string()), ("coefficient", pa.float64()), ("sign", pa.string()),
        ("pc_explained", pa.float64()), ("residual_norm", pa.float64())]))


def format_neurons(table: pa.Table, neurons: Sequence[int], m: int) -> str:
    """One line per neuron: its signed texts, PC1's explained variance when stored."""
    data = table.to_pydict()
    lines = []
    for n in neurons:
        idx = [i for i, v in enumerate(data["neuron"]) if v == n]
        texts = "  ".join(f"{data['sign'][i]}{data['text'][i]!r}" for i in idx) or "(no text: its PC is 0)"
        notes = []
        if idx and data["pc_explained"][idx[0]] is not None:
            notes.append(f"PC1 explains {data['pc_explained'][idx[0]]:.1%}")
        if idx:
            notes.append(f"residual {data['residual_norm'][idx[0]]:.3f} at m={m}")
        lines.append(f"neuron {n}" + (f" ({', '.join(notes)})" if notes else "") + f": {texts}")
    return "\n".join(lines)


def format_accuracy(result: ReconstructionAccuracy) -> str:
    lines = [f"zero-shot accuracy ({result.task}, {result.n_labelled} labelled images), every neuron's "
             f"centred effect replaced by ⟨φ−φ̄, r⟩·r̂:",
             f"  original embedding   {result.baseline:.2%}",
             f"  PC1 (r̂ = r)          {result.pc_accuracy:.2%}"]
    lines += [f"  m = {m:<4}             {acc:.2%}" for m, acc in zip(result.m, result.accuracy)]
    return "\n".join(lines)
