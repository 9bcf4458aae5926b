"""The paged MLA latent cache: one tensor per layer `[num_pages, page_size, kv_lora_rank + rope_dim]`.

A token's slot is `page * page_size + offset`; `out_loc[i]` is the slot of the i-th new token.
"""

from __future__ import annotations

import torch

from nmoe.serve.ops._ext import use_cuda
from nmoe.serve.ops.norm import rms_norm
from nmoe.serve.ops.rope import apply_rope


def kv_append_paged_ref(cache: torch.Tensor, out_loc: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
    """Write normalized latents `[T, R]` and rotated rope keys `[T, D]` into their slots. A slot
    outside the cache (a padded row's -1) is skipped, as the kernel does."""
    flat = cache.view(-1, cache.shape[-1])
    r = c_kv.shape[-1]
    inside = (out_loc >= 0) & (out_loc < flat.shape[0])
    if not bool(inside.all()):
        out_loc, c_kv, k_pe = out_loc[inside], c_kv[inside], k_pe[inside]
    flat[out_loc, :r] = c_kv.to(cache.dtype)
    flat[out_loc, r:] = k_pe.to(cache.dtype)


def kv_append_paged(cache, out_loc, c_kv, k_pe) -> None:
    if use_cuda(cache, out_loc, c_kv, k_pe):
        torch.ops.nmoe.kv_append_paged(cache, out_loc, c_kv.contiguous(), k_pe.contiguous())
    else:
        kv_append_paged_ref(cache, out_loc, c_kv, k_pe)


def kv_norm_rope_append(cache, out_loc, kv, weight, eps: float, cos, sin) -> None:
    """MLA's latent path into the cache: kv `[T, R + D]` (kv_a_proj's output) -> RMSNorm(kv[:, :R])
    with `weight [R]` and kv[:, R:] rotated by cos/sin `[T, D/2]`, written to slots `out_loc`.
    On CUDA (BF16 cache) one kernel; it rounds as `rms_norm` and `apply_rope` do."""
    r = weight.shape[0]
    fused = cache.dtype == kv.dtype == weight.dtype == torch.bfloat16 and cos.dtype == sin.dtype == torch.float32
    if fused and use_cuda(cache, out_loc, kv, weight) and r % 8 == 0 and r <= 1024 and kv.shape[-1] - r <= 128:
        torch.ops.nmoe.kv_norm_rope_append(cache, out_loc, kv, weight, float(eps), cos.contiguous(), sin.contiguous())
        return
    c_kv, k_pe = kv.split([r, kv.shape[-1] - r], dim=-1)
    k_pe = apply_rope(k_pe.unsqueeze(-2), cos, sin).squeeze(-2)
    kv_append_paged(cache, out_loc, rms_norm(c_kv, weight, eps), k_pe)


def kv_copy_pages_ref(cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole pages `src[i] -> dst[i]` (prefix-cache copy-on-write)."""
    cache[dst] = cache[src]


def kv_copy_pages(cache, src, dst) -> None:
    if use_cuda(cache, src, dst):
        torch.ops.nmoe.kv_copy_pages(cache, src, dst)
    else:
        kv_copy_pages_ref(cache, src, dst)


def gather_context(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence, `[length, R + D]`."""
    page_size = cache.shape[1]
    n_pages = -(-length // page_size)
    return cache[block_table_row[:n_pages]].reshape(-1, cache.shape[-1])[:length]
