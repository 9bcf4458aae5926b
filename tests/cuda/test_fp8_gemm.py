"""FP8 ops of nmoe._C (quant, SwiGLU-quant, dense and grouped block-scaled GEMMs) against their torch references.

CPU tests of the references always run. CUDA tests need a GPU and the built extension; they use the
DeepSeek-V3 shapes, odd M, experts with zero tokens, imbalanced loads (0.7-1.3x), and poison the
memory the outputs will be allocated from. Error metric (DeepGEMM's): `1 - 2*sum(x*y)/sum(x^2+y^2)`
in float64 against an fp32 matmul of the dequantized operands, below DIFF_MAX.
"""

from __future__ import annotations

import pytest
import torch

from nmoe.serve.ops import moe_gemm
from nmoe.serve.ops._ext import cuda_ops_available
from nmoe.serve.ops.fp8 import (
    FP8,
    dequant_act_fp8,
    dequant_block_fp8,
    fp8_gemm,
    fp8_gemm_ref,
    quant_block_fp8,
    quant_fp8_act,
    quant_fp8_act_ref,
)

DIFF_MAX = 1e-3  # FP8 operands, fp32 accumulation, bf16 output
V3_SHAPES = [
    (4096, 7168),
    (7168, 2048),
    (2112, 7168),
    (24576, 1536),
    (7168, 16384),
    (576, 7168),
    (1536, 7168),
]

cuda = pytest.mark.skipif(not cuda_ops_available(), reason="needs a CUDA GPU and the nmoe._C extension")


def _gemm_configs() -> list[str]:
    """Names of the GEMM kernel configurations compiled into nmoe._C (none without the extension)."""
    if not cuda_ops_available():
        return []
    count = torch.ops.nmoe._fp8_gemm_override(-1, -1)
    return [torch.ops.nmoe._fp8_gemm_config(i) for i in range(count)]


GEMM_CONFIGS = _gemm_configs()


class forced_gemm_config:
    """Within the block every GEMM call uses configuration `name` (the automatic choice is skipped)."""

    def __init__(self, name: str):
        self.index = GEMM_CONFIGS.index(name)

    def __enter__(self):
        torch.ops.nmoe._fp8_gemm_override(self.index, -1)

    def __exit__(self, *exc):
        torch.ops.nmoe._fp8_gemm_override(-1, -1)


def diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return 0.0 if denom == 0 else float(1 - 2 * (x * y).sum() / denom)


def rand_act(m: int, k: int, device: str, gen: torch.Generator) -> torch.Tensor:
    """bf16 activations with per-row and per-channel magnitudes spread over a few decades."""
    x = torch.randn(m, k, generator=gen, device=device)
    row = torch.exp(torch.randn(m, 1, generator=gen, device=device))
    col = torch.exp(0.5 * torch.randn(1, k, generator=gen, device=device))
    return (x * row * col).to(torch.bfloat16)


def rand_weights(
    e: int, n: int, k: int, device: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`e` experts of e4m3 `[n, k]` weights with 128x128 block scales, stacked."""
    qs, ss = [], []
    for _ in range(e):
        w = torch.randn(n, k, generator=gen, device=device) * 0.02
        w *= torch.exp(0.5 * torch.randn(n // 64 + 1, 1, generator=gen, device=device)).repeat_interleave(
            64, 0
        )[:n]
        q, s = quant_block_fp8(w)
        qs.append(q)
        ss.append(s)
    return torch.stack(qs), torch.stack(ss)


def imbalanced_counts(e: int, mean: int, gen: torch.Generator, zeros: int = 2) -> list[int]:
    """Tokens per expert: mean * U(0.7, 1.3), with `zeros` experts receiving none."""
    c = (mean * (0.7 + 0.6 * torch.rand(e, generator=gen))).round().long()
    c[torch.randperm(e, generator=gen)[:zeros]] = 0
    return c.tolist()


def poison_allocator(numel: int, dtype: torch.dtype = torch.bfloat16) -> None:
    """Leaves a freed NaN block of this size in the caching allocator, which the next output reuses."""
    torch.full((numel,), float("nan"), dtype=dtype, device="cuda")


# ---------------------------------------------------------------- CPU: the references


def test_quant_act_round_trip_cpu():
    gen = torch.Generator().manual_seed(0)
    x = rand_act(37, 320, "cpu", gen)  # a partial last 128-channel group
    q, s = quant_fp8_act_ref(x)
    assert q.dtype == FP8 and q.shape == (37, 320) and s.shape == (37, 3)
    back = dequant_act_fp8(q, s)
    assert diff(back, x.float()) < 1e-3
    assert (back - x.float()).abs().max() <= s.repeat_interleave(128, 1)[:, :320].max() * 16


def test_silu_mul_quant_ref_cpu():
    gen = torch.Generator().manual_seed(1)
    x = rand_act(2 * 5, 2 * 256, "cpu", gen).view(2, 5, 512)
    q, s = moe_gemm.silu_mul_quant_fp8_ref(x)
    assert q.shape == (2, 5, 256) and s.shape == (2, 5, 2)
    gate, up = x.float().chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = dequant_act_fp8(q.reshape(10, 256), s.reshape(10, 2)).view(2, 5, 256)
    assert diff(got, want) < 1e-3


def _grouped_case(e, n, k, counts, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    m = sum(counts)
    xq, xs = quant_fp8_act_ref(rand_act(m, k, device, gen))
    w, ws = rand_weights(e, n, k, device, gen)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return xq, xs, w, ws, offsets


def to_masked(xq, xs, counts, max_m):
    """Scatters contiguous rows into the [E, max_m, ...] layout; unused rows hold garbage (NaN scales)."""
    e = len(counts)
    mq = torch.zeros(e, max_m, xq.shape[1], dtype=torch.uint8, device=xq.device).view(FP8)
    ms = torch.full((e, max_m, xs.shape[1]), float("nan"), device=xs.device)
    row = 0
    for g, c in enumerate(counts):
        mq[g, :c], ms[g, :c] = xq[row : row + c], xs[row : row + c]
        row += c
    return mq, ms


def test_grouped_contiguous_ref_is_expert_loop_cpu():
    counts = [3, 0, 5, 1]
    xq, xs, w, ws, offsets = _grouped_case(4, 64, 256, counts, "cpu", 2)
    out = moe_gemm.grouped_fp8_gemm_contiguous(xq, xs, w, ws, offsets)  # CPU tensors: the reference
    row = 0
    for g, c in enumerate(counts):
        torch.testing.assert_close(
            out[row : row + c], fp8_gemm_ref(xq[row : row + c], xs[row : row + c], w[g], ws[g])
        )
        row += c


def test_grouped_masked_ref_matches_contiguous_cpu():
    counts = [3, 0, 5, 1]
    xq, xs, w, ws, offsets = _grouped_case(4, 64, 256, counts, "cpu", 3)
    want = moe_gemm.grouped_fp8_gemm_contiguous_ref(xq, xs, w, ws, offsets)
    mq, ms = to_masked(xq, xs, counts, 6)
    got = moe_gemm.grouped_fp8_gemm_masked(mq, ms, w, ws, torch.tensor(counts, dtype=torch.int32))
    row = 0
    for g, c in enumerate(counts):
        torch.testing.assert_close(got[g, :c], want[row : row + c])
        row += c


def test_refs_reject_mismatched_shapes_cpu():
    xq, xs, w, ws, offsets = _grouped_case(2, 64, 256, [1, 2], "cpu", 4)
    with pytest.raises(ValueError, match="offsets"):
        moe_gemm.grouped_fp8_gemm_contiguous_ref(xq, xs, w, ws, offsets[:-1])
    with pytest.raises(ValueError, match="even"):
        moe_gemm.silu_mul_quant_fp8_ref(torch.zeros(2, 3, dtype=torch.bfloat16))


# ---------------------------------------------------------------- CUDA: kernels vs references


@cuda
@pytest.mark.parametrize(
    "m,k", [(1, 7168), (37, 2048), (513, 320), (4096, 7168), (0, 128), (9, 136), (300, 1536)]
)
def test_quant_fp8_act_cuda(m, k):
    """Bit-exact against the CPU path (torch on CUDA divides by a scalar through its reciprocal)."""
    gen = torch.Generator(device="cuda").manual_seed(m + k)
    x = rand_act(m, k, "cuda", gen)
    poison_allocator(m * k // 2 + 1)
    q, s = quant_fp8_act(x)
    rq, rs = quant_fp8_act_ref(x.cpu())
    assert q.dtype == FP8 and q.shape == (m, k) and s.shape == rs.shape
    assert torch.equal(s.cpu(), rs)
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))


@cuda
def test_quant_fp8_act_row_strided():
    gen = torch.Generator(device="cuda").manual_seed(5)
    wide = rand_act(9, 1024, "cuda", gen)
    q, s = quant_fp8_act(wide[:, :512])  # a row-strided view is read in place
    rq, rs = quant_fp8_act_ref(wide[:, :512].cpu())
    assert torch.equal(s.cpu(), rs) and torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))


@cuda
def test_quant_fp8_act_every_bf16_value():
    """Every finite bf16 value, in groups of similar magnitude (so every scale range is hit) and
    shuffled (huge and tiny values in one group), signed zeros included: bit-exact with the CPU path."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    vals = bits.view(torch.bfloat16)
    vals = vals[torch.isfinite(vals.float())]
    by_magnitude = vals[vals.float().abs().argsort(stable=True)].view(-1, 128)
    gen = torch.Generator().manual_seed(17)
    shuffled = vals[torch.randperm(vals.numel(), generator=gen)].view(-1, 128)
    x = torch.cat([by_magnitude, shuffled]).reshape(-1, 512)
    q, s = quant_fp8_act(x.cuda())
    rq, rs = quant_fp8_act_ref(x)
    assert torch.equal(s.cpu(), rs)
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))


@cuda
def test_quant_fp8_act_rejections():
    wide = torch.zeros(9, 1024, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="x must have unit stride"):
        quant_fp8_act(wide.t())
    with pytest.raises(RuntimeError, match="BFloat16"):
        quant_fp8_act(wide.float())
    with pytest.raises(RuntimeError, match="multiple of 8"):
        quant_fp8_act(wide[:, :100].contiguous())


@cuda
@pytest.mark.parametrize("shape", [(37, 2 * 2048), (4, 9, 2 * 256), (0, 256), (8192, 2 * 2048), (9, 2 * 136)])
def test_silu_mul_quant_fp8_cuda(shape):
    gen = torch.Generator(device="cuda").manual_seed(sum(shape))
    rows = 1
    for d in shape[:-1]:
        rows *= d
    x = rand_act(rows, shape[-1], "cuda", gen).view(shape)
    q, s = moe_gemm.silu_mul_quant_fp8(x)
    rq, rs = moe_gemm.silu_mul_quant_fp8_ref(x)
    assert q.shape == rq.shape and s.shape == rs.shape and q.dtype == FP8
    if rows:
        i = shape[-1] // 2
        got = dequant_act_fp8(q.reshape(rows, i), s.reshape(rows, -1))
        ref = dequant_act_fp8(rq.reshape(rows, i), rs.reshape(rows, -1))
        torch.testing.assert_close(s, rs, rtol=1e-5, atol=0)
        assert diff(got, ref) < 1e-5
        gate, up = x.reshape(rows, -1).float().chunk(2, dim=-1)
        assert diff(got, torch.nn.functional.silu(gate) * up) < 1e-3


@cuda
@pytest.mark.parametrize("n,k", V3_SHAPES)
@pytest.mark.parametrize("m", [1, 37, 300])
def test_fp8_gemm_v3_shapes(m, n, k):
    gen = torch.Generator(device="cuda").manual_seed(m * 7 + n + k)
    xq, xs = quant_fp8_act(rand_act(m, k, "cuda", gen))
    w, ws = rand_weights(1, n, k, "cuda", gen)
    poison_allocator(m * n)
    out = fp8_gemm(xq, xs, w[0], ws[0])
    want = dequant_act_fp8(xq, xs) @ dequant_block_fp8(w[0], ws[0]).t()
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert diff(out, want) < DIFF_MAX


@cuda
@pytest.mark.parametrize("n,k", [(24576, 1536), (2112, 7168), (7168, 2048)])
def test_fp8_gemm_forced_split_k(n, k):
    """The dense decode kernel with every K-slice count that divides k / 128 forced (the benchmark's
    sweep), at decode rows: each within DIFF_MAX of the fp32 reference; a count that does not divide
    is ignored, and an override for another shape leaves this one alone."""
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    xq, xs = quant_fp8_act(rand_act(32, k, "cuda", gen))
    w, ws = rand_weights(1, n, k, "cuda", gen)
    want = dequant_act_fp8(xq, xs) @ dequant_block_fp8(w[0], ws[0]).t()
    auto = fp8_gemm(xq, xs, w[0], ws[0])
    assert diff(auto, want) < DIFF_MAX
    kb = k // 128
    ops = torch.ops.nmoe
    try:
        assert ops._fp8_split_k_override(n + 128, k, 2) == 1
        assert torch.equal(fp8_gemm(xq, xs, w[0], ws[0]), auto)
        for splits in [d for d in range(1, kb + 1) if kb % d == 0]:
            ops._fp8_split_k_override(n, k, splits)
            poison_allocator(splits * 32 * n)
            out = fp8_gemm(xq, xs, w[0], ws[0])
            assert torch.isfinite(out).all(), splits
            assert diff(out, want) < DIFF_MAX, splits
        ops._fp8_split_k_override(n, k, 5)  # divides none of these k / 128
        assert torch.equal(fp8_gemm(xq, xs, w[0], ws[0]), auto)
    finally:
        assert ops._fp8_split_k_override(0, 0, 0) == 0


@cuda
@pytest.mark.parametrize("n,k,m_small,m", [(7168, 16384, 5, 32), (2112, 7168, 1, 29), (4096, 7168, 33, 64)])
def test_dense_decode_gemm_is_deterministic_and_batch_invariant(n, k, m_small, m):
    """The dense decode kernel's slices are summed in slice order by one kernel: the same call twice
    is bitwise equal, and a row's output does not depend on how many other rows share its token tile
    (a CUDA-graph bucket padded to m and an eager step of m_small rows agree)."""
    gen = torch.Generator(device="cuda").manual_seed(n + m)
    xq, xs = quant_fp8_act(rand_act(m, k, "cuda", gen))
    w, ws = rand_weights(1, n, k, "cuda", gen)
    full = fp8_gemm(xq, xs, w[0], ws[0])
    assert torch.equal(fp8_gemm(xq, xs, w[0], ws[0]), full)
    part = fp8_gemm(xq[:m_small].contiguous(), xs[:m_small].contiguous(), w[0], ws[0])
    assert torch.equal(part, full[:m_small])
    assert diff(full, dequant_act_fp8(xq, xs) @ dequant_block_fp8(w[0], ws[0]).t()) < DIFF_MAX


@cuda
def test_fp8_gemm_partial_k_block():
    gen = torch.Generator(device="cuda").manual_seed(11)
    xq, xs = quant_fp8_act(rand_act(45, 320, "cuda", gen))  # k = 2.5 blocks
    w, ws = rand_weights(1, 136, 320, "cuda", gen)  # n = 1 block + 8 rows
    out = fp8_gemm(xq, xs, w[0], ws[0])
    assert diff(out, fp8_gemm_ref(xq, xs, w[0], ws[0])) < DIFF_MAX


@cuda
def test_fp8_gemm_rejections():
    gen = torch.Generator(device="cuda").manual_seed(11)
    xq, xs = quant_fp8_act(rand_act(45, 320, "cuda", gen))
    w, ws = rand_weights(1, 136, 320, "cuda", gen)
    with pytest.raises(RuntimeError, match="ws must have shape"):
        fp8_gemm(xq, xs, w[0], ws[0][:, :2])
    with pytest.raises(RuntimeError, match="w must be contiguous"):
        fp8_gemm(xq, xs, w[0].t().contiguous().t(), ws[0])
    with pytest.raises(RuntimeError, match="xs must be Float"):
        fp8_gemm(xq, xs.double(), w[0], ws[0])


@cuda
@pytest.mark.parametrize("n,k", [(4096, 7168), (7168, 2048)])
def test_grouped_contiguous_prefill(n, k):
    e = 32
    counts = imbalanced_counts(e, 256, torch.Generator().manual_seed(n), zeros=3)
    xq, xs, w, ws, offsets = _grouped_case(e, n, k, counts, "cuda", n + k)
    poison_allocator(sum(counts) * n)
    out = moe_gemm.grouped_fp8_gemm_contiguous(xq, xs, w, ws, offsets)
    assert torch.isfinite(out).all()
    want = moe_gemm.grouped_fp8_gemm_contiguous_ref(xq, xs, w, ws, offsets)
    row = 0
    for g, c in enumerate(counts):
        if c:
            assert diff(out[row : row + c], want[row : row + c]) < DIFF_MAX, f"expert {g} ({c} rows)"
        row += c


@cuda
def test_grouped_contiguous_odd_rows_and_padding():
    """Odd per-expert rows, zero-token experts, a padded tail past offsets[E], n = 576 (a partial block)."""
    counts = [1, 0, 129, 7, 0, 255]
    xq, xs, w, ws, offsets = _grouped_case(len(counts), 576, 512, counts, "cuda", 12)
    xq, xs = torch.cat([xq, xq[:5]]), torch.cat([xs, xs[:5]])
    poison_allocator(xq.shape[0] * 576)
    out = moe_gemm.grouped_fp8_gemm_contiguous(xq, xs, w, ws, offsets)
    want = moe_gemm.grouped_fp8_gemm_contiguous_ref(xq, xs, w, ws, offsets)
    m = sum(counts)
    assert torch.isfinite(out[:m]).all()
    assert diff(out[:m], want[:m]) < DIFF_MAX


@cuda
@pytest.mark.parametrize("n,k", [(4096, 7168), (7168, 2048)])
@pytest.mark.parametrize("max_m", [8, 64])
def test_grouped_masked_decode(n, k, max_m):
    e = 32
    gen = torch.Generator().manual_seed(max_m + n)
    counts = torch.randint(0, max_m + 1, (e,), generator=gen)
    counts[0], counts[1], counts[2] = 0, max_m, 1
    counts = counts.tolist()
    xq, xs, w, ws, _ = _grouped_case(e, n, k, counts, "cuda", max_m + k)
    mq, ms = to_masked(xq, xs, counts, max_m)
    cnt = torch.tensor(counts, dtype=torch.int32, device="cuda")
    poison_allocator(e * max_m * n)
    out = moe_gemm.grouped_fp8_gemm_masked(mq, ms, w, ws, cnt)
    assert out.shape == (e, max_m, n)
    want = moe_gemm.grouped_fp8_gemm_masked_ref(mq, ms, w, ws, cnt)
    for g, c in enumerate(counts):
        if c:
            assert torch.isfinite(out[g, :c]).all(), f"expert {g}"
            assert diff(out[g, :c], want[g, :c]) < DIFF_MAX, f"expert {g} ({c} rows)"


@cuda
@pytest.mark.parametrize("config", GEMM_CONFIGS or ["none"])
def test_masked_equals_contiguous_kernel(config):
    """One kernel configuration on the two layouts of the same rows: bitwise equal."""
    counts = [5, 0, 64, 17]
    xq, xs, w, ws, offsets = _grouped_case(4, 2048, 1024, counts, "cuda", 13)
    mq, ms = to_masked(xq, xs, counts, 64)
    with forced_gemm_config(config):
        contiguous = moe_gemm.grouped_fp8_gemm_contiguous(xq, xs, w, ws, offsets)
        masked = moe_gemm.grouped_fp8_gemm_masked(
            mq, ms, w, ws, torch.tensor(counts, dtype=torch.int32, device="cuda")
        )
    row = 0
    for g, c in enumerate(counts):
        torch.testing.assert_close(masked[g, :c], contiguous[row : row + c], rtol=0, atol=0)
        row += c


@cuda
@pytest.mark.parametrize("config", GEMM_CONFIGS or ["none"])
def test_every_gemm_config(config):
    """Each compiled configuration, whichever shapes the automatic choice gives it: contiguous rows
    with odd and empty groups and a padded tail, masked rows with NaN scales past the counts, a
    dense call with partial n and k blocks."""
    counts = [1, 0, 129, 7, 0, 255, 64, 65]
    xq, xs, w, ws, offsets = _grouped_case(len(counts), 576, 512, counts, "cuda", 21)
    m = sum(counts)
    xq_pad, xs_pad = torch.cat([xq, xq[:5]]), torch.cat([xs, xs[:5]])
    mcounts = [0, 40, 1, 17, 33, 8]
    mxq, mxs, mw, mws, _ = _grouped_case(len(mcounts), 1024, 2048, mcounts, "cuda", 22)
    mq, ms = to_masked(mxq, mxs, mcounts, 40)
    cnt = torch.tensor(mcounts, dtype=torch.int32, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(23)
    dq, ds = quant_fp8_act(rand_act(45, 320, "cuda", gen))
    dw, dws = rand_weights(1, 136, 320, "cuda", gen)
    with forced_gemm_config(config):
        poison_allocator(xq_pad.shape[0] * 576)
        out = moe_gemm.grouped_fp8_gemm_contiguous(xq_pad, xs_pad, w, ws, offsets)
        poison_allocator(len(mcounts) * 40 * 1024)
        mout = moe_gemm.grouped_fp8_gemm_masked(mq, ms, mw, mws, cnt)
        dout = fp8_gemm(dq, ds, dw[0], dws[0])
    want = moe_gemm.grouped_fp8_gemm_contiguous_ref(xq_pad, xs_pad, w, ws, offsets)
    assert torch.isfinite(out[:m]).all()
    row = 0
    for g, c in enumerate(counts):
        if c:
            assert diff(out[row : row + c], want[row : row + c]) < DIFF_MAX, (
                f"contiguous expert {g} ({c} rows)"
            )
        row += c
    mwant = moe_gemm.grouped_fp8_gemm_masked_ref(mq, ms, mw, mws, cnt)
    for g, c in enumerate(mcounts):
        if c:
            assert torch.isfinite(mout[g, :c]).all(), f"masked expert {g}"
            assert diff(mout[g, :c], mwant[g, :c]) < DIFF_MAX, f"masked expert {g} ({c} rows)"
    assert diff(dout, fp8_gemm_ref(dq, ds, dw[0], dws[0])) < DIFF_MAX


@cuda
def test_grouped_masked_cuda_graph_replay():
    """Captured once; new counts written in place take effect on replay (no host read of counts)."""
    e, max_m, n, k = 8, 32, 1024, 2048
    counts = [32, 0, 3, 17, 1, 32, 0, 9]
    xq, xs, w, ws, _ = _grouped_case(e, n, k, counts, "cuda", 14)
    mq, ms = to_masked(xq, xs, counts, max_m)
    ms = torch.nan_to_num(ms, nan=1.0)
    cnt = torch.tensor(counts, dtype=torch.int32, device="cuda")
    moe_gemm.grouped_fp8_gemm_masked(mq, ms, w, ws, cnt)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_gemm.grouped_fp8_gemm_masked(mq, ms, w, ws, cnt)
    new_counts = [1, 32, 0, 5, 32, 2, 7, 0]
    cnt.copy_(torch.tensor(new_counts, dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    want = moe_gemm.grouped_fp8_gemm_masked_ref(mq, ms, w, ws, cnt)
    for g, c in enumerate(new_counts):
        if c:
            assert diff(out[g, :c], want[g, :c]) < DIFF_MAX, f"expert {g}"


@cuda
def test_grouped_rejections():
    xq, xs, w, ws, offsets = _grouped_case(2, 256, 256, [3, 4], "cuda", 15)
    with pytest.raises(RuntimeError, match="offsets must have shape"):
        moe_gemm.grouped_fp8_gemm_contiguous(xq, xs, w, ws, offsets[:2])
    with pytest.raises(RuntimeError, match="offsets must be Int"):
        moe_gemm.grouped_fp8_gemm_contiguous(xq, xs, w, ws, offsets.long())
    with pytest.raises(RuntimeError, match="xq must be contiguous"):
        moe_gemm.grouped_fp8_gemm_contiguous(xq.t().contiguous().t(), xs, w, ws, offsets)
    with pytest.raises(RuntimeError, match="experts"):
        mq, ms = to_masked(xq, xs, [3, 4], 4)
        moe_gemm.grouped_fp8_gemm_masked(
            mq, ms, w[:1], ws[:1], torch.zeros(1, dtype=torch.int32, device="cuda")
        )


@cuda
def test_expert_mlp_chain_masked():
    """gate+up GEMM -> SwiGLU-quant -> down GEMM, all on the masked layout, vs the same chain of references."""
    e, max_m, hidden, inter = 4, 16, 1024, 512
    counts = [16, 3, 0, 9]
    gen = torch.Generator(device="cuda").manual_seed(16)
    x = rand_act(e * max_m, hidden, "cuda", gen)
    xq, xs = quant_fp8_act(x)
    xq, xs = xq.view(e, max_m, hidden), xs.view(e, max_m, -1)
    w13, s13 = rand_weights(e, 2 * inter, hidden, "cuda", gen)
    w2, s2 = rand_weights(e, hidden, inter, "cuda", gen)
    cnt = torch.tensor(counts, dtype=torch.int32, device="cuda")
    h = moe_gemm.grouped_fp8_gemm_masked(xq, xs, w13, s13, cnt)
    hq, hs = moe_gemm.silu_mul_quant_fp8(h)
    y = moe_gemm.grouped_fp8_gemm_masked(hq, hs, w2, s2, cnt)
    rh = moe_gemm.grouped_fp8_gemm_masked_ref(xq, xs, w13, s13, cnt)
    rq, rs = moe_gemm.silu_mul_quant_fp8_ref(rh)
    ry = moe_gemm.grouped_fp8_gemm_masked_ref(rq, rs, w2, s2, cnt)
    for g, c in enumerate(counts):
        if c:
            assert diff(y[g, :c], ry[g, :c]) < 2 * DIFF_MAX, f"expert {g}"
