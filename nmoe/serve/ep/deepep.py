"""The DeepEP transport: DeepEP's NVLink/RDMA dispatch and combine kernels (package `deep_ep`).

Same contract as `Transport.moe`, same lockstep bookkeeping (`begin_forward`, `drain`). DeepEP
numbers experts contiguously by rank, so ids are mapped to "slots" `owner * E_local + local` first,
which makes striped placement work unchanged. Layouts:
  * normal: `Buffer.dispatch` hands each rank its unique tokens `[R, H]` with their local expert
    ids `[R, k]` (-1: not here) and weights; the rank sums its experts' weighted outputs per token
    and `Buffer.combine` sums those over ranks;
  * low latency (`NMOE_DEEPEP_LOW_LATENCY=1` or `auto`, when every rank's T fits the capacity):
    `low_latency_dispatch` fills `[E_local, N * C, H]` with per-expert counts (the masked layout),
    `low_latency_combine` weights and sums at the source. DeepEP supports it for some hidden sizes
    only (DeepSeek-V3's 7168 among them).
Every rank agrees on the layout through one all-reduce (MAX) of T on the tensor group.
`dispatch` / `combine` as separate steps are the base class's all-to-all ones.

Not run in this repository's CI (no `deep_ep` there); `test_moe_deepep_vs_localmask` with
NMOE_EP_TRANSPORT=deepep on GPUs is its check.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nmoe.serve.ep.transport import Dispatched, GroupComm, Transport, run_experts
from nmoe.serve.side_stream import resolved


def import_deep_ep():
    try:
        import deep_ep
    except ImportError as e:
        raise RuntimeError(
            "NMOE_EP_TRANSPORT=deepep needs the `deep_ep` package (DeepEP, github.com/deepseek-ai/DeepEP), "
            f"which does not import here: {e}. Install it, or use NMOE_EP_TRANSPORT=a2a."
        ) from e
    return deep_ep


def sum_topk(y: torch.Tensor, t: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Slot rows `[t * k, H]` (slot t * k + j is token t's j-th expert) -> `[t, H]`: summed over j
    in fp32, in j order. A plain reduction, not atomics, so it is deterministic on the GPU too."""
    return y.view(t, k, y.shape[-1]).float().sum(1).to(dtype)


class DeepEPTransport(Transport):
    name = "deepep"

    def __init__(self, ctx, n_experts: int, *, placement: str, max_tokens_per_rank: int, low_latency: str):
        self.deep_ep = import_deep_ep()
        if not str(ctx.device).startswith("cuda"):
            raise RuntimeError("NMOE_EP_TRANSPORT=deepep runs on CUDA devices only; use a2a on CPU")
        super().__init__(GroupComm(ctx.tensor_group, ctx.rank, ctx.world_size), n_experts, placement,
                         max_tokens_per_rank, low_latency)
        self.group = ctx.tensor_group
        self.slot = (self.owner * self.n_local + self.local).to(ctx.device)  # global id -> DeepEP expert
        self._buffer = None
        self._buffer_ll: bool | None = None

    def _buf(self, hidden: int, dtype: torch.dtype, low_latency: bool):
        """DeepEP's communication buffer, (re)made for the layout in use."""
        if self._buffer is not None and self._buffer_ll == low_latency:
            return self._buffer
        b = self.deep_ep.Buffer
        n = self.world_size
        if low_latency:
            rdma = b.get_low_latency_rdma_size_hint(self.max_tokens_per_rank, hidden, n, self.n_experts)
            self._buffer = b(self.group, 0, rdma, low_latency_mode=True, num_qps_per_rank=self.n_local)
        else:
            hidden_bytes = hidden * torch.tensor([], dtype=dtype).element_size()
            nvl = b.get_dispatch_config(n).get_nvl_buffer_size_hint(hidden_bytes, n)
            nvl = max(nvl, b.get_combine_config(n).get_nvl_buffer_size_hint(hidden_bytes, n))
            self._buffer = b(self.group, nvl, 0)
        self._buffer_ll = low_latency
        return self._buffer

    def _use_low_latency(self, t: int, device) -> bool:
        if self.low_latency == "0":
            return False
        max_t = torch.tensor([t], dtype=torch.long, device=device)
        dist.all_reduce(max_t, op=dist.ReduceOp.MAX, group=self.group)
        return int(max_t) <= self.max_tokens_per_rank

    def moe(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts,
            add: torch.Tensor | None = None) -> torch.Tensor:
        topk = self.slot[ids].long()
        ll = self._use_low_latency(x.shape[0], x.device)
        buf = self._buf(x.shape[-1], x.dtype, ll)
        failure = None
        if ll:
            recv, counts, handle, _, _ = buf.low_latency_dispatch(
                x, topk, self.max_tokens_per_rank, self.n_experts, use_fp8=False)
            try:
                out = run_experts(experts, Dispatched(recv, None, counts, True, None))
            except Exception as e:
                failure, out = e, torch.zeros_like(recv)
            y, _, _ = buf.low_latency_combine(out, topk, weights.float(), handle)
        else:
            per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk, self.n_experts)
            recv, recv_ids, recv_w, _, handle, _ = buf.dispatch(
                x, topk_idx=topk, topk_weights=weights.float(), num_tokens_per_rank=per_rank,
                num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
            try:
                out = self._local_sum(experts, recv, recv_ids, recv_w)
            except Exception as e:
                failure, out = e, torch.zeros_like(recv)
            y, _, _ = buf.combine(out, handle)
        self.calls += 1
        if failure is not None:
            raise failure
        return y if add is None else y + resolved(add)

    @staticmethod
    def _local_sum(experts, recv: torch.Tensor, recv_ids: torch.Tensor, recv_w: torch.Tensor) -> torch.Tensor:
        """Per received token, the weighted sum of its local experts' outputs `[R, H]`."""
        tok, kk = (recv_ids >= 0).nonzero(as_tuple=True)
        y = experts(recv[tok], recv_ids[tok, kk].long(), recv_w[tok, kk])
        r, k = recv_ids.shape
        slots = y.new_zeros(r * k, recv.shape[-1])
        slots[tok * k + kk] = y
        return sum_topk(slots, r, k, recv.dtype)
