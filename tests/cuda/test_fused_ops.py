"""The decode step's fused bookkeeping kernels against their torch references (skipped without CUDA
or nmoe._C): moe_align, moe_combine, quant_fp8_act's row gather and head view,
kv_norm_rope_append, mla_decode_q, and the RMSNorms with their output's quantization.

Criteria: integer outputs exact (moe_align up to the order within an expert, which the contract
leaves free: offsets exact, every slot in its expert's rows, src_rows[pos] the slot's token);
FP8 bytes and scales exact (the fused norm + quantization: every output bit-exact with the two
kernels it replaces); rope parts bit-exact; the RMSNorm latent and the fp32 combine within
one bf16 rounding (relative 2^-7) of the reference.
"""

from __future__ import annotations

import pytest
import torch
from cuda_support import nmoe_ops

from nmoe.serve.ops.attention import mla_decode_q
from nmoe.serve.ops.fp8 import quant_fp8_act, quant_fp8_act_ref
from nmoe.serve.ops.kv import kv_append_paged_ref
from nmoe.serve.ops.moe import moe_align_ref, moe_combine_ref
from nmoe.serve.ops.norm import rms_norm
from nmoe.serve.ops.rope import apply_rope

_ops = nmoe_ops


def _ids(t, k, experts, gen, skew=False):
    if skew:  # a hot expert: half the slots
        ids = torch.randint(0, experts, (t, k), generator=gen)
        ids[torch.rand(t, k, generator=gen) < 0.5] = experts // 2
        return ids.cuda()
    return torch.randint(0, experts, (t, k), generator=gen).cuda()


@pytest.mark.parametrize("t,k,experts", [(1, 8, 32), (7, 8, 32), (32, 8, 32), (256, 8, 256), (33, 1, 5),
                                         (4096, 8, 32), (16384, 8, 32)])
@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("mapped", [False, True])
def test_moe_align(t, k, experts, skew, mapped):
    """`mapped`: the ids are global over 8x the experts and an expert map (the loopback's, a
    many-to-one table) gives each its local expert inside the kernel."""
    ops = _ops("moe_align")
    gen = torch.Generator().manual_seed(t * 31 + k)
    expert_map = None
    if mapped:
        expert_map = torch.randint(0, experts, (8 * experts,), generator=gen).cuda()
        ids = _ids(t, k, 8 * experts, gen, skew)
        src_rows, pos, offsets = ops.moe_align(ids, experts, expert_map)
        ids = expert_map[ids]  # what the checks below compare against
    else:
        ids = _ids(t, k, experts, gen, skew)
        src_rows, pos, offsets = ops.moe_align(ids, experts)
    _, ref_pos, ref_offsets = moe_align_ref(ids, experts)
    assert torch.equal(offsets, ref_offsets)
    pos = pos.view(t, k)
    assert torch.equal(torch.sort(pos.flatten()).values, torch.arange(t * k, device="cuda"))  # a permutation
    lo, hi = offsets.long()[ids], offsets.long()[ids + 1]
    assert bool(((pos >= lo) & (pos < hi)).all()), "a slot outside its expert's rows"
    tokens = torch.arange(t, device="cuda")[:, None].expand(t, k)
    assert torch.equal(src_rows[pos], tokens)


@pytest.mark.parametrize("t,k,h", [(1, 8, 7168), (32, 8, 7168), (256, 8, 7168), (5, 1, 320), (9, 4, 320)])
@pytest.mark.parametrize("with_add", [False, True])
def test_moe_combine(t, k, h, with_add):
    ops = _ops("moe_combine")
    gen = torch.Generator().manual_seed(t + k + h)
    ys = torch.randn(t * k + 3, h, generator=gen).to(torch.bfloat16).cuda()
    pos = torch.randperm(t * k, generator=gen).view(t, k).cuda()
    weights = torch.rand(t, k, generator=gen).cuda()
    add = torch.randn(t, h, generator=gen).to(torch.bfloat16).cuda() if with_add else None
    out = ops.moe_combine(ys, pos, weights, add)
    ref = moe_combine_ref(ys, pos, weights, add)
    exact = moe_combine_ref(ys.double(), pos, weights.double(), None if add is None else add.double())
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(out.double(), exact, rtol=2**-7, atol=1e-2)  # one bf16 rounding


def test_quant_rows_and_head_view():
    _ops("quant_fp8_act")
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(50, 7168, generator=gen) * 3).to(torch.bfloat16).cuda()
    rows = torch.randint(0, 50, (400,), generator=gen).cuda()
    q, s = quant_fp8_act(x, rows)
    rq, rs = quant_fp8_act_ref(x[rows].cpu())  # on the CPU: torch on CUDA divides through a reciprocal
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s.cpu(), rs)
    # ids out of range read zero rows
    rows[::7], rows[3::7] = -1, 50
    q, s = quant_fp8_act(x, rows)
    padded = torch.cat([x.cpu(), torch.zeros(1, 7168, dtype=torch.bfloat16)])
    rq, rs = quant_fp8_act_ref(padded[torch.where((rows >= 0) & (rows < 50), rows, 50).cpu()])
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s.cpu(), rs)
    # attention's per-head output [H, B, v] read as [B, H * v] through a transposed view
    o = (torch.randn(128, 32, 128, generator=gen)).to(torch.bfloat16).cuda()
    q, s = quant_fp8_act(o.transpose(0, 1))
    rq, rs = quant_fp8_act_ref(o.transpose(0, 1).reshape(32, -1).cpu())
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s.cpu(), rs)
    # heads of 384 channels: tiles of 1024 channels straddle them
    o = (torch.randn(5, 37, 384, generator=gen)).to(torch.bfloat16).cuda()
    q, s = quant_fp8_act(o.transpose(0, 1))
    rq, rs = quant_fp8_act_ref(o.transpose(0, 1).reshape(37, -1).cpu())
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s.cpu(), rs)


@pytest.mark.parametrize("rank,rope", [(512, 64), (160, 32)])
def test_kv_norm_rope_append(rank, rope):
    ops = _ops("kv_norm_rope_append")
    gen = torch.Generator().manual_seed(rank)
    t, pages, page = 37, 8, 16
    wide = torch.randn(t, 1536 + rank + rope, generator=gen).to(torch.bfloat16).cuda()
    kv = wide[:, 1536:]  # a column slice of the fused q/kv projection output, as the model passes it
    weight = (1 + 0.1 * torch.randn(rank, generator=gen)).to(torch.bfloat16).cuda()
    angles = torch.rand(t, rope // 2, generator=gen).cuda() * 100
    cos, sin = angles.cos(), angles.sin()
    out_loc = torch.randperm(pages * page, generator=gen)[:t].cuda()
    out_loc[5] = -1  # a padded row: skipped
    cache = torch.full((pages, page, rank + rope), float("nan"), dtype=torch.bfloat16, device="cuda")
    ref = cache.clone()
    ops.kv_norm_rope_append(cache, out_loc, kv, weight, 1e-6, cos, sin)
    c_kv, k_pe = kv.split([rank, rope], dim=-1)
    kv_append_paged_ref(ref, out_loc, rms_norm(c_kv.float(), weight.float(), 1e-6),
                        apply_rope(k_pe.unsqueeze(-2), cos, sin).squeeze(-2))
    flat, rflat = cache.view(-1, rank + rope), ref.view(-1, rank + rope)
    written = out_loc[out_loc >= 0]
    assert torch.equal(flat[written, rank:].view(torch.int16), rflat[written, rank:].view(torch.int16))
    torch.testing.assert_close(flat[written, :rank].float(), rflat[written, :rank].float(), rtol=2**-7, atol=1e-3)
    untouched = torch.ones(pages * page, dtype=torch.bool, device="cuda")
    untouched[written] = False
    assert bool(flat[untouched].isnan().all()), "a slot outside out_loc was written"


@pytest.mark.parametrize("b,h,rank,rope", [(32, 128, 512, 64), (3, 4, 160, 32)])
def test_mla_decode_q_exact(b, h, rank, rope):
    _ops("mla_decode_q")
    gen = torch.Generator().manual_seed(b * h)
    q_lat = torch.randn(h, b, rank, generator=gen).to(torch.bfloat16).cuda()
    q = torch.randn(b, h, 128 + rope, generator=gen).to(torch.bfloat16).cuda()
    q_pe = q[..., 128:]  # the rope part of q_b_proj's output, a strided view
    angles = torch.rand(b, rope // 2, generator=gen).cuda() * 100
    out = mla_decode_q(q_lat, q_pe, angles.cos(), angles.sin())
    ref = torch.cat([q_lat.transpose(0, 1), apply_rope(q_pe, angles.cos(), angles.sin())], dim=-1)
    assert out.shape == (b, h, rank + rope)
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("rows,h", [(1, 7168), (32, 7168), (37, 1536), (5, 320), (0, 7168)])
def test_rms_norm_and_add_rms_norm(rows, h):
    ops = _ops("add_rms_norm")
    gen = torch.Generator().manual_seed(rows + h)
    x = (torch.randn(rows, h, generator=gen) * 2).to(torch.bfloat16).cuda()
    r = torch.randn(rows, h, generator=gen).to(torch.bfloat16).cuda()
    w = (1 + 0.1 * torch.randn(h, generator=gen)).to(torch.bfloat16).cuda()

    def ref(v):  # the fp32 formula of the CPU path, one rounding
        vf = v.float()
        return (vf * torch.rsqrt(vf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).to(torch.bfloat16)

    out, s = ops.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, x + r)  # the sum rounded as torch's bf16 add rounds it
    torch.testing.assert_close(out.float(), ref(x + r).float(), rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6).float(), ref(x).float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("rows,h,row_stride", [(1, 7168, 7168), (32, 7168, 7168), (37, 1536, 2112), (9, 384, 384),
                                               (0, 7168, 7168)])
def test_norm_quant_bit_exact_with_two_kernels(rows, h, row_stride):
    """rms_norm_quant / add_rms_norm_quant against rms_norm / add_rms_norm then quant_fp8_act: h = 384
    leaves half-warps past the row; the 1536-wide rows are a column slice, as q_a is of qkv_a's output."""
    ops = _ops("add_rms_norm_quant")
    gen = torch.Generator().manual_seed(rows + h)
    x = (torch.randn(rows, row_stride, generator=gen) * 3).to(torch.bfloat16).cuda()[:, :h]
    r = torch.randn(rows, h, generator=gen).to(torch.bfloat16).cuda()
    w = (1 + 0.1 * torch.randn(h, generator=gen)).to(torch.bfloat16).cuda()

    def same(a, b):
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    out, q, sc = ops.rms_norm_quant(x, w, 1e-6)
    ref = ops.rms_norm(x, w, 1e-6)
    rq, rs = quant_fp8_act(ref)
    assert torch.equal(out, ref) and same(q, rq) and torch.equal(sc, rs)
    out, summed, q, sc = ops.add_rms_norm_quant(x, r, w, 1e-6)
    ref, ref_sum = ops.add_rms_norm(x, r, w, 1e-6)
    rq, rs = quant_fp8_act(ref)
    assert torch.equal(out, ref) and torch.equal(summed, ref_sum) and same(q, rq) and torch.equal(sc, rs)
    assert q.shape == (rows, h) and sc.shape == (rows, h // 128)


def test_norm_quant_rejects_partial_groups():
    ops = _ops("rms_norm_quant")
    x = torch.randn(4, 320, device="cuda").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 128"):
        ops.rms_norm_quant(x, torch.ones(320, device="cuda", dtype=torch.bfloat16), 1e-6)



def _kv_b_views(h, gen):
    """W_UK `[H, 128, 512]` and W_UV `[H, 128, 512]` as the model takes them: views of kv_b_proj's
    weight `[H, 256, 512]` (nope rows, then v rows), scaled as a trained layer's are."""
    w = (torch.randn(h, 256, 512, generator=gen) * 0.05).to(torch.bfloat16).cuda()
    return w[:, :128], w[:, 128:]


def _close_to_fp32(got, want):
    """One bf16 rounding of an fp32-accumulated sum: within 2^-8 relative, plus a floor for sums
    that cancel."""
    err = (got.float() - want).abs()
    assert bool((err <= want.abs() * 2**-8 + 1e-3).all()), float(err.max())


@pytest.mark.parametrize("b,h", [(1, 128), (32, 128), (33, 16), (100, 3), (256, 2), (0, 4)])
def test_mla_absorb_q(b, h):
    """The latent part against fp32 products of the same bf16 operands; the rope part bit-exact
    against apply_rope (q_nope and q_pe strided views of q_b_proj's output, as in the model)."""
    from nmoe.serve.ops.attention import mla_absorb_q

    _ops("mla_absorb_q")
    gen = torch.Generator().manual_seed(b * 7 + h)
    w_uk, _ = _kv_b_views(h, gen)
    q = torch.randn(b, h, 192, generator=gen).to(torch.bfloat16).cuda()
    q_nope, q_pe = q[..., :128], q[..., 128:]
    angles = torch.rand(b, 32, generator=gen).cuda() * 100
    out = mla_absorb_q(q_nope, w_uk, q_pe, angles.cos(), angles.sin())
    assert out.shape == (b, h, 576)
    want = torch.einsum("bhd,hdr->bhr", q_nope.float(), w_uk.float())
    _close_to_fp32(out[..., :512], want)
    rope = apply_rope(q_pe, angles.cos(), angles.sin())
    assert torch.equal(out[..., 512:].view(torch.int16), rope.view(torch.int16))


@pytest.mark.parametrize("b,h", [(1, 128), (32, 128), (33, 16), (100, 3), (256, 2), (0, 4)])
def test_mla_absorb_out_and_its_quantization(b, h):
    """BF16 output against fp32 products; the quantized output bit-identical to quant_fp8_act of
    the BF16 one (each head one 128-channel group), so both o_proj inputs agree exactly."""
    from nmoe.serve.ops.attention import mla_absorb_out

    _ops("mla_absorb_out")
    gen = torch.Generator().manual_seed(b * 5 + h)
    _, w_uv = _kv_b_views(h, gen)
    o_lat = torch.randn(b, h, 512, generator=gen).to(torch.bfloat16).cuda()
    out = mla_absorb_out(o_lat, w_uv)
    assert out.shape == (b, h, 128)
    _close_to_fp32(out, torch.einsum("bhr,hvr->bhv", o_lat.float(), w_uv.float()))
    xq, xs = mla_absorb_out(o_lat, w_uv, quantize=True)
    rq, rs = quant_fp8_act(out)
    assert xq.shape == (b, h * 128) and xs.shape == (b, h)
    assert torch.equal(xq.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(xs, rs)


def test_mla_absorb_rejects_bad_operands():
    ops = _ops("mla_absorb_out")
    gen = torch.Generator().manual_seed(1)
    w_uk, w_uv = _kv_b_views(4, gen)
    o_lat = torch.randn(3, 4, 512, generator=gen).to(torch.bfloat16).cuda()
    with pytest.raises(RuntimeError, match="o_lat must be"):
        ops.mla_absorb_out(o_lat[..., :256], w_uv, False)
    with pytest.raises(RuntimeError, match="w_uv must be"):
        ops.mla_absorb_out(o_lat, w_uv[:2], False)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.mla_absorb_out(o_lat.float(), w_uv, False)
    q = torch.randn(3, 4, 192, generator=gen).to(torch.bfloat16).cuda()
    cs = torch.rand(3, 32, generator=gen).cuda()
    with pytest.raises(RuntimeError, match="q_nope must be"):
        ops.mla_absorb_q(q[..., :64], w_uk, q[..., 128:], cs, cs)
    with pytest.raises(RuntimeError, match="cos must be"):
        ops.mla_absorb_q(q[..., :128], w_uk, q[..., 128:], cs[:, :16].contiguous(), cs)
