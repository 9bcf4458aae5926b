"""Expert parallelism: routing -> dispatch -> experts -> combine, behind one `Transport` interface.

`NMOE_EP_TRANSPORT` picks the transport:
  * `a2a` (default): `torch.distributed.all_to_all_single` on the tensor group (gloo on CPU, NCCL on
    GPU); at world size 1 without process groups it is the same code over a local copy;
  * `deepep`: DeepEP's kernels (needs the `deep_ep` package);
  * `local`: world size 1, no process group.
`NMOE_DEEPEP_LOW_LATENCY` (0 | 1 | auto) picks the receive layout (see `transport.py`).

The engine's model gets the transport with `attach(model, transport)` (or `setup(engine, ctx)`,
which builds it from the environment and attaches it); `MoE.forward` then calls `transport.moe`.
"""

from __future__ import annotations

from nmoe.serve.env import ENV
from nmoe.serve.ep.transport import Dispatched, GroupComm, LocalComm, Transport, run_experts

TRANSPORTS = ("a2a", "deepep", "local")

__all__ = [
    "Dispatched", "GroupComm", "LocalComm", "Transport", "attach", "attached", "make_transport",
    "run_experts", "setup",
]


def make_transport(ctx, n_experts: int, *, placement: str = "contiguous", max_tokens_per_rank: int = 256,
                   kind: str | None = None, low_latency: str | None = None) -> Transport:
    """The transport `kind` (default NMOE_EP_TRANSPORT) for the ranks of `ctx` (a `DistContext`)."""
    kind = kind or ENV.ep_transport
    low_latency = low_latency or ENV.deepep_low_latency
    if kind not in TRANSPORTS:
        raise ValueError(f"NMOE_EP_TRANSPORT={kind!r}: expected one of {', '.join(TRANSPORTS)}")
    if n_experts % ctx.world_size:
        raise ValueError(f"world_size {ctx.world_size} does not divide n_routed_experts {n_experts}")
    if kind == "deepep":
        from nmoe.serve.ep.deepep import DeepEPTransport

        return DeepEPTransport(ctx, n_experts, placement=placement, max_tokens_per_rank=max_tokens_per_rank,
                               low_latency=low_latency)
    if kind == "local" and ctx.world_size != 1:
        raise ValueError(f"NMOE_EP_TRANSPORT=local needs world size 1, this job has {ctx.world_size} ranks")
    comm = GroupComm(ctx.tensor_group, ctx.rank, ctx.world_size) if ctx.distributed else LocalComm()
    t = Transport(comm, n_experts, placement, max_tokens_per_rank, low_latency)
    if kind == "local" or not ctx.distributed:
        t.name = "local"
    return t


def attach(model, transport: Transport) -> Transport:
    """Route every MoE layer of `model` (a `DeepseekV3`) through `transport`, in layer order."""
    from nmoe.serve.model import MoE

    transport.layers = []
    transport.hidden_size = model.cfg.hidden_size
    for layer in model.layers:
        if isinstance(layer.mlp, MoE):
            if list(layer.mlp.experts.expert_ids) != list(transport.expert_ids):
                raise ValueError(
                    f"rank {transport.rank}: the model holds experts {layer.mlp.experts.expert_ids} but the "
                    f"transport's {transport.placement} placement gives it {transport.expert_ids}"
                )
            layer.mlp.transport = transport
            transport.layers.append(layer.mlp.experts)
    return transport


def attached(model) -> Transport | None:
    from nmoe.serve.model import MoE

    for layer in model.layers:
        if isinstance(layer.mlp, MoE):
            return layer.mlp.transport
    return None


def setup(engine, ctx) -> Transport:
    """Build the transport for `engine` (its placement; decode capacity = max_batch_size) and attach it."""
    r = engine.rank
    if (r.rank, r.world_size) != (ctx.rank, ctx.world_size):
        raise ValueError(f"engine is rank {r.rank}/{r.world_size} but the process is rank {ctx.rank}/{ctx.world_size}")
    t = make_transport(ctx, engine.model_cfg.n_routed_experts, placement=r.placement,
                       max_tokens_per_rank=engine.cfg.max_batch_size)
    return attach(engine.model, t)
