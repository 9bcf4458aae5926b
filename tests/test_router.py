"""The router against a direct per-token implementation of DESIGN.md's rule, ties included."""

import torch

from nmoe.serve.ops.router import moe_route_ref


def direct_route(logits, bias, n_group, topk_group, top_k, norm, scale):
    t, e = logits.shape
    per = e // n_group
    ws, ids = [], []
    for i in range(t):
        s = torch.sigmoid(logits[i].double()).tolist()
        c = [s[j] + float(bias[j]) for j in range(e)]
        gsum = []
        for g in range(n_group):
            top2 = sorted(c[g * per:(g + 1) * per], reverse=True)[:2]
            gsum.append(sum(top2))
        groups = sorted(range(n_group), key=lambda g: (-gsum[g], g))[:topk_group]
        cand = [j for g in groups for j in range(g * per, (g + 1) * per)]
        chosen = sorted(cand, key=lambda j: (-c[j], j))[:top_k]
        w = [s[j] for j in chosen]
        if norm:
            tot = sum(w) + 1e-20
            w = [x / tot for x in w]
        ws.append([x * scale for x in w])
        ids.append(chosen)
    return torch.tensor(ws, dtype=torch.float64), torch.tensor(ids)


def _check(logits, bias, **kw):
    w, ids = moe_route_ref(logits, bias, n_group=kw["n_group"], topk_group=kw["topk_group"], top_k=kw["top_k"],
                           norm_topk_prob=kw["norm"], routed_scaling_factor=kw["scale"])
    rw, rids = direct_route(logits, bias, **kw)
    assert torch.equal(ids, rids)
    assert torch.allclose(w.double(), rw, atol=1e-6)


def test_router_random():
    g = torch.Generator().manual_seed(0)
    for e, n_group, topk_group, top_k in [(16, 4, 2, 4), (256, 8, 4, 8), (32, 8, 3, 6)]:
        logits = torch.randn(40, e, generator=g)
        bias = 0.1 * torch.randn(e, generator=g)
        _check(logits, bias, n_group=n_group, topk_group=topk_group, top_k=top_k, norm=True, scale=2.5)
        _check(logits, bias, n_group=n_group, topk_group=topk_group, top_k=top_k, norm=False, scale=1.0)


def test_router_ties_in_group_scores_and_experts():
    g = torch.Generator().manual_seed(1)
    # quantized logits make many exact ties between experts and between group sums
    logits = torch.randint(-2, 3, (64, 16), generator=g).float()
    bias = torch.zeros(16)
    _check(logits, bias, n_group=4, topk_group=2, top_k=4, norm=True, scale=2.5)
    logits = torch.zeros(8, 256)
    _check(logits, torch.zeros(256), n_group=8, topk_group=4, top_k=8, norm=True, scale=2.5)
