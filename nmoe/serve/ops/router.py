"""The DeepSeek-V3 router (noaux_tc): sigmoid scores, bias for the choice, group-limited top-k.

Ties are broken towards the lower index (groups and experts alike) so every implementation agrees.
"""

from __future__ import annotations

import torch

from nmoe.serve.ops._ext import use_cuda


def _topk_stable(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim; equal values keep index order."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def moe_route_ref(
    logits: torch.Tensor,
    bias: torch.Tensor,
    *,
    n_group: int,
    topk_group: int,
    top_k: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits `[T, E]` (x @ gate.weight^T) and bias `[E]` -> (weights fp32 `[T, k]`, ids int64 `[T, k]`)."""
    t, e = logits.shape
    scores = logits.float().sigmoid()
    choice = scores + bias.float()
    group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)
    groups = _topk_stable(group_scores, topk_group)
    group_mask = torch.zeros(t, n_group, dtype=torch.bool, device=logits.device)
    group_mask.scatter_(1, groups, True)
    expert_mask = group_mask.repeat_interleave(e // n_group, dim=1)
    ids = _topk_stable(choice.masked_fill(~expert_mask, float("-inf")), top_k)
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids


def moe_route(logits, bias, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    if use_cuda(logits, bias):
        w, ids = torch.ops.nmoe.moe_route(
            logits.float().contiguous(), bias.float().contiguous(), kw["n_group"], kw["topk_group"],
            kw["top_k"], kw["norm_topk_prob"], float(kw["routed_scaling_factor"]),
        )
        return w, ids
    return moe_route_ref(logits, bias, **kw)
