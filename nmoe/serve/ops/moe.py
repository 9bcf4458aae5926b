"""The MoE's row bookkeeping around the grouped GEMMs: (token, k) slots sorted by expert and the
weighted combine back into tokens.

    src_rows, pos, offsets = moe_align(local_ids [T, k], E)   # sorted row p holds token src_rows[p];
                                                              # slot (t, j) sits at row pos[t, j];
                                                              # expert e owns rows offsets[e]:offsets[e+1]
    ys = experts on x[src_rows]                               # [T * k, H], in sorted order
    y = moe_combine(ys, pos, weights [T, k], add)             # y[t] = sum_j w[t, j] ys[pos[t, j]] + add[t]

On CUDA each is one kernel (`csrc/moe/`) where a chain of torch ops (argsort, gathers, scatters,
cumsums) launched a dozen: a decode step is made of such launches.
"""

from __future__ import annotations

import torch

from nmoe.serve.ops._ext import use_cuda


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """`pos` with `pos[order[i]] = i`: where each element of a permuted sequence went."""
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    return pos


def moe_align_ref(local_ids: torch.Tensor, experts: int,
                  expert_map: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """local_ids `[T, k]` in [0, experts) -> (src_rows `[T * k]` int64, pos `[T, k]` int64, offsets
    `[experts + 1]` int32). Rows are in slot order within an expert (the kernel's order within an
    expert may differ: a row's result does not depend on its place). With `expert_map` `[n]` the
    ids are global, in [0, n), and slot s goes to local expert `expert_map[local_ids[s]]`."""
    if expert_map is not None:
        local_ids = expert_map[local_ids]
    t, k = local_ids.shape
    flat = local_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    pos = inverse_permutation(order)
    offsets = torch.zeros(experts + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = torch.cumsum(torch.bincount(flat, minlength=experts), 0)
    return order // k, pos.view(t, k), offsets


def moe_align(local_ids: torch.Tensor, experts: int,
              expert_map: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_cuda(local_ids) and local_ids.dtype == torch.long and experts <= 1024 and local_ids.shape[1] <= 1024:
        src_rows, pos, offsets = torch.ops.nmoe.moe_align(local_ids.contiguous(), experts, expert_map)
        return src_rows, pos.view(local_ids.shape), offsets
    return moe_align_ref(local_ids, experts, expert_map)


def moe_combine_ref(ys: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor,
                    add: torch.Tensor | None = None) -> torch.Tensor:
    """ys `[R, H]`, pos `[T, k]`, weights `[T, k]` -> `[T, H]` in ys's dtype: the k rows weighted and
    summed in fp32 over j in order, plus `add` `[T, H]`, rounded once."""
    t, k = pos.shape
    rows = ys[pos.reshape(-1)].view(t, k, ys.shape[-1]).float() * weights.float()[..., None]
    y = rows[:, 0].clone() if k else ys.new_zeros(t, ys.shape[-1], dtype=torch.float32)
    for j in range(1, k):
        y += rows[:, j]
    if add is not None:
        y += add.float()
    return y.to(ys.dtype)


def moe_combine(ys: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor,
                add: torch.Tensor | None = None) -> torch.Tensor:
    kernel = ys.dtype == torch.bfloat16 and (add is None or add.dtype == torch.bfloat16) and ys.shape[-1] % 8 == 0
    if kernel and use_cuda(ys, pos, weights) and pos.shape[1] <= 64:
        return torch.ops.nmoe.moe_combine(ys, pos.contiguous(), weights.float().contiguous(), add)
    return moe_combine_ref(ys, pos, weights, add)
