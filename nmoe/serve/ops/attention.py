"""Absorbed MLA decode over the paged latent cache (torch reference).

Query per head is `[kv_lora_rank + rope_dim]`: the nope part already multiplied by W_UK (absorbed),
the rope part rotated. Keys and values are the cached latents; the output is in latent space
(`[H, kv_lora_rank]`), to be multiplied by W_UV by the caller.
"""

from __future__ import annotations

import torch

from nmoe.serve.ops._ext import use_cuda
from nmoe.serve.ops.kv import gather_context


def mla_decode_paged_ref(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    kv_lora_rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[B, H, R + D]`, cache `[P, page, R + D]`, block_table `[B, max_pages]`, seq_lens `[B]`
    -> (out `[B, H, R]` in q's dtype, lse `[B, H]` fp32). A sequence of length 0 gives zeros and -inf."""
    b, h, _ = q.shape
    out = torch.zeros(b, h, kv_lora_rank, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h), float("-inf"), dtype=torch.float32, device=q.device)
    for i, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        kv = gather_context(cache, block_table[i], n).float()  # [n, R + D]
        scores = (q[i].float() @ kv.t()) * softmax_scale  # [H, n]
        lse[i] = torch.logsumexp(scores, dim=-1)
        out[i] = torch.softmax(scores, dim=-1) @ kv[:, :kv_lora_rank]
    return out.to(q.dtype), lse


def mla_decode_paged(q, cache, block_table, seq_lens, softmax_scale, kv_lora_rank):
    if use_cuda(q, cache, block_table, seq_lens):
        return torch.ops.nmoe.mla_decode_paged(q, cache, block_table, seq_lens, float(softmax_scale))
    return mla_decode_paged_ref(q, cache, block_table, seq_lens, softmax_scale, kv_lora_rank)
