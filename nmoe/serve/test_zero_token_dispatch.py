"""Dispatch/combine with ranks that have no tokens (T=0), in both receive layouts.

Scenarios: all ranks T=64; odd ranks T=0; only rank 0 T=128; all ranks T=0; 10 random rounds with
about a third of the ranks empty. Identity experts: combine(dispatch(x)) must equal x times the sum
of its routing weights, and every rank must receive exactly the rows routed to its experts.

    torchrun --nproc_per_node=N -m nmoe.serve.test_zero_token_dispatch
    env: NMOE_MODEL_PATH (E, k, hidden size), NMOE_EP_PLACEMENT, NMOE_EP_TRANSPORT
"""

from __future__ import annotations

import random

import torch

from nmoe.serve.ep import testing

CAPACITY = 128  # low-latency capacity: the largest T below


def scenarios(world_size: int):
    yield "all T=64", [64] * world_size
    yield "odd ranks T=0", [0 if r % 2 else 64 for r in range(world_size)]
    yield "only rank 0 T=128", [128] + [0] * (world_size - 1)
    yield "all T=0", [0] * world_size
    rng = random.Random(0)
    for i in range(10):
        empty = set(rng.sample(range(world_size), world_size // 3))
        yield f"random round {i}", [0 if r in empty else rng.randint(1, CAPACITY) for r in range(world_size)]


def scenario(ctx):
    cfg = testing.model_config()
    e, k, h = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size
    worst, rows = 0.0, 0
    for layout in ("0", "1"):
        transport = testing.transport_for(ctx, e, CAPACITY, low_latency=layout)
        for i, (name, ts) in enumerate(scenarios(ctx.world_size)):
            gen = torch.Generator().manual_seed(1000 * i + ctx.rank)
            t = ts[ctx.rank]
            x = torch.randn(t, h, generator=gen).to(ctx.device)
            weights, ids = testing.random_routing(t, e, k, gen, ctx.device)
            try:
                diff, n = testing.roundtrip(ctx, transport, x, weights, ids, scaled=False)
            except AssertionError as err:
                raise AssertionError(f"{name} (T per rank {ts}, low_latency={layout}): {err}") from err
            worst, rows = max(worst, diff), rows + n
    return {"max_diff": testing.all_max(ctx, worst), "rows_received": rows}


if __name__ == "__main__":
    testing.main(scenario, "test_zero_token_dispatch")
