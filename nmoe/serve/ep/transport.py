"""Dispatch / combine of routed tokens across EP ranks, in two receive layouts.

One MoE call, on every rank, is always the same three exchanges (so ranks with T=0 simply send and
receive empty or all-padding buffers, and nothing can hang on a missing peer):

1. meta   `[N, E_local + 1]` int64, equal splits: how many rows this rank sends to each local expert
          of each destination, plus this rank's T. Everyone now knows every count and the max T.
2. dispatch  rows of x to the experts' ranks, in one of two layouts:
   * normal: variable splits; the receiver gets `[R, H]` rows grouped by source rank, then by local
     expert (`local_ids [R]`): the layout a contiguous grouped GEMM consumes.
   * low latency: fixed capacity C = max_tokens_per_rank; every rank sends `[N, E_local, C, H]`
     (static shape); the receiver packs it into `[E_local, N * C, H]` with `counts [E_local]`: expert
     j's rows are the first counts[j] (source rank order), the layout a masked grouped GEMM
     consumes. Used when the step fits (every rank's T <= C).
3. combine: the experts' (unweighted) outputs travel back the same way; the source rank multiplies
   by the routing weights and sums the k contributions of each token in (token, k) order, exactly
   as `MoE.local_experts` does, so the layouts agree with each other and with the local path.

A transport is shared by every MoE layer of a model (`attach`); it counts the calls of a forward so
that a rank that fails part-way can still enter the calls it owes (`drain`), with T=0 and its real
experts, and its peers finish their step with correct results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from nmoe.serve.dist import RankInfo
from nmoe.serve.ops.moe import inverse_permutation, moe_combine
from nmoe.serve.side_stream import resolved

LOW_LATENCY_MODES = ("0", "1", "auto")


# ------------------------------------------------------------------------------------------------
# Communication: all_to_all_single over a process group, or a copy at world size 1
# ------------------------------------------------------------------------------------------------


class GroupComm:
    """`torch.distributed.all_to_all_single` over `group` (gloo on CPU, NCCL on GPU)."""

    def __init__(self, group, rank: int, world_size: int):
        self.group, self.rank, self.world_size = group, rank, world_size

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits=None, in_splits=None) -> None:
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)


class LocalComm:
    """World size 1: the only peer is this rank."""

    rank, world_size = 0, 1

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits=None, in_splits=None) -> None:
        out.copy_(inp)


# ------------------------------------------------------------------------------------------------
# What a dispatch hands to the experts
# ------------------------------------------------------------------------------------------------


@dataclass
class Dispatched:
    """Rows received for this rank's experts.

    normal:      x `[R, H]`, local_ids `[R]`, counts `[E_local]` (rows per local expert).
    low_latency: x `[E_local, N * C, H]`, local_ids None, counts `[E_local]`: rows [0, counts[j]) of
                 x[j] are valid, the rest zero."""

    x: torch.Tensor
    local_ids: torch.Tensor | None
    counts: torch.Tensor
    low_latency: bool
    plan: _Plan


@dataclass
class _Plan:
    """The sender's bookkeeping for one call: where each (token, k) slot went."""

    tok: torch.Tensor  # [S] token of each slot in send order (S = T * k)
    order: torch.Tensor  # [S] slot index (t * k + j) of each send position
    send_counts: torch.Tensor  # [N, E_local] rows to each destination's local experts
    recv_counts: torch.Tensor | None = None  # [N, E_local] rows from each source to my experts
    pos: torch.Tensor | None = None  # [S] low latency: slot within its (dest, expert) block
    ll_index: tuple[torch.Tensor, torch.Tensor] | None = None  # low latency: see `_ll_pack_index`


def run_experts(experts, d: Dispatched) -> torch.Tensor:
    """Unweighted outputs of `experts` (an `Experts`-like module) in the layout of `d.x`."""
    if not d.low_latency:
        return experts(d.x, d.local_ids, torch.ones(d.x.shape[0], device=d.x.device))
    e_local, m, _ = d.x.shape
    valid = torch.arange(m, device=d.x.device)[None, :] < d.counts[:, None]  # [E_local, M]
    out = torch.zeros_like(d.x)
    rows = d.x[valid]
    local_ids = torch.arange(e_local, device=d.x.device)[:, None].expand(e_local, m)[valid]
    out[valid] = experts(rows, local_ids, torch.ones(rows.shape[0], device=d.x.device))
    return out


# ------------------------------------------------------------------------------------------------
# The transport
# ------------------------------------------------------------------------------------------------


class Transport:
    """Dispatch / combine for one EP group. `moe(x, weights, ids, experts)` is what `MoE` calls."""

    name = "a2a"

    def __init__(self, comm, n_experts: int, placement: str = "contiguous", max_tokens_per_rank: int = 256,
                 low_latency: str = "auto"):
        if low_latency not in LOW_LATENCY_MODES:
            raise ValueError(f"NMOE_DEEPEP_LOW_LATENCY={low_latency!r}: expected one of {', '.join(LOW_LATENCY_MODES)}")
        if max_tokens_per_rank < 1:
            raise ValueError(f"max_tokens_per_rank must be positive, got {max_tokens_per_rank}")
        self.comm = comm
        self.rank, self.world_size = comm.rank, comm.world_size
        self.n_experts, self.placement = n_experts, placement
        self.max_tokens_per_rank = max_tokens_per_rank
        # auto: the all-to-all transports gain nothing from padding to capacity, so only "1" turns it on.
        self.low_latency = low_latency
        owner = torch.empty(n_experts, dtype=torch.long)
        local = torch.empty(n_experts, dtype=torch.long)
        for r in range(self.world_size):
            ids = RankInfo(r, self.world_size, placement).local_experts(n_experts)
            owner[ids] = r
            local[ids] = torch.arange(len(ids))
        self.owner, self.local = owner, local
        self.n_local = n_experts // self.world_size
        self.expert_ids = RankInfo(self.rank, self.world_size, placement).local_experts(n_experts)
        self.layers: list = []  # the Experts of each MoE layer, in call order (filled by `attach`)
        self.hidden_size = 0  # set by `attach`
        self.calls = 0  # MoE calls completed in the current forward

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}/{self.world_size}, experts={self.n_experts}, "
                f"placement={self.placement}, low_latency={self.low_latency}, capacity={self.max_tokens_per_rank})")

    # --- one MoE call ----------------------------------------------------------------------------

    def moe(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts,
            add: torch.Tensor | None = None) -> torch.Tensor:
        """x `[T, H]`, weights `[T, k]` fp32, ids `[T, k]` global expert ids -> routed output `[T, H]`
        (plus `add [T, H]`, summed in the same fp32 pass: the shared experts' output, possibly a
        side stream's `Deferred`, waited for only there).

        Every exchange is entered even when a local part fails; the failure is raised afterwards."""
        failure = None
        try:
            d = self.dispatch(x, ids)
        except _LocalFailure as e:
            failure, d = e.cause, e.dispatched
        try:
            out = run_experts(experts, d)
        except Exception as e:
            failure = failure or e
            out = torch.zeros_like(d.x)
        back = self._combine_exchange(d, out)
        self.calls += 1
        if failure is not None:
            raise failure
        return self._reduce(d.plan, back, weights, add)

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor) -> Dispatched:
        """Send each (token, k) row of x to the rank of expert ids[t, k]."""
        failure = None
        try:
            plan = self._plan(ids)
        except Exception as e:
            failure, plan = e, self._plan(ids[:0])
            x = x[:0]
        plan.recv_counts, max_t = self._exchange_meta(plan, x.shape[0], x.device)
        low_latency = self.low_latency == "1" and max_t <= self.max_tokens_per_rank
        d = self._dispatch_ll(plan, x) if low_latency else self._dispatch_normal(plan, x)
        if failure is not None:
            raise _LocalFailure(failure, d)
        return d

    def combine(self, d: Dispatched, out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Expert outputs in `d`'s layout -> `[T, H]`: sum over k of weights[t, k] * out of (t, k)."""
        back = self._combine_exchange(d, out)
        return self._reduce(d.plan, back, weights)

    # --- the pieces --------------------------------------------------------------------------------

    def _plan(self, ids: torch.Tensor) -> _Plan:
        t, k = ids.shape
        flat = ids.reshape(-1).cpu()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.n_experts):
            raise ValueError(f"expert id out of range [0, {self.n_experts}): {flat.min()}..{flat.max()}")
        key = self.owner[flat] * self.n_local + self.local[flat]  # destination block of each slot
        order = torch.sort(key, stable=True).indices
        send_counts = torch.bincount(key, minlength=self.world_size * self.n_local).view(self.world_size, self.n_local)
        starts = torch.cumsum(send_counts.flatten(), 0) - send_counts.flatten()
        pos = torch.arange(order.numel()) - starts[key[order]]
        dev = ids.device
        return _Plan(tok=(order // k).to(dev), order=order.to(dev), send_counts=send_counts, pos=pos)

    def _exchange_meta(self, plan: _Plan, t: int, device: torch.device) -> tuple[torch.Tensor, int]:
        n = self.world_size
        send = torch.cat([plan.send_counts, torch.full((n, 1), t, dtype=torch.long)], dim=1).to(device)
        recv = torch.empty_like(send)
        self.comm.all_to_all(recv, send)
        recv = recv.cpu()  # the split sizes are needed on the host
        return recv[:, :-1].contiguous(), int(recv[:, -1].max())

    def _dispatch_normal(self, plan: _Plan, x: torch.Tensor) -> Dispatched:
        send_splits = plan.send_counts.sum(1).tolist()
        recv_splits = plan.recv_counts.sum(1).tolist()
        recv = x.new_empty(sum(recv_splits), x.shape[-1])
        self.comm.all_to_all(recv, x[plan.tok].contiguous(), recv_splits, send_splits)
        local_ids = torch.arange(self.n_local).repeat(self.world_size).repeat_interleave(plan.recv_counts.flatten())
        counts = plan.recv_counts.sum(0)
        return Dispatched(recv, local_ids.to(x.device), counts.to(x.device), False, plan)

    def _dispatch_ll(self, plan: _Plan, x: torch.Tensor) -> Dispatched:
        n, e, c, h = self.world_size, self.n_local, self.max_tokens_per_rank, x.shape[-1]
        dev = x.device
        send = x.new_zeros(n * e * c, h)
        send[self._ll_send_index(plan).to(dev)] = x[plan.tok]
        recv = torch.empty_like(send)
        self.comm.all_to_all(recv, send)
        plan.ll_index = self._ll_pack_index(plan)
        src_slot, packed_slot = plan.ll_index
        packed = x.new_zeros(e * n * c, h)
        packed[packed_slot.to(dev)] = recv[src_slot.to(dev)]
        counts = plan.recv_counts.sum(0)
        return Dispatched(packed.view(e, n * c, h), None, counts.to(dev), True, plan)

    def _ll_send_index(self, plan: _Plan) -> torch.Tensor:
        """Flat index into the send buffer `[N, E_local, C]` of each send position."""
        blocks = torch.repeat_interleave(torch.arange(self.world_size * self.n_local), plan.send_counts.flatten())
        return blocks * self.max_tokens_per_rank + plan.pos

    def _ll_pack_index(self, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid rows of the receive buffer `[N(src), E_local, C]` and their places in `[E_local, N * C]`."""
        n, e, c = self.world_size, self.n_local, self.max_tokens_per_rank
        rc = plan.recv_counts  # [N, E]
        p = torch.arange(c)
        valid = p[None, None, :] < rc[:, :, None]  # [N, E, C]
        start = torch.cumsum(rc, 0) - rc  # rows of expert j from sources before s
        src_slot = valid.flatten().nonzero(as_tuple=True)[0]
        s, j, q = src_slot // (e * c), (src_slot // c) % e, src_slot % c
        packed_slot = j * (n * c) + start[s, j] + q
        return src_slot, packed_slot

    def _combine_exchange(self, d: Dispatched, out: torch.Tensor) -> torch.Tensor:
        """Expert outputs back to their source ranks -> `[S, H]` in send order."""
        plan = d.plan
        h = out.shape[-1]
        if not d.low_latency:
            send_splits = plan.recv_counts.sum(1).tolist()
            recv_splits = plan.send_counts.sum(1).tolist()
            back = out.new_empty(sum(recv_splits), h)
            self.comm.all_to_all(back, out.contiguous(), recv_splits, send_splits)
            return back
        n, e, c = self.world_size, self.n_local, self.max_tokens_per_rank
        src_slot, packed_slot = plan.ll_index
        send = out.new_zeros(n * e * c, h)
        send[src_slot.to(out.device)] = out.reshape(-1, h)[packed_slot.to(out.device)]
        recv = torch.empty_like(send)
        self.comm.all_to_all(recv, send)
        return recv[self._ll_send_index(plan).to(out.device)]

    def _reduce(self, plan: _Plan, back: torch.Tensor, weights: torch.Tensor,
                add: torch.Tensor | None = None) -> torch.Tensor:
        """y[t] = sum_k weights[t, k] * out(t, k) (+ add[t]): the combine of `MoE.local_experts`."""
        pos = inverse_permutation(plan.order)  # back's row of each slot
        return moe_combine(back, pos.view(weights.shape), weights, resolved(add))

    # --- forward bookkeeping (lockstep) ------------------------------------------------------------

    def begin_forward(self) -> None:
        self.calls = 0

    def drain(self) -> int:
        """Enter the MoE calls this forward still owes (T=0, real experts); returns how many."""
        owed = len(self.layers) - self.calls
        if owed <= 0:
            return 0
        for experts in self.layers[self.calls:]:
            p = next(experts.parameters())
            # FP8 expert weights: the activations they see are BF16
            x = torch.zeros(0, self.hidden_size, dtype=torch.bfloat16 if p.element_size() == 1 else p.dtype,
                            device=p.device)
            done = self.calls
            try:
                self.moe(x, x.new_zeros(0, 1), torch.zeros(0, 1, dtype=torch.long, device=p.device), experts)
            except Exception:
                if self.calls == done:  # an exchange itself failed: the group is unusable
                    raise
                # else a local part failed after the call's exchanges; the forward's error stands
        return owed


class _LocalFailure(Exception):
    """A dispatch whose local part failed after its exchanges completed (with T=0)."""

    def __init__(self, cause: BaseException, dispatched: Dispatched):
        super().__init__(str(cause))
        self.cause, self.dispatched = cause, dispatched
