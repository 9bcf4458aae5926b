"""The DeepSeek-V3 router (noaux_tc): sigmoid scores, bias for the choice, group-limited top-k.

Ties are broken towards the lower index (groups and experts alike) so every implementation agrees.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from nmoe.serve.ops._ext import use_cuda

# The fused gate + router's limits (csrc/router/params.h: kMaxFusedExperts, kGateChunk; it takes up to
# kMaxFusedTokens = 128 tokens).
FUSED_MAX_EXPERTS = 256
_FUSED_HIDDEN_MULTIPLE = 32
# Where the fused op is taken: up to 32 tokens it is as fast as or faster than cuBLAS + moe_route (9.5
# vs 9.7 us at 32 on the H200; benchmarks/bench_router.py), beyond it slower (12.1 vs 9.9 at 64).
FUSED_PREFERRED_TOKENS = 32


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


def _route_args(kw: dict) -> tuple:
    """moe_route_ref's keywords in the order of the CUDA ops' trailing arguments."""
    return (kw["n_group"], kw["topk_group"], kw["top_k"], kw["norm_topk_prob"], float(kw["routed_scaling_factor"]))


def moe_route(logits, bias, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    if use_cuda(logits, bias):
        return torch.ops.nmoe.moe_route(logits.float().contiguous(), bias.float().contiguous(), *_route_args(kw))
    return moe_route_ref(logits, bias, **kw)


@functools.cache
def _mm_out_dtype_available() -> bool:
    """torch.mm(..., out_dtype=torch.float32) for BF16 inputs (torch >= 2.8)."""
    return "dtype" in torch.ops.aten.mm.overloads()


def gate_logits(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """Router logits fp32 `[T, E]` = x `[T, hidden]` @ gate_weight `[E, hidden]`^T."""
    if x.is_cuda and x.dtype == gate_weight.dtype == torch.bfloat16 and _mm_out_dtype_available():
        # BF16 x BF16 products are exact in fp32: the fp32 logits on tensor cores, fp32 accumulate
        # (a SIMT fp32 GEMM of 32 x 7168 x 256 took 14 us of a decode layer, this one about 7)
        return torch.mm(x, gate_weight.t(), out_dtype=torch.float32)
    return F.linear(x.float(), gate_weight.float())


def _fused_gate_applies(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether moe_gate_route takes the fused op: a batch of at most FUSED_PREFERRED_TOKENS that
    torch.ops.nmoe.moe_gate_route accepts (its interface checks the same)."""
    if x.dim() != 2 or gate_weight.dim() != 2:
        return False
    t, hidden = x.shape
    return (
        x.dtype == gate_weight.dtype == torch.bfloat16
        and bias.dtype == torch.float32
        and bias.is_contiguous()
        and t <= FUSED_PREFERRED_TOKENS
        and gate_weight.shape[0] <= FUSED_MAX_EXPERTS
        and hidden % _FUSED_HIDDEN_MULTIPLE == 0
        and hidden > 0
        and x.stride(1) == 1
        and (t <= 1 or x.stride(0) % 8 == 0)
        and x.data_ptr() % 16 == 0
        and gate_weight.is_contiguous()
        and gate_weight.data_ptr() % 16 == 0
    )


def moe_gate_route(x, gate_weight, bias, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[T, hidden]`, gate_weight `[E, hidden]`, bias fp32 `[E]` -> (weights fp32 `[T, k]`, ids int64 `[T, k]`).

    Semantics: `moe_route_ref(x.float() @ gate_weight.float().T, bias, **kw)` (keywords as moe_route_ref's).
    On CUDA, BF16 batches of at most FUSED_PREFERRED_TOKENS tokens and FUSED_MAX_EXPERTS experts take the
    fused op (the gate GEMM in K slices, then the slices' fixed-order sum and the route: two kernels,
    a row's result independent of the rest of the batch); others gate_logits + moe_route.
    """
    if use_cuda(x, gate_weight, bias) and _fused_gate_applies(x, gate_weight, bias):
        return torch.ops.nmoe.moe_gate_route(x, gate_weight, bias, *_route_args(kw))
    return moe_route(gate_logits(x, gate_weight), bias, **kw)
