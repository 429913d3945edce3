"""Head labels and the CLIP-InterpreT scores on hand-built TextSpan tables with known tags (spec S6)."""

import torch

from clipscope.kernels.head_roles import label_heads, property_shares, role_scores


def test_labels_ties_and_scores_on_a_hand_built_table():
    # properties: 0 = a, 1 = b, 2 = c; −1 = untagged; m = 5 of 6 picks
    tags = torch.tensor([
        [0, 0, 0, 1, -1, 2],    # a (3 votes) → matches 3
        [0, 1, 0, -1, 1, 0],    # a 2 vs b 2 in the first five: the summed ratio decides → b (0.5 + 0.2 > 0.1 + 0.1)
        [1, 1, 1, 1, 2, 2],     # b, 4 matches
        [2, -1, -1, -1, -1, 0],  # c, 1 match
        [-1, -1, -1, -1, -1, 0],  # none (only the 6th pick is tagged)
    ])
    ratios = torch.tensor([
        [.3, .2, .1, .1, .1, .1],
        [.1, .5, .1, .05, .2, .05],
        [.4, .3, .1, .1, .05, .05],
        [.6, .1, .1, .1, .05, .05],
        [.2, .2, .2, .2, .1, .1],
    ], dtype=torch.float64)
    labels, matches = label_heads(tags, ratios, 5, 3)
    assert labels.tolist() == [0, 1, 1, 2, -1] and matches.tolist() == [3, 2, 4, 1, 0]
    e, e_shared, a = role_scores(labels, matches, 3)
    assert (e, e_shared, a) == (1 - 3 / 5, 2 / 5, 2 / 5)
    shares = property_shares(tags, ratios, 3)
    assert torch.allclose(shares[1], torch.tensor([.1 + .1 + .05, .5 + .2, 0], dtype=torch.float64))
    assert shares[4].tolist() == [0.1, 0, 0]


def test_the_specs_example_and_equal_votes_and_ratios_go_to_the_first_property():
    labels = torch.tensor([0, 0, 1, 2])  # [a, a, b, c]
    e, e_shared, _ = role_scores(labels, torch.tensor([3, 3, 3, 3]), 3)
    assert (e, e_shared) == (0.25, 0.5)
    tags = torch.tensor([[1, 0]])
    labels, matches = label_heads(tags, torch.tensor([[0.5, 0.5]], dtype=torch.float64), 2, 2)
    assert labels.tolist() == [0] and matches.tolist() == [1]
    # all heads different → 0; all the same → 1 − 1/|H|
    assert role_scores(torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.int64), 3)[0] == 0
    assert role_scores(torch.tensor([1, 1, 1, 1]), torch.zeros(4, dtype=torch.int64), 3)[:2] == (0.75, 1.0)
