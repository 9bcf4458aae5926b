"""FP8 e4m3 block quantization (DeepSeek-V3's format) and the FP8 GEMM, as torch references.

Weights: `[N, K]` e4m3 with `scale_inv` `[ceil(N/128), ceil(K/128)]` fp32 (partial edge blocks).
Activations: per token per 128 channels, e4m3 with fp32 scales `[M, ceil(K/128)]`.
In both, `real = fp8 * scale`.
"""

from __future__ import annotations

import torch

from nmoe.serve.ops._ext import use_cuda

BLOCK = 128
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dequant_block_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """`[N, K]` e4m3 weight times its 128x128 block scales -> fp32 `[N, K]`."""
    n, k = w.shape
    want = (_cdiv(n, block), _cdiv(k, block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(w.shape)}: want {want}")
    s = scale_inv.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return w.float() * s


def quant_block_fp8(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32/bf16 `[N, K]` -> (e4m3 `[N, K]`, scale_inv `[ceil(N/128), ceil(K/128)]`), amax per block."""
    n, k = w.shape
    nb, kb = _cdiv(n, block), _cdiv(k, block)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, block, kb, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(nb * block, kb * block)[:n, :k].contiguous(), scale


def quant_fp8_act_ref(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """`[M, K]` -> (e4m3 `[M, K]`, fp32 scales `[M, ceil(K/128)]`), amax per token per 128 channels."""
    m, k = x.shape
    kb = _cdiv(k, block)
    padded = torch.zeros(m, kb * block, dtype=torch.float32, device=x.device)
    padded[:, :k] = x.float()
    g = padded.view(m, kb, block)
    scale = g.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    q = (g / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(m, kb * block)[:, :k].contiguous(), scale


def quant_fp8_act(x: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quant_fp8_act_ref` of `x [M, K]` - or of a `[M, heads, head]` view read as `[M, heads * head]`
    (the per-head attention output, any strides) - restricted to `x[rows]` when `rows` is given
    (the MoE's tokens in expert order). On CUDA one kernel reads the view and the rows in place."""
    if use_cuda(x) and (x.dim() == 2 or x.shape[-1] % BLOCK == 0):  # the kernel checks the rest
        return torch.ops.nmoe.quant_fp8_act(x, rows)
    x2 = x.flatten(1)
    return quant_fp8_act_ref(x2 if rows is None else x2[rows])


def dequant_act_fp8(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    m, k = q.shape
    return q.float() * scale.float().repeat_interleave(block, 1)[:, :k]


def fp8_gemm_ref(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """`[M, K]` e4m3 act (1x128 scales) x `[N, K]` e4m3 weight (128x128 scales) -> bf16 `[M, N]`, fp32 accumulate."""
    return (dequant_act_fp8(xq, xs) @ dequant_block_fp8(w, ws).t()).to(torch.bfloat16)


def fp8_gemm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    if use_cuda(xq, w):
        return torch.ops.nmoe.fp8_gemm(xq, xs, w, ws)
    return fp8_gemm_ref(xq, xs, w, ws)
