"""torch.ops.nmoe.sample on the paths of the split sampler (the default from 128 rows) and the cluster
sampler (its fallback, and the default below) that test_kv_sampling_router.py does not reach; every
test runs under both (skipped without CUDA or nmoe._C): raw top-n logprobs at t != 1 (selected before the logits
become x = v / t), top-k / top-p sets too large for the candidate buffer (a Gumbel sweep over the
rows in shared memory), fewer kept tokens than top-n entries, top_p = 0, min-p alone, masked (-inf)
vocabularies, ties, vocabulary sizes from one CTA to the largest cluster and a vocabulary tail
that is not a multiple of 4, batch independence and run-to-run determinism of every output; for the
split sampler also a batch of rows it resolves beside rows it hands to the fallback, and replay from
a CUDA graph.

Criteria as in test_kv_sampling_router.py: tokens equal to the reference's (same documented noise)
for at least 98% of rows, raw / processed logprobs and top logprobs within 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from test_kv_sampling_router import _llm_like_logits, _ops, _params, _ref_p, assert_top_logprobs

from nmoe.serve.ops.sampling import process_logits, sample_ref


@pytest.fixture(autouse=True, params=["split", "cluster8"])
def sampler(request, monkeypatch):
    """The sampler under test: NMOE_SAMPLE_KERNEL is read at every call."""
    monkeypatch.setenv("NMOE_SAMPLE_KERNEL", request.param)
    return request.param


def _check(ops, logits, t, k, p, mp, ntop, from_proc, min_match=0.98, ties=False):
    b = logits.shape[0]
    seed = torch.arange(b, device="cuda") * 104729 + 17
    pos = torch.arange(b, device="cuda") * 3
    tok, lr, lp, ti, tl = ops.sample(logits, t, k, p, mp, seed, pos, ntop, from_proc)
    ref = sample_ref(logits, t, k, _ref_p(p), mp, seed, pos, ntop, from_proc)
    assert (tok == ref.tokens).float().mean().item() >= min_match
    raw = torch.log_softmax(logits, -1)
    proc = torch.where(
        (t > 0)[:, None], torch.log_softmax(process_logits(logits, t, k, _ref_p(p), mp), -1), raw
    )
    assert torch.isfinite(proc.gather(1, tok[:, None])).all(), "sampled a removed token"
    torch.testing.assert_close(lr, raw.gather(1, tok[:, None])[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(lp, proc.gather(1, tok[:, None])[:, 0], atol=1e-4, rtol=0)
    if ntop:
        src = proc if from_proc else raw
        if ties:
            # Equal values straddle the n-th place, where torch.topk picks any of them: the kernel's
            # order is the composite one, values descending and ids ascending (a stable sort).
            want = torch.sort(src, dim=-1, descending=True, stable=True)
            assert torch.equal(ti, want.indices[:, :ntop])
            torch.testing.assert_close(tl, want.values[:, :ntop], atol=1e-4, rtol=0)
        else:
            assert_top_logprobs(ti, tl, ref, src)
    return tok, lr, lp, ti, tl


CASES = [  # name, temperature, top_k, top_p, min_p, num_top, from_processed
    ("raw top-n, t=0.7, top_k=50", 0.7, 50, 1.0, 0.0, 20, False),
    ("raw top-n, t=1.3, no filters", 1.3, 0, 1.0, 0.0, 8, False),
    ("raw top-n, t=0.8, top_p=0.9", 0.8, 0, 0.9, 0.0, 5, False),
    ("top_k=5000 (more than the candidates)", 1.0, 5000, 1.0, 0.0, 0, False),
    ("top_k=5000, t=0.6, 16 top", 0.6, 5000, 1.0, 0.0, 16, True),
    ("top_p=0.95, t=2 (a large kept set)", 2.0, 0, 0.95, 0.0, 0, False),
    ("top_p=0.5, t=1.5, 30 top", 1.5, 0, 0.5, 0.0, 30, True),
    ("top_k=3, 20 top (fewer kept than n)", 1.0, 3, 1.0, 0.0, 20, True),
    ("top_p=0.3, 40 top (fewer kept than n)", 0.9, 0, 0.3, 0.0, 40, True),
    ("top_p=0 (the top token alone)", 1.0, 0, 0.0, 0.0, 0, False),
    ("top_p=0, 4 top", 1.0, 0, 0.0, 0.0, 4, True),
    ("top_k=10, top_p=0", 0.7, 10, 0.0, 0.0, 0, False),
    ("min_p=0.2 alone", 1.0, 0, 1.0, 0.2, 0, False),
    ("min_p=0.01, t=1.7, 12 top", 1.7, 0, 1.0, 0.01, 12, True),
    ("t=1 full vocab, 10 top", 1.0, 0, 1.0, 0.0, 10, True),
    ("t=0.5 full vocab", 0.5, 0, 1.0, 0.0, 0, False),
    ("greedy, 50 raw top", 0.0, 0, 1.0, 0.0, 50, False),
    ("top_k=40 top_p=0.9 min_p=0.05, 10 top", 0.8, 40, 0.9, 0.05, 10, True),
    ("top_k=1000 top_p=0.95, 3 top", 1.0, 1000, 0.95, 0.0, 3, True),
    ("1024 top logprobs, top_p=0.9", 1.0, 0, 0.9, 0.0, 1024, True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cluster_paths_match_reference(case):
    ops = _ops("sample")
    _, t, k, p, mp, ntop, from_proc = case
    b = 24
    logits = _llm_like_logits(b, seed=11)
    _check(ops, logits, *_params(b, t, k, p, mp), ntop, from_proc)


@pytest.mark.parametrize("v", [300, 5000, 20000, 129280, 131072])
@pytest.mark.parametrize("setting", [(1.0, 0, 0.9, 0.0, 5), (0.8, 40, 1.0, 0.0, 0), (1.0, 0, 1.0, 0.0, 0)])
def test_vocab_sizes(v, setting):
    ops = _ops("sample")
    b = 16
    logits = _llm_like_logits(b, v=v, seed=v)
    t, k, p, mp, ntop = setting
    _check(ops, logits, *_params(b, t, k, p, mp), ntop, True)


@pytest.mark.parametrize("v", [70001, 129283])
def test_vocab_tail_not_multiple_of_4(v):
    """One row, so that its start stays 16-byte aligned: the cluster path with a scalar tail."""
    ops = _ops("sample")
    for setting in [
        (1.0, 0, 0.9, 0.0, 5),
        (0.7, 50, 1.0, 0.0, 3),
        (1.0, 0, 1.0, 0.0, 0),
        (0.0, 0, 1.0, 0.0, 4),
    ]:
        t, k, p, mp, ntop = setting
        logits = _llm_like_logits(1, v=v, seed=5)
        logits[0, v - 1] = logits[0].max() + 3  # the winner in the tail
        _check(ops, logits, *_params(1, t, k, p, mp), ntop, True, min_match=1.0)


def test_masked_vocab():
    """A third of the vocabulary at -inf (padding ids), as an engine's vocabulary mask leaves it."""
    ops = _ops("sample")
    b = 16
    logits = _llm_like_logits(b, seed=21)
    logits[:, 86000:] = float("-inf")
    logits[::3, :1000] = float("-inf")
    for t, k, p, mp, ntop in [
        (1.0, 0, 1.0, 0.0, 0),
        (1.0, 0, 0.9, 0.0, 5),
        (0.7, 50, 1.0, 0.0, 8),
        (0.0, 0, 1.0, 0.0, 3),
    ]:
        tok = _check(ops, logits, *_params(b, t, k, p, mp), ntop, True)[0]
        assert torch.isfinite(logits.gather(1, tok[:, None])).all()


def test_ties():
    """Quantized logits: many equal values around every threshold (lower id first)."""
    ops = _ops("sample")
    b = 16
    logits = (_llm_like_logits(b, seed=31) * 4).round() / 4
    for t, k, p, mp, ntop in [
        (1.0, 30, 1.0, 0.0, 20),
        (1.0, 0, 0.9, 0.0, 20),
        (0.0, 0, 1.0, 0.0, 20),
        (1.0, 0, 1.0, 0.2, 6),
    ]:
        _check(ops, logits, *_params(b, t, k, p, mp), ntop, t > 0, ties=True)


def test_infinite_max():
    """A +inf logit: the row goes to the one-CTA algorithm; greedy and sampled rows take it."""
    ops = _ops("sample")
    b = 4
    logits = _llm_like_logits(b, seed=41)
    logits[:, 777] = float("inf")
    t = torch.tensor([0.0, 1.0, 0.7, 1.0], device="cuda")
    k = torch.tensor([0, 0, 20, 0], dtype=torch.int32, device="cuda")
    p = torch.tensor([1.0, 0.9, 1.0, 1.0], device="cuda")
    mp = torch.zeros(b, device="cuda")
    tok = ops.sample(
        logits,
        t,
        k,
        p,
        mp,
        torch.arange(b, device="cuda"),
        torch.zeros(b, dtype=torch.int64, device="cuda"),
        0,
        False,
    )[0]
    assert tok[0].item() == 777


def test_every_output_batch_independent_and_deterministic():
    ops = _ops("sample")
    b = 24
    logits = _llm_like_logits(b, seed=51)
    t = torch.tensor([0.0, 0.7, 1.0, 1.2, 2.0, 1.0] * 4, device="cuda")
    k = torch.tensor([0, 20, 0, 100, 0, 6000] * 4, dtype=torch.int32, device="cuda")
    p = torch.tensor([1.0, 0.9, 0.95, 1.0, 0.9, 1.0] * 4, device="cuda")
    mp = torch.tensor([0.0, 0.0, 0.02, 0.0, 0.0, 0.1] * 4, device="cuda")
    seed = torch.arange(b, device="cuda") * 7919
    pos = torch.arange(b, device="cuda")
    for ntop, from_proc in [(0, False), (12, True), (12, False)]:
        full = ops.sample(logits, t, k, p, mp, seed, pos, ntop, from_proc)
        again = ops.sample(logits, t, k, p, mp, seed, pos, ntop, from_proc)
        for a, c in zip(full, again):
            assert torch.equal(a, c)
        for sel in (torch.arange(b - 1, -1, -1), torch.arange(1, b, 5), torch.tensor([4])):
            sel = sel.cuda()
            part = ops.sample(
                logits[sel].contiguous(),
                t[sel],
                k[sel],
                p[sel],
                mp[sel],
                seed[sel],
                pos[sel],
                ntop,
                from_proc,
            )
            for a, c in zip(part, full):
                assert torch.equal(a, c[sel])


def test_resolved_and_fallback_rows_in_one_batch():
    """Rows whose kept set lies within the candidates (greedy, full vocabulary, top-k, small top-p,
    min-p) beside rows whose kept set is deeper (top-p 0.95 at t = 2, top-k 3000): each row as the
    reference samples it, whichever path took it."""
    ops = _ops("sample")
    b = 32
    logits = _llm_like_logits(b, seed=61)
    dev = "cuda"
    t = torch.tensor([0.0, 1.0, 0.7, 2.0, 1.0, 0.8, 1.5, 1.0] * 4, device=dev)
    k = torch.tensor([0, 0, 50, 0, 0, 40, 0, 3000] * 4, dtype=torch.int32, device=dev)
    p = torch.tensor([1.0, 1.0, 1.0, 0.95, 0.9, 0.95, 0.5, 1.0] * 4, device=dev)
    mp = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.0, 0.0] * 4, device=dev)
    for ntop, from_proc in [(0, False), (20, True), (20, False)]:
        _check(ops, logits, t, k, p, mp, ntop, from_proc)


def test_graph_replay_matches_eager():
    """Captured in a CUDA graph (as the engine's decode step does), replayed over new logits in the
    same buffer: every output equals the eager call's."""
    ops = _ops("sample")
    b = 16
    buf = _llm_like_logits(b, seed=71)
    dev = "cuda"
    t = torch.tensor([0.0, 1.0, 0.7, 2.0] * 4, device=dev)
    k = torch.tensor([0, 0, 50, 0] * 4, dtype=torch.int32, device=dev)
    p = torch.tensor([1.0, 1.0, 0.9, 0.95] * 4, device=dev)
    mp = torch.zeros(b, device=dev)
    seed = torch.arange(b, device=dev) * 31
    pos = torch.arange(b, device=dev)
    args = (t, k, p, mp, seed, pos, 8, True)
    ops.sample(buf, *args)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.sample(buf, *args)
    for s in (72, 73):
        buf.copy_(_llm_like_logits(b, seed=s))
        graph.replay()
        torch.cuda.synchronize()
        for a, e in zip(out, ops.sample(buf.clone(), *args)):
            assert torch.equal(a, e)
