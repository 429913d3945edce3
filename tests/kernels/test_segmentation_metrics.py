"""The segmentation metrics equal a literal re-implementation of the official evaluation code
(Chefer et al.'s `batch_pix_accuracy`, `batch_intersection_union`, `get_ap_scores` and the map
post-processing of the TextSpan `compute_segmentations.py`), written here from its published
behaviour, on random maps; AP equals sklearn's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from clipscope.kernels.segmentation_metrics import (
    average_precision,
    average_precision_rows,
    foreground,
    image_ap,
    intersection_union,
    normalise,
    pixel_counts,
    upsample,
)


# --- the reference, literally: two-channel outputs, argmax over channels, labels + 1, histograms ---------


def ref_pix_accuracy(output: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    _, predict = torch.max(output, 0)
    predict = predict.cpu().numpy() + 1
    target = target.cpu().numpy() + 1
    pixel_labeled = np.sum(target > 0)
    pixel_correct = np.sum((predict == target) * (target > 0))
    return int(pixel_correct), int(pixel_labeled)


def ref_intersection_union(output: torch.Tensor, target: torch.Tensor, nclass: int = 2):
    _, predict = torch.max(output, 0)
    predict = predict.cpu().numpy() + 1
    target = target.cpu().numpy() + 1
    predict = predict * (target > 0).astype(predict.dtype)
    intersection = predict * (predict == target)
    area_inter, _ = np.histogram(intersection, bins=nclass, range=(1, nclass))
    area_pred, _ = np.histogram(predict, bins=nclass, range=(1, nclass))
    area_lab, _ = np.histogram(target, bins=nclass, range=(1, nclass))
    return area_inter, area_pred + area_lab - area_inter


def ref_ap_scores(output_ap: torch.Tensor, target: torch.Tensor) -> list[float]:
    total = []
    for pred, tgt in zip(output_ap, target):
        expanded = tgt.unsqueeze(0).expand_as(pred)
        onehot = torch.zeros_like(expanded).scatter_(0, tgt.unsqueeze(0).clamp(min=0).long(), 1)
        p = pred.numpy().reshape(-1)[expanded.numpy().reshape(-1) != -1]
        t = onehot.numpy().reshape(-1)[expanded.numpy().reshape(-1) != -1]
        total.append(np.nan_to_num(average_precision_score(t, p)))
    return total


def ref_postprocess(res: torch.Tensor, clip: bool):
    """`compute_segmentations.py`: clip, min–max, > mean; two-channel outputs for the metrics."""
    if clip:
        res = res.clamp(min=0)
    res = (res - res.min()) / (res.max() - res.min())
    ret = res.mean()
    res_1 = res.gt(ret).type(res.type())
    res_0 = res.le(ret).type(res.type())
    return torch.stack([res_0, res_1]), torch.stack([1 - res, res])


@pytest.mark.parametrize("clip", [True, False])
def test_metrics_equal_the_reference_code_on_random_maps(clip):
    rng = np.random.default_rng(3)
    heat = torch.from_numpy(rng.standard_normal((6, 4, 4)))
    maps = upsample(heat, (16, 16))
    truth = torch.from_numpy(rng.random((6, 16, 16)) < 0.3)
    labelled = torch.ones_like(truth)
    norm = normalise(maps, clip)
    pred = foreground(norm)
    correct, n_labelled = pixel_counts(pred, truth, labelled)
    inter, union = intersection_union(pred, truth, labelled)
    ap = image_ap(norm, truth, labelled)
    for i in range(len(maps)):
        output, output_ap = ref_postprocess(maps[i], clip)
        target = truth[i].long()
        assert (int(correct[i]), int(n_labelled[i])) == ref_pix_accuracy(output, target)
        ref_inter, ref_union = ref_intersection_union(output, target)
        assert inter[i].tolist() == ref_inter.tolist() and union[i].tolist() == ref_union.tolist()
        assert ap[i].item() == pytest.approx(ref_ap_scores(output_ap[None], target[None])[0], abs=1e-12)


def test_average_precision_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(2, 60))
        scores = rng.integers(0, 5, n).astype(np.float64) / 4  # many ties
        targets = rng.random(n) < 0.4
        targets[0] = True
        got = average_precision(torch.from_numpy(scores), torch.from_numpy(targets))
        assert got == pytest.approx(average_precision_score(targets, scores), abs=1e-12), trial
    assert average_precision(torch.tensor([0.1, 0.2]), torch.tensor([False, False])) == 0.0
    # the batched form, rows of one length
    scores = torch.from_numpy(rng.integers(0, 6, (7, 40)) / 5)
    targets = torch.from_numpy(rng.random((7, 40)) < 0.3)
    targets[3] = False
    batched = average_precision_rows(scores, targets)
    for i in range(7):
        assert batched[i].item() == pytest.approx(average_precision(scores[i], targets[i]), abs=1e-12)


def test_image_ap_drops_unlabelled_pixels():
    rng = np.random.default_rng(4)
    norm = torch.from_numpy(rng.random((3, 6, 6)))
    truth = torch.from_numpy(rng.random((3, 6, 6)) < 0.4)
    labelled = torch.from_numpy(rng.random((3, 6, 6)) < 0.7)
    got = image_ap(norm, truth, labelled)
    for i in range(3):
        keep = labelled[i].reshape(-1).numpy()
        h, t = norm[i].reshape(-1).numpy()[keep], truth[i].reshape(-1).numpy()[keep]
        expected = average_precision_score(np.concatenate([~t, t]), np.concatenate([1 - h, h]))
        assert got[i].item() == pytest.approx(expected, abs=1e-12)


def test_unlabelled_pixels_count_nowhere_and_a_flat_map_has_no_foreground():
    heat = torch.zeros(1, 4, 4, dtype=torch.float64)
    norm = normalise(heat, clip=True)
    assert torch.equal(norm, torch.zeros_like(norm)) and not foreground(norm).any()
    truth = torch.zeros(1, 4, 4, dtype=torch.bool)
    truth[0, :2] = True
    labelled = torch.ones_like(truth)
    labelled[0, 0] = False
    correct, n = pixel_counts(foreground(norm), truth, labelled)
    assert (int(correct[0]), int(n[0])) == (8, 12)
    inter, union = intersection_union(foreground(norm), truth, labelled)
    assert inter[0].tolist() == [8, 0] and union[0].tolist() == [12, 4]
