"""The expert-side FP8 ops of the MoE: grouped GEMMs in the two row layouts and the fused SwiGLU-quant.

Operands use DeepSeek-V3's FP8 format (see `nmoe.serve.ops.fp8`): activations e4m3 with fp32 scales
per token per 128 channels, expert weights `[E, N, K]` e4m3 with scale_inv `[E, ceil(N/128),
ceil(K/128)]`; `real = fp8 * scale`; fp32 accumulation, BF16 output.

Two layouts of the expert rows:
- contiguous (prefill): tokens sorted by expert, `xq [M, K]`; rows `offsets[e]:offsets[e+1]` use
  expert `e`. Rows outside `offsets[0]:offsets[E]` are don't-care (the reference leaves them 0).
- masked (decode, the DeepEP low-latency layout): `xq [E, max_m, K]`, the first `counts[e]` rows of
  expert `e` are real; the others are don't-care. The CUDA op reads `counts` on the device only, so
  it can be captured in a CUDA graph.

Each op has a `*_ref` torch implementation (fp32 math on dequantized operands), which is the CPU
path, and a dispatcher that runs the `nmoe._C` kernel for CUDA tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nmoe.serve.ops._ext import use_cuda
from nmoe.serve.ops.fp8 import fp8_gemm_ref, quant_fp8_act_ref


def _check_grouped(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> None:
    if w.dim() != 3 or ws.dim() != 3 or ws.shape[0] != w.shape[0]:
        raise ValueError(
            f"w [E, N, K] and ws [E, Nb, Kb] expected, got {tuple(w.shape)} and {tuple(ws.shape)}"
        )
    if xq.shape[-1] != w.shape[-1] or xs.shape[:-1] != xq.shape[:-1]:
        raise ValueError(f"xq {tuple(xq.shape)} / xs {tuple(xs.shape)} do not match w {tuple(w.shape)}")


def grouped_fp8_gemm_contiguous_ref(
    xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """`xq [M, K]`, `xs [M, Kb]`, `w [E, N, K]`, `ws [E, Nb, Kb]`, `offsets [E+1]` -> bf16 `[M, N]`."""
    _check_grouped(xq, xs, w, ws)
    e, n, _ = w.shape
    if offsets.shape != (e + 1,):
        raise ValueError(f"offsets must have shape ({e + 1},), got {tuple(offsets.shape)}")
    m = xq.shape[0]
    out = torch.zeros(m, n, dtype=torch.bfloat16, device=xq.device)
    bounds = offsets.clamp(0, m).tolist()
    for g in range(e):
        lo, hi = bounds[g], max(bounds[g], bounds[g + 1])
        if hi > lo:
            out[lo:hi] = fp8_gemm_ref(xq[lo:hi], xs[lo:hi], w[g], ws[g])
    return out


def grouped_fp8_gemm_masked_ref(
    xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """`xq [E, max_m, K]`, `xs [E, max_m, Kb]`, `w [E, N, K]`, `ws`, `counts [E]` -> bf16 `[E, max_m, N]`."""
    _check_grouped(xq, xs, w, ws)
    e, n, _ = w.shape
    if xq.dim() != 3 or xq.shape[0] != e or counts.shape != (e,):
        raise ValueError(
            f"xq [{e}, max_m, K] and counts [{e}] expected, got {tuple(xq.shape)}, {tuple(counts.shape)}"
        )
    max_m = xq.shape[1]
    out = torch.zeros(e, max_m, n, dtype=torch.bfloat16, device=xq.device)
    for g, c in enumerate(counts.clamp(0, max_m).tolist()):
        if c > 0:
            out[g, :c] = fp8_gemm_ref(xq[g, :c], xs[g, :c], w[g], ws[g])
    return out


def silu_mul_quant_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 `[..., 2I]` -> (e4m3 `[..., I]`, fp32 `[..., ceil(I/128)]`) of `silu(x[..., :I]) * x[..., I:]`."""
    if x.shape[-1] % 2:
        raise ValueError(f"the last dim of x must be even ([gate | up]), got shape {tuple(x.shape)}")
    gate, up = x.float().chunk(2, dim=-1)
    h = F.silu(gate) * up
    q, s = quant_fp8_act_ref(h.reshape(-1, h.shape[-1]))
    return q.view(*h.shape), s.view(*h.shape[:-1], s.shape[-1])


def grouped_fp8_gemm_contiguous(
    xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    if use_cuda(xq, w, offsets):
        return torch.ops.nmoe.grouped_fp8_gemm_contiguous(xq, xs, w, ws, offsets)
    return grouped_fp8_gemm_contiguous_ref(xq, xs, w, ws, offsets)


def grouped_fp8_gemm_masked(
    xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    if use_cuda(xq, w, counts):
        return torch.ops.nmoe.grouped_fp8_gemm_masked(xq, xs, w, ws, counts)
    return grouped_fp8_gemm_masked_ref(xq, xs, w, ws, counts)


def silu_mul_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_cuda(x):
        return torch.ops.nmoe.silu_mul_quant_fp8(x)
    return silu_mul_quant_fp8_ref(x)
