"""Zero-shot scoring against explicit loops and open_clip's classifier convention."""

import numpy as np
import pytest
import torch

from clipscope.errors import ConfigError
from clipscope.kernels.zero_shot import class_weights, correct_counts, count_correct, predict, zero_shot_logits


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_logits_are_cosines_and_counts_skip_unlabelled_samples():
    emb, weights = randn(6, 4, seed=8) * 7, torch.nn.functional.normalize(randn(4, 3, seed=9), dim=0)
    logits = zero_shot_logits(emb, weights)
    for i in range(6):
        for c in range(3):
            cos = emb[i] @ weights[:, c] / emb[i].norm()
            assert abs(logits[i, c].item() - cos.item()) < 1e-12
    predicted = logits.argmax(1)
    classes = predicted.clone()
    classes[0] = (predicted[0] + 1) % 3  # one miss
    classes[1] = -1  # unlabelled: neither hit nor miss
    assert correct_counts(logits, classes).item() == 4
    flipped = -logits
    manual = sum(int(flipped[i].argmax() == classes[i]) for i in range(6) if classes[i] >= 0)
    assert correct_counts(torch.stack([logits, flipped]), classes).tolist() == [4, manual]


def test_class_weights_are_normalised_means_of_unit_prompt_embeddings():
    prompts = randn(5, 3, 8, seed=1) * 4  # [class template embed], any norm
    got = class_weights(prompts)
    expected = np.zeros((8, 5))
    for c in range(5):
        units = [p / np.linalg.norm(p) for p in prompts[c].numpy()]
        mean = np.mean(units, axis=0)
        expected[:, c] = mean / np.linalg.norm(mean)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="class template embed"):
        class_weights(randn(5, 8))


def test_predictions_and_counts_ignore_the_image_norm_and_batch_over_leading_axes():
    emb, weights = randn(2, 7, 4, seed=3), class_weights(randn(3, 2, 4, seed=4))
    classes = torch.tensor([0, 1, 2, -1, 0, 1, 2])
    scaled = emb * torch.linspace(0.1, 9, 7)[None, :, None]
    assert torch.equal(predict(scaled, weights), predict(emb, weights))
    for a in range(2):
        manual = sum(int((emb[a, i] @ weights).argmax() == classes[i]) for i in range(7) if classes[i] >= 0)
        assert count_correct(emb, weights, classes)[a].item() == manual
    assert count_correct(emb.float(), weights, classes).tolist() == count_correct(emb, weights, classes).tolist()
