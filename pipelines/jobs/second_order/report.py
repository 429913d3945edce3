"""Text of a `clipscope second-order` result."""

from __future__ import annotations

import numpy as np

from clipscope.kernels.second_order_ablation import ABLATIONS
from clipscope.pipelines.jobs.second_order.result import Result

ABLATION_LABELS = {
    "baseline": "baseline",
    "all_neurons": "w/o all neurons",
    "small_norm": "w/o small norm",
    "large_norm": "w/o large norm",
    "pc1_reconstruction": "PC1 reconstruction",
}


def format_summary(result: Result) -> str:
    """The layer's statistics in a few lines."""
    a, attrs = result.arrays, result.attrs
    n = len(a["norm_mean"])
    share = a["significant_share"]
    return "\n".join([
        f"layer {result.layer}: {n} neurons over {attrs['count']} images, top {attrs['top_k']} rows each "
        f"({attrs['convention']} convention)",
        f"  centred norm: median over neurons of the mean {np.median(a['norm_mean']):.4g}, "
        f"of the max {np.median(a['norm_max']):.4g}",
        f"  energy in the top-k rows ({attrs['topk_fraction']:.1%} of images): median {np.median(a['energy_topk']):.1%}",
        f"  significant (norm ≥ layer p{attrs['significance_percent']} = {attrs['significance_threshold']:.4g}): "
        f"median {np.median(share):.1%} of images per neuron, max {share.max():.1%}",
        f"  PC1 share of the top-k rows' energy: median {np.median(a['pc_explained']):.1%}",
    ])


def format_evaluation(result: Result) -> str:
    """The accuracy under each ablation and its change from the baseline ("" without an evaluation)."""
    if result.evaluation is None:
        return ""
    table = result.accuracy
    lines = [f"zero-shot accuracy ({result.settings.task}, {result.labelled} labelled images)"]
    baseline = table["baseline"]
    for name in ABLATIONS:
        delta = "" if name == "baseline" else f"  ({table[name] - baseline:+.1%})"
        lines.append(f"  {ABLATION_LABELS[name]:<20} {table[name]:7.1%}{delta}")
    return "\n".join(lines)
