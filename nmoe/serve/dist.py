"""Process groups for EP: one rank per process, launched by `torchrun` (env:// rendezvous).

CPU ranks use one gloo group for everything. GPU ranks use NCCL for tensors (dispatch/combine)
plus a gloo group for control (the lockstep flags, the control plane), so control never waits
behind device work. Without torchrun (no WORLD_SIZE in the environment) the context is world size 1
and has no groups.

`NMOE_DIST_TIMEOUT_S` (default 600) bounds every collective: a peer that never arrives turns into
an exception instead of a hang.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nmoe.serve.env import ENV


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    cpu_group: object | None  # gloo: control flags, object exchange
    tensor_group: object | None  # dispatch/combine: gloo on CPU, NCCL on GPU

    @property
    def distributed(self) -> bool:
        return self.cpu_group is not None


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=ENV.dist_timeout_s)


def init_dist(device: str = "cpu") -> DistContext:
    """Join the torchrun job (or return a world-size-1 context when not under torchrun).

    `device`: "cpu" or "cuda"; on CUDA the rank uses GPU LOCAL_RANK."""
    if "WORLD_SIZE" not in os.environ:
        dev = torch.device("cuda", 0) if device.startswith("cuda") else torch.device("cpu")
        return DistContext(0, 1, dev, None, None)
    timeout = _timeout()
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        if not dist.is_initialized():
            dist.init_process_group("nccl", timeout=timeout, device_id=dev)
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
        tensor_group = dist.group.WORLD
    else:
        dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timeout)
        cpu_group = tensor_group = dist.group.WORLD
    return DistContext(dist.get_rank(), dist.get_world_size(), dev, cpu_group, tensor_group)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class RankInfo:
    """Where this engine sits in an EP deployment (world_size 1: everything local)."""

    rank: int = 0
    world_size: int = 1
    placement: str = "contiguous"

    def local_experts(self, n_experts: int) -> list[int]:
        if n_experts % self.world_size:
            raise ValueError(f"world_size {self.world_size} does not divide n_routed_experts {n_experts}")
        per = n_experts // self.world_size
        if self.placement == "contiguous":
            return list(range(self.rank * per, (self.rank + 1) * per))
        if self.placement == "striped":
            return list(range(self.rank, n_experts, self.world_size))
        raise ValueError(f"unknown expert placement {self.placement!r} (contiguous, striped)")
