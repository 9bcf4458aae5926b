"""RMSNorm, alone or fused with the residual add before it, and either with its output's FP8
quantization (the `_quant` forms, for the FP8 projection that reads it): `nmoe._C`'s kernel on
CUDA for BF16 rows, torch's fused kernel for other CUDA shapes, else the fp32 formula."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nmoe.serve.ops._ext import use_cuda
from nmoe.serve.ops.fp8 import BLOCK, quant_fp8_act

MAX_KERNEL_HIDDEN = 16384  # csrc/norm/params.h kMaxHidden: a row held in one block's registers


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x * rsqrt(mean(x^2) + eps) * weight` over the last dim, in fp32, returned in x's dtype."""
    if _kernel_applies(x, weight):
        return torch.ops.nmoe.rms_norm(x, weight, float(eps))
    if x.is_cuda and x.dtype == weight.dtype:  # torch's fused kernel: one launch, not six
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dim() == 2 and x.dtype == weight.dtype == torch.bfloat16 and x.shape[-1] % 8 == 0
            and x.shape[-1] <= MAX_KERNEL_HIDDEN and use_cuda(x, weight))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm: (`rms_norm(x + residual)`, `x + residual`), the sum
    rounded to x's dtype before the norm reads it. One kernel on CUDA (BF16 rows)."""
    if _kernel_applies(x, weight) and residual.shape == x.shape and residual.dtype == x.dtype:
        return torch.ops.nmoe.add_rms_norm(x, residual, weight, float(eps))
    s = x + residual
    return rms_norm(s, weight, eps), s


def _quant_kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return _kernel_applies(x, weight) and x.shape[-1] % BLOCK == 0


def rms_norm_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(`out`, *`quant_fp8_act(out)`) for `out = rms_norm(x, weight, eps)`, x `[T, h]`: one kernel on
    CUDA (BF16 rows, h % 128 == 0), bit for bit the two ops'."""
    if _quant_kernel_applies(x, weight):
        return torch.ops.nmoe.rms_norm_quant(x, weight, float(eps))
    out = rms_norm(x, weight, eps)
    return out, *quant_fp8_act(out)


def add_rms_norm_quant(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(`out`, `sum`, *`quant_fp8_act(out)`) for `(out, sum) = add_rms_norm(x, residual, weight, eps)`."""
    if _quant_kernel_applies(x, weight) and residual.shape == x.shape and residual.dtype == x.dtype:
        return torch.ops.nmoe.add_rms_norm_quant(x, residual, weight, float(eps))
    out, s = add_rms_norm(x, residual, weight, eps)
    return out, s, *quant_fp8_act(out)
