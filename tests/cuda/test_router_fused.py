"""torch.ops.nmoe moe_route (the register-resident warp router) and moe_gate_route (gate GEMM + router)
against the torch references (skipped without CUDA or nmoe._C).

Criteria. moe_route: ids exact incl. ties, weights within 1e-6 + 1e-5 relative; NaN logits exactly as
the shared-memory kernel treats them (a per-row oracle here). moe_gate_route: against
moe_route_ref of float64 logits of the bf16 operands; on every row whose choice margins (the kept
groups' against the next group's score, the ordered top_k + 1 choices) exceed 1e-5 or are exact ties,
ids exact and weights within 1e-5; such rows at least 90% of the batch. Bitwise: run to run, a row
alone vs within a batch (batch invariance), CUDA-graph replay vs eager.
"""

from __future__ import annotations

import math

import pytest
import torch
from cuda_support import nmoe_ops

from nmoe.serve.ops.router import moe_gate_route, moe_route_ref

V3 = (256, 8, 4, 8, True, 2.5)  # experts, n_group, topk_group, top_k, norm_topk_prob, routed_scaling_factor
ROUTE_CFGS = [
    V3,
    (64, 4, 2, 6, False, 1.0),
    (160, 32, 3, 32, True, 1.0),  # groups of 5: not whole lanes
    (256, 1, 1, 8, True, 2.5),  # one group of all 32 lanes
    (192, 8, 4, 8, True, 2.5),  # groups of 3 lanes
    (100, 4, 2, 4, True, 1.0),  # experts % 8 != 0: scalar loads, a partial lane
    (16, 4, 2, 4, True, 2.5),  # the tiny model's rule
    (384, 8, 4, 8, True, 2.5),  # past 256 experts: the shared-memory kernel
]


def _kw(cfg):
    _, n_group, topk_group, top_k, norm, scale = cfg
    return dict(
        n_group=n_group, topk_group=topk_group, top_k=top_k, norm_topk_prob=norm, routed_scaling_factor=scale
    )


def _route(ops, logits, bias, cfg):
    return ops.moe_route(logits, bias, *cfg[1:])


def _gate_route(ops, x, w, bias, cfg):
    return ops.moe_gate_route(x, w, bias, *cfg[1:])


def _logits(t, e, ties, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(t, e, device="cuda", generator=g) * 3
    bias = torch.randn(e, device="cuda", generator=g) * 0.1
    if ties:  # exact ties between experts and between group sums
        logits = (logits * 2).round() / 2
        bias = (bias * 16).round() / 16
        logits[: min(t, 5)] = 0.0  # whole rows of equal scores
    return logits, bias


# ---------------------------------------------------------------- moe_route


@pytest.mark.parametrize("cfg", ROUTE_CFGS)
@pytest.mark.parametrize("t", [0, 1, 7, 32, 300])
@pytest.mark.parametrize("ties", [False, True])
def test_route_exact(cfg, t, ties):
    ops = nmoe_ops("moe_route")
    logits, bias = _logits(t, cfg[0], ties, seed=cfg[0] + cfg[1] + t)
    w, ids = _route(ops, logits, bias, cfg)
    rw, rids = moe_route_ref(logits, bias, **_kw(cfg))
    assert w.shape == (t, cfg[3]) and ids.dtype == torch.int64
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cfg", [V3, (100, 4, 2, 4, True, 1.0)])
def test_route_strided_logits(cfg):
    """Row strides that are no multiple of 4 and rows off 16-byte boundaries: the scalar loads."""
    ops = nmoe_ops("moe_route")
    e = cfg[0]
    wide, bias = _logits(33, e + 3, ties=False, seed=5)
    bias = bias[:e].contiguous()
    for logits in (wide[:, :e], wide[:, 1 : e + 1]):
        w, ids = _route(ops, logits, bias, cfg)
        rw, rids = moe_route_ref(logits, bias, **_kw(cfg))
        assert torch.equal(ids, rids)
        torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-5)


def _nan_route(logits, bias, n_group, topk_group, top_k, norm_topk_prob, routed_scaling_factor):
    """The kernels' NaN rule, row by row: NaN choices are ignored by the group scores and never chosen
    in a kept group; dropped groups' experts are -inf (chosen in index order); once nothing is left,
    expert 0 with score[0]."""
    logits, bias = logits.cpu(), bias.cpu()
    t, e = logits.shape
    per = e // n_group
    scores = 1.0 / (1.0 + torch.exp(-logits))
    choice = scores + bias
    ws, ids = [], []
    for i in range(t):
        c = choice[i].tolist()
        gs = []
        for gi in range(n_group):
            vals = sorted((v for v in c[gi * per : (gi + 1) * per] if not math.isnan(v)), reverse=True)
            vals += [-math.inf] * 2
            gs.append(vals[0] + vals[1])
        kept = set(sorted(range(n_group), key=lambda gi: (-gs[gi], gi))[:topk_group])
        cand = {j: (c[j] if j // per in kept else -math.inf) for j in range(e)}
        cand = {j: v for j, v in cand.items() if not math.isnan(v)}
        row = []
        for _ in range(top_k):
            j = min(cand, key=lambda j: (-cand[j], j)) if cand else 0
            cand.pop(j, None)
            row.append(j)
        w = scores[i, row]
        if norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        ws.append(w * routed_scaling_factor)
        ids.append(row)
    return torch.stack(ws), torch.tensor(ids)


@pytest.mark.parametrize("cfg", [V3, (64, 4, 4, 8, True, 2.5), (384, 8, 4, 8, True, 2.5)])
def test_route_nan_logits(cfg):
    ops = nmoe_ops("moe_route")
    e = cfg[0]
    logits, bias = _logits(64, e, ties=False, seed=11)
    g = torch.Generator(device="cuda").manual_seed(12)
    frac = torch.linspace(0.0, 1.0, 64, device="cuda")[:, None]
    logits[torch.rand(64, e, device="cuda", generator=g) < frac] = float("nan")  # row i: about i/63 NaN
    logits[5] = float("nan")
    logits[5, [9, 3, e - 1]] = torch.tensor([1.0, 2.0, 0.5], device="cuda")  # three left: exhausted
    w, ids = _route(ops, logits, bias, cfg)
    rw, rids = _nan_route(logits, bias, **_kw(cfg))
    assert torch.equal(ids.cpu(), rids)
    torch.testing.assert_close(w.cpu(), rw, atol=1e-6, rtol=1e-5, equal_nan=True)


# ---------------------------------------------------------------- moe_gate_route

GATE_SHAPES = [  # (hidden, rule)
    (7168, V3),  # DeepSeek-V3: 32 K slices, 4 expert tiles
    (320, (16, 4, 2, 4, True, 2.5)),  # the tiny model: a partial last slice, one partly used tile
    (1024, (72, 9, 3, 6, False, 1.0)),
    (2048, (90, 3, 2, 8, True, 1.0)),  # experts % 4 != 0: padded partial rows
]


def _gate_inputs(t, hidden, e, seed, dup_experts=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, hidden, device="cuda", generator=g).bfloat16()
    w = (torch.randn(e, hidden, device="cuda", generator=g) * 0.02).bfloat16()
    bias = torch.randn(e, device="cuda", generator=g) * 0.1
    if dup_experts:  # identical experts: exact ties, the lower index first
        w[e // 2 + 1] = w[1]
        w[e - 1] = w[3]
        bias[e // 2 + 1] = bias[1]
        bias[e - 1] = bias[3]
    return x, w, bias


def _separated(logits64, bias, cfg, tol=1e-5):
    """Rows whose float64 choices leave the reference's selection stable: every margin that decides it
    (the last kept group's score against the next, consecutive chosen choices, the last chosen against
    the next) is an exact tie or above tol."""
    e, n_group, topk_group, top_k = cfg[:4]
    t = logits64.shape[0]
    choice = logits64.sigmoid() + bias.double()
    gs = choice.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)
    gsorted = gs.sort(dim=-1, descending=True).values

    def clear(d):
        return (d == 0) | (d > tol)

    ok = torch.ones(t, dtype=torch.bool, device=logits64.device)
    if topk_group < n_group:
        ok &= clear(gsorted[:, topk_group - 1] - gsorted[:, topk_group])
    kept = torch.zeros(t, n_group, dtype=torch.bool, device=logits64.device)
    kept.scatter_(1, gs.topk(topk_group, dim=-1).indices, True)
    masked = choice.masked_fill(~kept.repeat_interleave(e // n_group, dim=1), float("-inf"))
    top = masked.sort(dim=-1, descending=True).values[:, : top_k + 1]
    d = top[:, :-1] - top[:, 1:]
    ok &= (clear(d) | torch.isinf(top[:, 1:])).all(-1)
    return ok


def _check_gate(w, ids, x, gate_w, bias, cfg, min_ok=0.9):
    logits64 = x.double() @ gate_w.double().T
    rw, rids = moe_route_ref(logits64, bias, **_kw(cfg))
    ok = _separated(logits64, bias, cfg)
    assert ok.sum().item() >= int(min_ok * ok.numel()), "too few well-separated rows for a meaningful check"
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids[ok], rids[ok])
    torch.testing.assert_close(w[ok], rw[ok].float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", GATE_SHAPES)
@pytest.mark.parametrize("t", [1, 7, 32, 33, 128])
def test_gate_route_vs_reference(shape, t):
    ops = nmoe_ops("moe_gate_route")
    hidden, cfg = shape
    x, gate_w, bias = _gate_inputs(t, hidden, cfg[0], seed=hidden + t, dup_experts=True)
    w, ids = _gate_route(ops, x, gate_w, bias, cfg)
    _check_gate(w, ids, x, gate_w, bias, cfg)


def test_gate_route_exact_ties():
    """Zero rows: every logit exactly 0, choices tie wherever the (quantized) biases do."""
    ops = nmoe_ops("moe_gate_route")
    x, gate_w, bias = _gate_inputs(32, 7168, 256, seed=3)
    x[::3] = 0
    bias = (bias * 8).round() / 8
    w, ids = _gate_route(ops, x, gate_w, bias, V3)
    rw, rids = moe_route_ref(x.double() @ gate_w.double().T, bias, **_kw(V3))
    assert torch.equal(ids[::3], rids[::3])
    torch.testing.assert_close(w[::3], rw[::3].float(), atol=1e-6, rtol=0)


def test_gate_route_empty():
    ops = nmoe_ops("moe_gate_route")
    x, gate_w, bias = _gate_inputs(0, 7168, 256, seed=0)
    w, ids = _gate_route(ops, x, gate_w, bias, V3)
    assert w.shape == (0, 8) and ids.shape == (0, 8) and ids.dtype == torch.int64


def test_gate_route_deterministic():
    ops = nmoe_ops("moe_gate_route")
    x, gate_w, bias = _gate_inputs(32, 7168, 256, seed=4)
    w, ids = _gate_route(ops, x, gate_w, bias, V3)
    for _ in range(3):
        w2, ids2 = _gate_route(ops, x, gate_w, bias, V3)
        assert torch.equal(w2, w) and torch.equal(ids2, ids)


@pytest.mark.parametrize("shape", GATE_SHAPES[:2])
def test_gate_route_batch_invariant(shape):
    """A row's result is bitwise the same alone, in any batch, at any position, in a strided view."""
    ops = nmoe_ops("moe_gate_route")
    hidden, cfg = shape
    x, gate_w, bias = _gate_inputs(128, hidden, cfg[0], seed=6)
    full_w, full_ids = _gate_route(ops, x, gate_w, bias, cfg)
    for i in (0, 5, 31, 32, 77, 127):
        w1, ids1 = _gate_route(ops, x[i : i + 1], gate_w, bias, cfg)
        assert torch.equal(w1[0], full_w[i]) and torch.equal(ids1[0], full_ids[i])
    w32, ids32 = _gate_route(ops, x[:32], gate_w, bias, cfg)
    assert torch.equal(w32, full_w[:32]) and torch.equal(ids32, full_ids[:32])
    perm = torch.randperm(128, device="cuda")[:45]
    wp, idsp = _gate_route(ops, x[perm], gate_w, bias, cfg)
    assert torch.equal(wp, full_w[perm]) and torch.equal(idsp, full_ids[perm])
    ws, idss = _gate_route(ops, x[1::2], gate_w, bias, cfg)  # row stride 2 * hidden
    assert torch.equal(ws, full_w[1::2]) and torch.equal(idss, full_ids[1::2])


def test_gate_route_cuda_graph():
    ops = nmoe_ops("moe_gate_route")
    x, gate_w, bias = _gate_inputs(32, 7168, 256, seed=7)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _gate_route(ops, x, gate_w, bias, V3)  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gw, gids = _gate_route(ops, x, gate_w, bias, V3)
    x.copy_(_gate_inputs(32, 7168, 256, seed=8)[0])
    graph.replay()
    w, ids = _gate_route(ops, x, gate_w, bias, V3)
    assert torch.equal(gw, w) and torch.equal(gids, ids)


def test_gate_route_bad_inputs():
    ops = nmoe_ops("moe_gate_route")
    x, gate_w, bias = _gate_inputs(4, 7168, 256, seed=9)
    bad = [
        ((x.float(), gate_w, bias), "x must be bfloat16"),
        ((x, gate_w.float(), bias), "gate_weight must be bfloat16"),
        ((x, gate_w, bias.bfloat16()), "bias must be float32"),
        ((x[0], gate_w, bias), r"x must be \[tokens, hidden\]"),
        ((x, gate_w[:, :7136], bias), r"gate_weight must be \[experts, hidden = 7168\]"),
        ((x, gate_w, bias[:255]), r"bias must be \[256\]"),
        ((x, gate_w.t().contiguous().t(), bias), "gate_weight must be contiguous"),
        ((x[:, :7160], gate_w[:, :7160].contiguous(), bias), "hidden size 7160"),
        ((x.t().contiguous().t(), gate_w, bias), "x rows must be unit-stride"),
        ((torch.zeros(129, 7168, dtype=torch.bfloat16, device="cuda"), gate_w, bias), "at most 128"),
        ((x, torch.cat([gate_w, gate_w]), torch.cat([bias, bias])), r"experts = 512 must be in \[1, 256\]"),
        ((x, gate_w, bias.cpu()), "bias is on cpu"),
    ]
    for args, match in bad:
        with pytest.raises(RuntimeError, match=match):
            _gate_route(ops, *args, V3)
    with pytest.raises(RuntimeError, match="n_group = 7"):
        _gate_route(ops, x, gate_w, bias, (256, 7, 4, 8, True, 2.5))


# ---------------------------------------------------------------- ops.router.moe_gate_route


@pytest.mark.parametrize("t", [32, 200])
def test_python_dispatch(t):
    """The fused op up to 128 tokens, torch.mm + moe_route past it: both against the reference."""
    nmoe_ops("moe_gate_route")
    x, gate_w, bias = _gate_inputs(t, 7168, 256, seed=10 + t)
    w, ids = moe_gate_route(x, gate_w, bias, **_kw(V3))
    _check_gate(w, ids, x, gate_w, bias, V3)
