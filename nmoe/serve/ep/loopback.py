"""One rank's share of an N-rank deployment on one device: the loopback transport.

`--simulate-world-size N --simulate-rank r` runs rank r alone: it holds its E/N experts of every
layer and its DP share of the sequences. In the real deployment its experts receive, besides its own
rows for them, what the other N-1 ranks route to them; each of those ranks has its own sequences with
the same routing statistics. The loopback stands in for them with this rank's own (token, k) slots:

* a slot routed to one of this rank's experts goes there, as in the deployment;
* a slot routed to another rank's expert g (which this rank cannot compute) goes to the local
  expert with g's local index (g's place among its own rank's experts).

So local expert j computes the slots routed to the N experts of local index j, one on each rank:
about `T * k / (E / N)` rows, a sum of N independent contributions as in the deployment, where j
receives the rows of N ranks' tokens. Under balanced routing (DeepSeek-V3's bias keeps it so) the
per-expert row counts then have the deployment's statistics, idle experts included: at the seed's
decode point (T = 32, k = 8, 32 local experts) an expert is idle with probability about e^-8, as
deployed. (An earlier rule gave remote slots out in proportion to the rank's own per-expert counts,
about N * c_j each; with c_j about Poisson(1) at decode that left about 37% of the experts idle and
the step read only about 63% of the expert weights: an optimistic decode step.)

The rank computes `T * k` expert rows as its deployed self would, and no computed row is thrown
away: each slot's output is combined into its token with the slot's routing weight, so the local
tokens get an output of the right shape and scale (the remote experts' contributions replaced by
local experts': the cost is real, the values are a stand-in). Everything runs on the device without
a host read (CUDA-graph friendly). At N = 1 every slot is local and the call is exactly
`MoE.local_experts`.
"""

from __future__ import annotations

import torch

from nmoe.serve.ep.transport import Transport


class _NoComm:
    """The loopback's peers do not exist: nothing is exchanged."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def all_to_all(self, *args, **kwargs) -> None:
        raise RuntimeError("the loopback transport has no peers to exchange with")


class LoopbackTransport(Transport):
    """Rank `rank` of `world_size`, alone; attach with `ep.attach(model, transport)`."""

    name = "loopback"
    graph_safe = True  # device-only: a decode forward through it can be captured in a CUDA graph

    def __init__(self, world_size: int, rank: int, n_experts: int, placement: str = "contiguous"):
        if not 0 <= rank < world_size:
            raise ValueError(f"simulated rank {rank} is outside [0, {world_size})")
        if n_experts % world_size:
            raise ValueError(f"simulated world size {world_size} does not divide n_routed_experts {n_experts}")
        super().__init__(_NoComm(rank, world_size), n_experts, placement)
        self._local_on: dict[torch.device, torch.Tensor] = {}  # `local` on each device used

    def moe(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts,
            add: torch.Tensor | None = None) -> torch.Tensor:
        from nmoe.serve.model import combine_experts

        out = combine_experts(experts, x, weights, ids, add, expert_map=self.local_map(ids.device))
        self.calls += 1
        return out

    def local_map(self, device: torch.device) -> torch.Tensor:
        """Global expert id -> the local expert that computes its slots here, `[E]` int64 on `device`
        (applied inside `moe_align`'s sort: no gather kernel of its own)."""
        if device not in self._local_on:
            self._local_on[device] = self.local.to(device)
        return self._local_on[device]

    def local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids `[T, k]` -> the local expert `[T, k]` that computes each slot here."""
        return self.local_map(ids.device)[ids]
