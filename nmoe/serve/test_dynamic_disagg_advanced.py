"""Prefill stragglers beside decoding ranks: the low-latency layout with T=0 ranks, layouts
alternating round by round, and stragglers with 2048/512/32/0 tokens, all checked for values
(experts scaled by their id, so a row at the wrong expert or the wrong token shows).

    torchrun --nproc_per_node=N -m nmoe.serve.test_dynamic_disagg_advanced
    env: NMOE_MODEL_PATH (E, k), NMOE_EP_PLACEMENT, NMOE_EP_TRANSPORT
"""

from __future__ import annotations

import random

import torch

from nmoe.serve.ep import testing

HIDDEN = 64  # synthetic rows: the straggler round moves 2048 tokens per rank through 8 ranks on CPU
DECODE_CAPACITY = 64
STRAGGLERS = (2048, 512, 32, 0)


def rounds(world_size: int):
    """(name, low_latency mode, capacity, T per rank, expect the low-latency layout)."""
    yield "low latency, odd ranks T=0", "1", DECODE_CAPACITY, [0 if r % 2 else 48 for r in range(world_size)], True
    rng = random.Random(1)
    for i in range(10):
        ts = [0 if rng.random() < 0.3 else rng.randint(1, DECODE_CAPACITY) for _ in range(world_size)]
        ll = i % 2 == 1
        yield f"alternating round {i}", "1" if ll else "0", DECODE_CAPACITY, ts, ll
    ts = [STRAGGLERS[r % len(STRAGGLERS)] for r in range(world_size)]
    yield "stragglers, normal layout", "0", DECODE_CAPACITY, ts, False
    yield "stragglers beyond capacity fall back to normal", "1", DECODE_CAPACITY, ts, False
    yield "stragglers, low latency at full capacity", "1", max(STRAGGLERS), ts, True


def scenario(ctx):
    cfg = testing.model_config()
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    worst = 0.0
    for i, (name, mode, cap, ts, want_ll) in enumerate(rounds(ctx.world_size)):
        transport = testing.transport_for(ctx, e, cap, low_latency=mode)
        gen = torch.Generator().manual_seed(7919 * i + ctx.rank)
        t = ts[ctx.rank]
        x = torch.randn(t, HIDDEN, generator=gen).to(ctx.device)
        weights, ids = testing.random_routing(t, e, k, gen, ctx.device)
        if want_ll != (mode == "1" and max(ts) <= cap):
            raise AssertionError(f"{name}: the round does not test the layout it names")
        try:
            diff, _ = testing.roundtrip(ctx, transport, x, weights, ids, scaled=True)
        except AssertionError as err:
            raise AssertionError(f"{name} (T per rank {ts}): {err}") from err
        worst = max(worst, diff)
    return {"max_diff": testing.all_max(ctx, worst)}


if __name__ == "__main__":
    testing.main(scenario, "test_dynamic_disagg_advanced")
