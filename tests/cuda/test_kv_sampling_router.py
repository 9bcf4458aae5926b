"""torch.ops.nmoe kv_append_paged / kv_copy_pages / sample / moe_route against the torch references
(skipped without CUDA or nmoe._C).

Criteria: KV ops bit-exact. Sampling: greedy tokens exact (ties to the lower id); seeded tokens
identical across batch compositions and equal to the reference's tokens (same documented noise);
empirical distribution vs the processed softmax by chi-square at p = 0.999; raw and processed
logprobs and top logprobs within 1e-4 of the reference. Router: ids exact incl. ties, weights 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from cuda_support import nmoe_ops
from stats import chi2_critical, chi2_stat

from nmoe.serve.ops.kv import kv_append_paged_ref, kv_copy_pages_ref
from nmoe.serve.ops.router import moe_route_ref
from nmoe.serve.ops.sampling import process_logits, sample_ref

V = 129280




_ops = nmoe_ops


# ---------------------------------------------------------------- KV cache


@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("page_size", [16, 64])
def test_kv_append_exact(src_dtype, page_size):
    ops = _ops("kv_append_paged")
    g = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.randn(40, page_size, 576, device="cuda", generator=g).bfloat16()
    t = 300
    out_loc = torch.randperm(40 * page_size, device="cuda", generator=g)[:t]
    c_kv = torch.randn(t, 512, device="cuda", generator=g).to(src_dtype)
    k_pe = torch.randn(t, 64, device="cuda", generator=g).to(src_dtype)
    want = cache.clone()
    kv_append_paged_ref(want, out_loc, c_kv, k_pe)
    ops.kv_append_paged(cache, out_loc, c_kv, k_pe)
    assert torch.equal(cache, want)
    ops.kv_append_paged(cache, out_loc[:0], c_kv[:0], k_pe[:0])  # T = 0 is a no-op
    assert torch.equal(cache, want)


def test_kv_append_strided_sources():
    ops = _ops("kv_append_paged")
    cache = torch.zeros(8, 64, 576, device="cuda", dtype=torch.bfloat16)
    both = torch.randn(50, 576 + 8, device="cuda").bfloat16()
    c_kv, k_pe = both[:, :512], both[:, 512:576]
    out_loc = torch.arange(50, device="cuda") * 7
    want = cache.clone()
    kv_append_paged_ref(want, out_loc, c_kv, k_pe)
    ops.kv_append_paged(cache, out_loc, c_kv, k_pe)
    assert torch.equal(cache, want)


def test_kv_copy_pages_exact():
    ops = _ops("kv_copy_pages")
    cache = torch.randn(30, 64, 576, device="cuda").bfloat16()
    src = torch.tensor([3, 7, 7, 12], device="cuda")
    dst = torch.tensor([20, 21, 22, 29], device="cuda")
    want = cache.clone()
    kv_copy_pages_ref(want, src, dst)
    ops.kv_copy_pages(cache, src, dst)
    assert torch.equal(cache, want)


# ---------------------------------------------------------------- sampling


def _params(b, t=1.0, k=0, p=1.0, mp=0.0):
    dev = "cuda"
    return (
        torch.full((b,), t, device=dev),
        torch.full((b,), k, dtype=torch.int32, device=dev),
        torch.full((b,), p, device=dev),
        torch.full((b,), mp, device=dev),
    )


def _llm_like_logits(b, v=V, seed=0):
    """Peaky rows like a language model's: a few strong candidates over a long tail."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(b, v, device="cuda", generator=g) * 2
    top = torch.randint(0, v, (b, 8), device="cuda", generator=g)
    x.scatter_add_(1, top, torch.rand(b, 8, device="cuda", generator=g) * 12 + 4)
    return x


def _ref_p(p):
    """top_p for the reference: p >= 1 is "off" in the kernel; the reference's float cumsum can reach
    1.0 early and drop a tail of tiny tokens at p = 1, so it is given +inf there (truly off)."""
    return torch.where(p >= 1, torch.full_like(p, float("inf")), p)


def assert_top_logprobs(ids, vals, ref, logprobs):
    """Values within 1e-4 of the reference; ids equal where the reference's value is finite and
    unique in its row (the reference's torch.topk orders ties arbitrarily; the kernel puts the lower
    id first); each id's own logprob (from `logprobs` [B, V]) equals its reported value."""
    torch.testing.assert_close(vals, ref.top_logprobs, atol=1e-4, rtol=0)
    rv = ref.top_logprobs
    unique = torch.isfinite(rv) & ((rv[:, :, None] == rv[:, None, :]).sum(-1) == 1)
    assert torch.equal(ids[unique], ref.top_ids[unique])
    torch.testing.assert_close(logprobs.gather(1, ids), vals, atol=1e-4, rtol=0)
    for row in range(ids.shape[0]):  # ties: lower id first
        for a in range(ids.shape[1] - 1):
            if vals[row, a] == vals[row, a + 1]:
                assert ids[row, a] < ids[row, a + 1]


def _run(ops, logits, t, k, p, mp, seed, pos, ntop=0, from_proc=False):
    return ops.sample(logits, t, k, p, mp, seed, pos, ntop, from_proc)


def test_greedy_exact_with_ties():
    ops = _ops("sample")
    logits = _llm_like_logits(64)
    logits[3, 100] = logits[3, 90000] = logits[3].max() + 1  # tie: the lower id
    logits[4, :] = 0.5  # all equal: id 0
    t, k, p, mp = _params(64, t=0.0)
    seed = torch.arange(64, device="cuda")
    pos = torch.zeros(64, dtype=torch.int64, device="cuda")
    tok, lr, lp, _, _ = _run(ops, logits, t, k, p, mp, seed, pos)
    ref = sample_ref(logits, t, k, p, mp, seed, pos)
    assert torch.equal(tok, ref.tokens) and tok[3] == 100 and tok[4] == 0
    torch.testing.assert_close(lr, ref.logprobs_raw, atol=1e-4, rtol=0)
    torch.testing.assert_close(lp, ref.logprobs_processed, atol=1e-4, rtol=0)


SETTINGS = [  # (temperature, top_k, top_p, min_p)
    (1.0, 0, 1.0, 0.0),
    (0.7, 50, 1.0, 0.0),
    (1.0, 0, 0.9, 0.0),
    (0.8, 40, 0.95, 0.05),
    (1.3, 0, 1.0, 0.1),
    (1.0, 1, 1.0, 0.0),
]


@pytest.mark.parametrize("setting", SETTINGS)
def test_seeded_matches_reference(setting):
    ops = _ops("sample")
    b = 48
    logits = _llm_like_logits(b, seed=1)
    t, k, p, mp = _params(b, *setting)
    seed = torch.randint(-(2**62), 2**62, (b,), device="cuda")
    pos = torch.randint(0, 2**20, (b,), device="cuda")
    tok, lr, lp, ti, tl = _run(ops, logits, t, k, p, mp, seed, pos, 5, True)
    ref = sample_ref(logits, t, k, _ref_p(p), mp, seed, pos, 5, True)
    assert (tok == ref.tokens).float().mean().item() >= 0.98
    raw = torch.log_softmax(logits, -1)
    proc = torch.log_softmax(process_logits(logits, t, k, _ref_p(p), mp), -1)
    torch.testing.assert_close(lr, raw.gather(1, tok[:, None])[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(lp, proc.gather(1, tok[:, None])[:, 0], atol=1e-4, rtol=0)
    assert_top_logprobs(ti, tl, ref, proc)


def test_seeded_reproducible_across_batch_mixes():
    ops = _ops("sample")
    b = 32
    logits = _llm_like_logits(b, seed=2)
    t = torch.tensor([0.0, 0.7, 1.0, 1.2] * 8, device="cuda")
    k = torch.tensor([0, 20, 0, 100] * 8, dtype=torch.int32, device="cuda")
    p = torch.tensor([1.0, 0.9, 0.95, 1.0] * 8, device="cuda")
    mp = torch.tensor([0.0, 0.0, 0.02, 0.0] * 8, device="cuda")
    seed = torch.arange(b, device="cuda") * 7919
    pos = torch.arange(b, device="cuda")
    full = _run(ops, logits, t, k, p, mp, seed, pos)[0]
    for sel in (torch.arange(b - 1, -1, -1), torch.arange(1, b, 3), torch.tensor([5])):
        sel = sel.cuda()
        part = _run(ops, logits[sel].contiguous(), t[sel], k[sel], p[sel], mp[sel], seed[sel], pos[sel])[0]
        assert torch.equal(part, full[sel])
    again = _run(ops, logits, t, k, p, mp, seed, pos)[0]
    assert torch.equal(again, full)


@pytest.mark.parametrize("setting", [(0.8, 25, 0.9, 0.01), (1.0, 0, 1.0, 0.0), (1.5, 0, 0.8, 0.0)])
def test_distribution_chi_square(setting):
    ops = _ops("sample")
    v, n = 300, 40000
    row = _llm_like_logits(1, v=v, seed=3)[0] * 0.5
    logits = row.expand(n, v).contiguous()
    t, k, p, mp = _params(n, *setting)
    seed = torch.arange(n, device="cuda") + 12345
    pos = torch.zeros(n, dtype=torch.int64, device="cuda")
    tok = _run(ops, logits, t, k, p, mp, seed, pos)[0]
    probs = torch.softmax(process_logits(logits[:1], t[:1], k[:1], _ref_p(p[:1]), mp[:1])[0], -1)
    assert torch.all(probs[tok] > 0), "sampled a removed token"
    stat, df = chi2_stat(tok.cpu(), probs.cpu())
    assert stat < chi2_critical(df), (stat, df)


def test_flat_rows_and_big_top_k():
    """Flat rows make the top-p / top-k selections walk every radix round."""
    ops = _ops("sample")
    b = 8
    logits = torch.randn(b, V, device="cuda") * 0.01
    logits[0] = 0.25  # all tied
    t, k, p, mp = _params(b, 1.0, 70000, 0.5, 0.0)
    seed = torch.arange(b, device="cuda")
    pos = torch.zeros(b, dtype=torch.int64, device="cuda")
    tok, lr, lp, ti, tl = _run(ops, logits, t, k, p, mp, seed, pos, 20, True)
    ref = sample_ref(logits, t, k, p, mp, seed, pos, 20, True)
    proc = torch.log_softmax(process_logits(logits, t, k, p, mp), -1)
    assert torch.isfinite(proc.gather(1, tok[:, None])).all(), "sampled a removed token"
    torch.testing.assert_close(lp, proc.gather(1, tok[:, None])[:, 0], atol=1e-4, rtol=0)
    assert_top_logprobs(ti, tl, ref, proc)


def test_top_logprobs_raw_and_greedy_rows():
    ops = _ops("sample")
    b = 16
    logits = _llm_like_logits(b, seed=4)
    t = torch.tensor([0.0, 1.0] * 8, device="cuda")
    k, p, mp = _params(b, 1.0, 30, 0.9, 0.0)[1:]
    seed = torch.arange(b, device="cuda")
    pos = torch.zeros(b, dtype=torch.int64, device="cuda")
    for from_proc in (False, True):
        _, _, _, ti, tl = _run(ops, logits, t, k, p, mp, seed, pos, 40, from_proc)
        ref = sample_ref(logits, t, k, _ref_p(p), mp, seed, pos, 40, from_proc)
        raw = torch.log_softmax(logits, -1)
        proc = torch.log_softmax(process_logits(logits, t, k, _ref_p(p), mp), -1)
        src = torch.where((t > 0)[:, None], proc, raw) if from_proc else raw
        assert_top_logprobs(ti, tl, ref, src)


# ---------------------------------------------------------------- router


@pytest.mark.parametrize(
    "cfg",
    [
        (256, 8, 4, 8, True, 2.5),
        (64, 4, 2, 6, False, 1.0),
        (160, 32, 3, 32, True, 1.0),
        (256, 1, 1, 8, True, 2.5),
    ],
)
@pytest.mark.parametrize("ties", [False, True])
def test_router_exact(cfg, ties):
    ops = _ops("moe_route")
    e, n_group, topk_group, top_k, norm, scale = cfg
    g = torch.Generator(device="cuda").manual_seed(e + n_group)
    logits = torch.randn(4099, e, device="cuda", generator=g) * 3
    bias = torch.randn(e, device="cuda", generator=g) * 0.1
    if ties:
        logits = (logits * 2).round() / 2
        bias = (bias * 16).round() / 16
        logits[:7] = 0.0  # whole rows of equal scores
    kw = dict(
        n_group=n_group, topk_group=topk_group, top_k=top_k, norm_topk_prob=norm, routed_scaling_factor=scale
    )
    w, ids = ops.moe_route(logits, bias, n_group, topk_group, top_k, norm, scale)
    rw, rids = moe_route_ref(logits, bias, **kw)
    assert ids.dtype == torch.int64 and torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-5)
    w0, ids0 = ops.moe_route(logits[:0], bias, n_group, topk_group, top_k, norm, scale)
    assert w0.shape == (0, top_k) and ids0.shape == (0, top_k)
