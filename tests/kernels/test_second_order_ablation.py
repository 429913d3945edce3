"""Mean-ablation of second-order effects from q against effects materialised with second_order_effects."""

import numpy as np
import pytest
import torch

from clipscope.errors import ConfigError
from clipscope.kernels.decompose import second_order_effects
from clipscope.kernels.second_order_ablation import ABLATIONS, ablated_embeddings, ablation_terms, add_terms


def _world(seed, b=40, n_later=2, heads=3, n=11, e=9):
    g = np.random.default_rng(seed)
    q = torch.from_numpy(g.normal(size=(b, n_later, heads, n)) * (g.random((b, 1, 1, n)) < 0.3) + 0.1)
    d = torch.from_numpy(g.normal(size=(n_later, heads, n, e)))
    shared = torch.from_numpy(g.normal(size=(b, e)) + 0.5)
    emb = torch.from_numpy(g.normal(size=(b, e)))
    pc = torch.from_numpy(g.normal(size=(n, e)))
    pc = pc / pc.norm(dim=1, keepdim=True)
    in_top = torch.from_numpy(g.random((b, n)) < 0.2)
    return q, d, shared, emb, pc, in_top


@pytest.mark.parametrize("with_shared", [False, True])
def test_ablations_equal_materialised_effects(with_shared):
    q, d, shared, emb, pc, in_top = _world(0)
    s = shared if with_shared else None
    phi = second_order_effects(q, d, s)  # [b n e]
    centred = phi - phi.mean(0)
    x = torch.einsum("bne,ne->bn", centred, pc)
    expected = {
        "baseline": emb,
        "all_neurons": emb - centred.sum(1),
        "small_norm": emb - (centred * (~in_top)[:, :, None]).sum(1),
        "large_norm": emb - (centred * in_top[:, :, None]).sum(1),
        "pc1_reconstruction": emb - centred.sum(1) + torch.einsum("bn,ne->be", x, pc),
    }
    b, n_later, heads, n = q.shape
    dq = (q - q.mean(0)).reshape(b, n_later * heads, n).transpose(1, 2)
    dn = d.reshape(n_later * heads, n, -1).transpose(0, 1)
    ds = None if s is None else s - s.mean(0)
    whole = ablation_terms(dq, dn, pc, in_top, ds)
    got = ablated_embeddings(emb, whole)
    assert got.shape == (len(ABLATIONS), b, emb.shape[1])
    for i, name in enumerate(ABLATIONS):
        torch.testing.assert_close(got[i], expected[name], rtol=1e-12, atol=1e-12)
    # The terms are additive over neurons: two chunks give the same embeddings.
    parts = [ablation_terms(dq[:, c], dn[c], pc[c], in_top[:, c], ds) for c in (slice(0, 4), slice(4, n))]
    torch.testing.assert_close(ablated_embeddings(emb, add_terms(*parts)), got, rtol=1e-12, atol=1e-12)


def test_shape_errors_name_the_argument():
    q, d, shared, emb, pc, in_top = _world(1)
    dq = q.flatten(1, 2).transpose(1, 2)
    dn = d.flatten(0, 1).transpose(0, 1)
    with pytest.raises(ConfigError, match="directions"):
        ablation_terms(dq, dn[:, :-1], pc, in_top)
    with pytest.raises(ConfigError, match="in_top"):
        ablation_terms(dq, dn, pc, in_top[:-1])
    with pytest.raises(ConfigError, match="ds must"):
        ablation_terms(dq, dn, pc, in_top, shared[:-1])
