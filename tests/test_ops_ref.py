"""CPU tests of the torch reference ops (the CPU execution path and the oracle of the CUDA kernels)."""

from __future__ import annotations

import math

import pytest
import torch
from stats import chi2_critical, chi2_stat

from nmoe.serve.ops.attention import mla_decode_paged_ref
from nmoe.serve.ops.router import moe_route_ref
from nmoe.serve.ops.sampling import gumbel_noise, process_logits, sample_ref

R, D = 32, 8  # small latent / rope widths: the reference is shape-generic


def _paged_case(lengths, heads, page_size, seed=0):
    """A paged cache with NaN in every unused slot and huge ids in padded block-table entries."""
    g = torch.Generator().manual_seed(seed)
    max_pages = max(1, max(-(-n // page_size) for n in lengths) + 1)
    num_pages = sum(-(-n // page_size) for n in lengths) + 3
    cache = torch.full((num_pages, page_size, R + D), float("nan"))
    table = torch.full((len(lengths), max_pages), 2**31 - 1, dtype=torch.int32)
    perm = torch.randperm(num_pages, generator=g)
    dense, used = [], 0
    for i, n in enumerate(lengths):
        kv = torch.randn(n, R + D, generator=g)
        dense.append(kv)
        for j in range(-(-n // page_size)):
            page = int(perm[used])
            used += 1
            table[i, j] = page
            chunk = kv[j * page_size : (j + 1) * page_size]
            cache[page, : len(chunk)] = chunk
    q = torch.randn(len(lengths), heads, R + D, generator=g)
    return q, cache, table, torch.tensor(lengths, dtype=torch.int32), dense


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_mla_decode_ref_matches_dense_recompute(page_size):
    lengths = [0, 1, 5, 16, 37]
    q, cache, table, seq_lens, dense = _paged_case(lengths, heads=3, page_size=page_size)
    scale = 0.3
    out, lse = mla_decode_paged_ref(q, cache, table, seq_lens, scale, R)
    for i, n in enumerate(lengths):
        if n == 0:
            assert torch.all(out[i] == 0) and torch.all(lse[i] == float("-inf"))
            continue
        kv = dense[i].double()
        s = q[i].double() @ kv.t() * scale
        want_lse = torch.logsumexp(s, -1)
        want = torch.softmax(s, -1) @ kv[:, :R]
        torch.testing.assert_close(lse[i].double(), want_lse, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[i].double(), want, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def _mix32_py(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_gumbel_noise_matches_documented_hash():
    seeds = torch.tensor([0, 1, -1, 2**40 + 7, -(2**62)], dtype=torch.int64)
    positions = torch.tensor([0, 5, 2**33 + 3, 17, 1], dtype=torch.int64)
    vocab = 40
    got = gumbel_noise(seeds, positions, vocab)
    for r in range(len(seeds)):
        s = int(seeds[r]) & 0xFFFFFFFFFFFFFFFF
        key = _mix32_py(_mix32_py(_mix32_py(s & 0xFFFFFFFF) ^ (s >> 32)) ^ (int(positions[r]) & 0xFFFFFFFF))
        for tok in range(vocab):
            h = _mix32_py(key ^ _mix32_py((tok + 0x9E3779B9) & 0xFFFFFFFF))
            u = ((h >> 8) + 0.5) / 2**24
            want = torch.tensor(-math.log(-math.log(u)), dtype=torch.float64).float()
            assert got[r, tok].item() == want.item(), (r, tok)


def _params(b, t=1.0, k=0, p=1.0, mp=0.0):
    return (
        torch.full((b,), t),
        torch.full((b,), k, dtype=torch.int32),
        torch.full((b,), p),
        torch.full((b,), mp),
    )


def test_sample_ref_greedy_is_lowest_argmax():
    logits = torch.randn(6, 50)
    logits[2, 7] = logits[2, 30] = logits[2].max() + 1.0  # a tie: the lower id wins
    t, k, p, mp = _params(6, t=0.0)
    out = sample_ref(logits, t, k, p, mp, torch.arange(6), torch.zeros(6, dtype=torch.int64))
    want = logits.argmax(-1)
    want[2] = 7
    assert torch.equal(out.tokens, want)
    torch.testing.assert_close(out.logprobs_processed, out.logprobs_raw)
    torch.testing.assert_close(out.logprobs_raw, torch.log_softmax(logits, -1).gather(1, want[:, None])[:, 0])


def test_sample_ref_seeded_rows_independent_of_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 100, generator=g)
    t, k, p, mp = _params(8, t=0.9, k=30, p=0.95, mp=0.01)
    seed, pos = torch.arange(100, 108), torch.arange(8) * 3
    full = sample_ref(logits, t, k, p, mp, seed, pos)
    order = torch.tensor([5, 2, 7])
    part = sample_ref(logits[order], t[order], k[order], p[order], mp[order], seed[order], pos[order])
    assert torch.equal(part.tokens, full.tokens[order])
    mixed_t = t.clone()
    mixed_t[0] = 0.0  # a greedy neighbour changes nothing for the others
    mixed = sample_ref(logits, mixed_t, k, p, mp, seed, pos)
    assert torch.equal(mixed.tokens[1:], full.tokens[1:])




def test_sample_ref_distribution_matches_processed_softmax():
    v, n = 40, 20000
    row = torch.randn(v, generator=torch.Generator().manual_seed(2)) * 2
    logits = row.expand(n, v).contiguous()
    t, k, p, mp = _params(n, t=0.8, k=25, p=0.9, mp=0.01)
    out = sample_ref(logits, t, k, p, mp, torch.arange(n), torch.zeros(n, dtype=torch.int64))
    probs = torch.softmax(process_logits(logits[:1], t[:1], k[:1], p[:1], mp[:1])[0], -1)
    assert torch.all(probs[out.tokens] > 0), "sampled a removed token"
    stat, df = chi2_stat(out.tokens, probs)
    assert stat < chi2_critical(df), (stat, df)


def test_process_logits_masks():
    x = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0]])
    one = torch.ones(1)

    def kept(k=0, p=1.0, mp=0.0):
        out = process_logits(
            x, one, torch.tensor([k], dtype=torch.int32), torch.tensor([p]), torch.tensor([mp])
        )
        return torch.isfinite(out[0]).nonzero()[:, 0].tolist()

    assert kept(k=2) == [0, 2]
    assert kept() == [0, 1, 2, 3, 4]
    probs = torch.softmax(x[0], -1)
    sorted_p = probs.sort(descending=True).values
    p = float(sorted_p[0] + sorted_p[1] / 2)  # mass reaches p inside the second token
    assert kept(p=p) == [0, 2]
    assert kept(p=1e-6) == [0]  # the top token is always kept
    assert kept(mp=float(probs[1] / probs[0]) - 1e-4) == [0, 1, 2]


def _route_python(logits, bias, n_group, topk_group, top_k, norm, scale):
    """One token at a time, with plain sorted() (stable: ties keep the lower index)."""
    e = logits.numel()
    s = [1 / (1 + math.exp(-float(v))) for v in logits]
    c = [s[i] + float(bias[i]) for i in range(e)]
    gs = e // n_group
    gscore = [sum(sorted(c[g * gs : (g + 1) * gs], reverse=True)[:2]) for g in range(n_group)]
    groups = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
    cand = [i for i in range(e) if i // gs in groups]
    ids = sorted(cand, key=lambda i: -c[i])[:top_k]
    w = [s[i] for i in ids]
    if norm:
        tot = sum(w) + 1e-20
        w = [x / tot for x in w]
    return [x * scale for x in w], ids


@pytest.mark.parametrize(
    "cfg", [(64, 8, 4, 8, True, 2.5), (48, 4, 2, 6, False, 1.0), (32, 1, 1, 3, True, 1.0)]
)
def test_router_ref_matches_per_token_python(cfg):
    e, n_group, topk_group, top_k, norm, scale = cfg
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(40, e, generator=g) * 2).round() / 2  # coarse values: many ties
    bias = (torch.randn(e, generator=g) * 4).round() / 8
    w, ids = moe_route_ref(
        logits,
        bias,
        n_group=n_group,
        topk_group=topk_group,
        top_k=top_k,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
    )
    for t in range(logits.shape[0]):
        want_w, want_ids = _route_python(logits[t], bias, n_group, topk_group, top_k, norm, scale)
        assert ids[t].tolist() == want_ids, t
        torch.testing.assert_close(w[t], torch.tensor(want_w), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- MoE row bookkeeping, fused views


def test_moe_align_and_combine_ref_match_per_slot_python():
    from nmoe.serve.ops.moe import moe_align_ref, moe_combine_ref

    g = torch.Generator().manual_seed(5)
    t, k, experts, h = 13, 4, 6, 8
    ids = torch.randint(0, experts, (t, k), generator=g)
    src_rows, pos, offsets = moe_align_ref(ids, experts)
    # expected: slots in (expert, slot) order
    order = sorted(range(t * k), key=lambda s: (int(ids.view(-1)[s]), s))
    assert src_rows.tolist() == [s // k for s in order]
    assert [pos.view(-1)[s].item() for s in order] == list(range(t * k))
    counts = [int((ids == e).sum()) for e in range(experts)]
    assert offsets.tolist() == [sum(counts[:e]) for e in range(experts + 1)]
    ys = torch.randn(t * k, h, generator=g)
    w = torch.rand(t, k, generator=g)
    add = torch.randn(t, h, generator=g)
    y = moe_combine_ref(ys, pos, w, add)
    for i in range(t):
        want = add[i] + sum(w[i, j] * ys[pos[i, j]] for j in range(k))
        torch.testing.assert_close(y[i], want, rtol=1e-6, atol=1e-6)
    # global ids through an expert map: the same sort as of the mapped ids
    expert_map = torch.randint(0, experts, (4 * experts,), generator=g)
    gids = torch.randint(0, 4 * experts, (t, k), generator=g)
    mapped = moe_align_ref(gids, experts, expert_map)
    for a, b in zip(mapped, moe_align_ref(expert_map[gids], experts)):
        assert torch.equal(a, b)


def test_quant_fp8_act_rows_and_head_view_on_cpu():
    from nmoe.serve.ops.fp8 import quant_fp8_act, quant_fp8_act_ref

    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 256, generator=g)
    rows = torch.tensor([3, 3, 0, 8])
    q, s = quant_fp8_act(x, rows)
    rq, rs = quant_fp8_act_ref(x[rows])
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    o = torch.randn(2, 9, 128, generator=g)  # [H, B, v] read as [B, H * v]
    q, s = quant_fp8_act(o.transpose(0, 1))
    rq, rs = quant_fp8_act_ref(o.transpose(0, 1).reshape(9, 256))
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
