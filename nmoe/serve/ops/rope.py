"""Rotary embedding of DeepSeek's release: interleaved pairs (x0, x1), (x2, x3), ..."""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[..., T, heads, D]` or `[T, heads, D]`; cos/sin `[T, D/2]` broadcast over heads. Computed in
    fp32 (every product and sum rounded, as the CUDA kernels that fuse it do), returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    return out.to(x.dtype)
