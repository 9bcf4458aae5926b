"""Absorbed MLA decode over the paged latent cache (torch reference).

Query per head is `[kv_lora_rank + rope_dim]`: the nope part already multiplied by W_UK (absorbed),
the rope part rotated. Keys and values are the cached latents; the output is in latent space
(`[H, kv_lora_rank]`), to be multiplied by W_UV by the caller.
"""

from __future__ import annotations

import torch

from nmoe.serve.ops._ext import use_cuda
from nmoe.serve.ops.fp8 import quant_fp8_act
from nmoe.serve.ops.rope import apply_rope

ABSORB_NOPE, ABSORB_V, ABSORB_RANK = 128, 128, 512  # the widths of the fused absorption kernels (V3's)


def _absorb_kernel(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.bfloat16 for t in tensors) and use_cuda(*tensors)


def mla_absorb_q(q_nope: torch.Tensor, w_uk: torch.Tensor, q_pe: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
    """The absorbed decode query `[B, H, R + D]` from q_nope `[B, H, nope]` (W_UK `[H, nope, R]`
    folded in per head) and the unrotated q_pe `[B, H, D]`. One kernel on CUDA at DeepSeek-V3's
    widths (the batched GEMM, the rotation and the assembly); else a batched matmul and
    `mla_decode_q`."""
    if (_absorb_kernel(q_nope, w_uk, q_pe) and cos.dtype == sin.dtype == torch.float32
            and q_nope.shape[-1] == ABSORB_NOPE and w_uk.shape[-1] % 128 == 0):
        return torch.ops.nmoe.mla_absorb_q(q_nope, w_uk, q_pe, cos.contiguous(), sin.contiguous())
    return mla_decode_q(torch.bmm(q_nope.transpose(0, 1), w_uk), q_pe, cos, sin)


def mla_absorb_out(o_lat: torch.Tensor, w_uv: torch.Tensor, quantize: bool = False):
    """Per-head outputs `[B, H, v]` = o_lat `[B, H, R]` times W_UV `[H, v, R]` transposed; with
    `quantize` their `quant_fp8_act` (e4m3 `[B, H * v]`, scales `[B, H]`) for the o_proj GEMM. One
    kernel on CUDA at DeepSeek-V3's widths (bit-identical to quantizing its BF16 output)."""
    if _absorb_kernel(o_lat, w_uv) and o_lat.shape[-1] == ABSORB_RANK and w_uv.shape[1] == ABSORB_V:
        first, second = torch.ops.nmoe.mla_absorb_out(o_lat, w_uv, quantize)
        return (first, second) if quantize else first
    o = torch.bmm(o_lat.transpose(0, 1).to(w_uv.dtype), w_uv.transpose(1, 2)).transpose(0, 1)
    return quant_fp8_act(o) if quantize else o


def mla_decode_q(q_lat: torch.Tensor, q_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The absorbed decode query `[B, H, R + D]`: the latent query `q_lat [H, B, R]` (q_nope through
    W_UK) next to the rope query `q_pe [B, H, D]` rotated by cos/sin `[B, D/2]`. One kernel on CUDA."""
    fused = q_lat.dtype == q_pe.dtype == torch.bfloat16 and cos.dtype == sin.dtype == torch.float32
    if fused and use_cuda(q_lat, q_pe, cos, sin) and q_lat.shape[-1] % 8 == 0:
        return torch.ops.nmoe.mla_decode_q(q_lat, q_pe, cos.contiguous(), sin.contiguous())
    return torch.cat([q_lat.transpose(0, 1), apply_rope(q_pe, cos, sin)], dim=-1)


def mla_decode_paged_ref(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    kv_lora_rank: int,
    static: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[B, H, R + D]`, cache `[P, page, R + D]`, block_table `[B, max_pages]`, seq_lens `[B]`
    -> (out `[B, H, R]` in q's dtype, lse `[B, H]` fp32). A sequence of length 0 gives zeros and -inf.

    `static`: attend over the block table's whole width instead of reading the longest length on
    the host, so the op can be captured in a CUDA graph (the same result, more work)."""
    b, h, _ = q.shape
    page = cache.shape[1]
    if static:
        longest = block_table.shape[1] * page
    else:
        longest = int(seq_lens.max()) if b else 0
    if longest == 0 or b == 0:
        out = torch.zeros(b, h, kv_lora_rank, dtype=q.dtype, device=q.device)
        return out, torch.full((b, h), float("-inf"), dtype=torch.float32, device=q.device)
    n_pages = -(-longest // page)
    # every sequence's context padded to the longest: [B, n_pages * page, R + D]
    table = block_table[:, :n_pages].long()
    used = torch.arange(n_pages, device=q.device)[None, :] * page < seq_lens[:, None]
    table = torch.where(used, table, torch.zeros_like(table))  # padded entries may hold any id
    valid = torch.arange(n_pages * page, device=q.device)[None, :] < seq_lens[:, None]
    # slots past a sequence's length may hold anything (NaN included): zero them before both einsums
    kv = cache[table].reshape(b, n_pages * page, -1).float().masked_fill(~valid[:, :, None], 0.0)
    scores = torch.einsum("bhd,bkd->bhk", q.float(), kv) * softmax_scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows of length 0 are all -inf
    out = torch.einsum("bhk,bkr->bhr", probs, kv[..., :kv_lora_rank])
    return out.to(q.dtype), lse


def mla_decode_paged(q, cache, block_table, seq_lens, softmax_scale, kv_lora_rank, static: bool = False):
    """The kernel where it applies (it never reads lengths on the host), else the reference;
    `static` as in `mla_decode_paged_ref`."""
    # the kernel is built for DeepSeek-V3's latent width (512 + 64) and a BF16 cache
    kernel_shape = kv_lora_rank == 512 and q.shape[-1] == 576
    if use_cuda(q, cache, block_table, seq_lens) and kernel_shape and q.dtype == cache.dtype == torch.bfloat16:
        return torch.ops.nmoe.mla_decode_paged(q, cache, block_table, seq_lens, float(softmax_scale))
    return mla_decode_paged_ref(q, cache, block_table, seq_lens, softmax_scale, kv_lora_rank, static)
