"""Zero-shot segmentation: from a heat map to a binary foreground mask, and the protocol's metrics.

The protocol (Chefer et al.'s ImageNet-segmentation evaluation, as the TextSpan and second-order
papers use it; thesis §2.5):

* heat map on the patch grid → bilinear upsampling to the input size (`upsample`);
* optionally clipped at 0 (the token method), then min–max normalised over the image;
* foreground = normalised value > the map's mean (or > a fixed threshold, 0.5 for neurons);
* pixel accuracy = Σ correct / Σ labelled and IoU per class {background, foreground} = Σ ∩ / Σ ∪,
  both accumulated over the whole dataset, mIoU = their mean;
* AP per image = average precision over the concatenation of both channels (targets one-hot
  [background, foreground], scores [1 − H, H] with H the normalised map), NaN → 0; mAP = the mean.

A map whose values are all equal has no min–max normalisation: it is taken as 0 everywhere (no
foreground; the reference code divides by zero and its NaNs become background). Pixels outside
`labelled` (no mask) count nowhere. Everything is per image, so it runs per row block and the
dataset sums are a plain reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int64
from torch import Tensor


def upsample(grid: Float[Tensor, "batch gh gw"], size: tuple[int, int]) -> Float[Tensor, "batch h w"]:
    """Bilinear upsampling of patch-grid maps to the input size (align_corners=False)."""
    return F.interpolate(grid[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def normalise(heat: Float[Tensor, "batch h w"], clip: bool) -> Float[Tensor, "batch h w"]:
    """Optionally clipped at 0, then min–max over each image (a constant map → 0 everywhere)."""
    x = heat.clamp_min(0) if clip else heat
    flat = x.reshape(len(x), -1)
    low = flat.min(1).values[:, None, None]
    span = flat.max(1).values[:, None, None] - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


def foreground(norm: Float[Tensor, "batch h w"], threshold: str | float = "mean") -> Bool[Tensor, "batch h w"]:
    """norm > its per-image mean ("mean"), or > a fixed number."""
    if threshold == "mean":
        return norm > norm.reshape(len(norm), -1).mean(1)[:, None, None]
    return norm > float(threshold)


def pixel_counts(pred: Bool[Tensor, "batch h w"], truth: Bool[Tensor, "batch h w"],
                 labelled: Bool[Tensor, "batch h w"]) -> tuple[Int64[Tensor, " batch"], Int64[Tensor, " batch"]]:
    """Per image: correctly classified labelled pixels, and labelled pixels."""
    correct = ((pred == truth) & labelled).flatten(1).sum(1)
    return correct, labelled.flatten(1).sum(1)


def intersection_union(pred: Bool[Tensor, "batch h w"], truth: Bool[Tensor, "batch h w"],
                       labelled: Bool[Tensor, "batch h w"]
                       ) -> tuple[Int64[Tensor, "batch 2"], Int64[Tensor, "batch 2"]]:
    """Per image and class [background, foreground]: |pred ∩ truth| and |pred ∪ truth| over labelled pixels."""
    inter, union = [], []
    for cls in (False, True):
        p, t = (pred == cls) & labelled, (truth == cls) & labelled
        inter.append((p & t).flatten(1).sum(1))
        union.append((p | t).flatten(1).sum(1))
    return torch.stack(inter, 1), torch.stack(union, 1)


def average_precision(scores: Float[Tensor, " n"], targets: Bool[Tensor, " n"]) -> float:
    """sklearn's `average_precision_score` (binary): Σ over distinct thresholds of (R_k − R_{k−1})·P_k;
    0 when there is no positive (the protocol's NaN → 0)."""
    positives = int(targets.sum())
    if positives == 0:
        return 0.0
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s, t = scores.double()[order], targets[order].double()
    tp = torch.cumsum(t, 0)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # the last position of each run of equal scores: one threshold each
    tp, seen = tp[last], torch.nonzero(last)[:, 0].double() + 1
    precision, recall = tp / seen, tp / positives
    steps = torch.diff(recall, prepend=torch.zeros(1, dtype=recall.dtype))
    return float((steps * precision).sum())


def average_precision_rows(scores: Float[Tensor, "batch n"], targets: Bool[Tensor, "batch n"]) -> Float[Tensor, " batch"]:
    """`average_precision` of every row at once (rows of one length; a row without positives → 0)."""
    s, order = torch.sort(scores.double(), dim=1, descending=True, stable=True)
    t = torch.gather(targets.double(), 1, order)
    tp = torch.cumsum(t, 1)
    positives = tp[:, -1:]
    seen = torch.arange(1, s.shape[1] + 1, dtype=torch.float64)[None]
    last = torch.ones_like(s, dtype=torch.bool)
    last[:, :-1] = s[:, 1:] != s[:, :-1]
    recall = tp / positives.clamp_min(1)
    at_last = torch.where(last, recall, torch.zeros_like(recall))
    before = torch.zeros_like(recall)
    before[:, 1:] = torch.cummax(at_last, 1).values[:, :-1]  # recall at the previous threshold (recall only grows)
    ap = (torch.where(last, recall - before, torch.zeros_like(recall)) * tp / seen).sum(1)
    return torch.where(positives[:, 0] > 0, ap, torch.zeros_like(ap))


def image_ap(norm: Float[Tensor, "batch h w"], truth: Bool[Tensor, "batch h w"],
             labelled: Bool[Tensor, "batch h w"]) -> Float[Tensor, " batch"]:
    """Per image: AP over both channels of its labelled pixels (scores [1 − H, H], targets [¬truth, truth]).
    Unlabelled pixels become negatives below every score: one last threshold that adds no recall, so nothing."""
    h = norm.reshape(len(norm), -1).double()
    t, keep = truth.reshape(len(truth), -1), labelled.reshape(len(labelled), -1)
    floor = torch.full_like(h, -torch.inf)
    scores = torch.cat([torch.where(keep, 1 - h, floor), torch.where(keep, h, floor)], 1)
    targets = torch.cat([~t & keep, t & keep], 1)
    return average_precision_rows(scores, targets)
