"""EP dispatch / combine latency and bandwidth at 128 and 4096 tokens per rank.

    torchrun --nproc_per_node=N benchmarks/bench_ep_transport.py [--tokens 128,4096] [--hidden 7168]
        [--experts 256] [--top-k 8] [--iters 20] [--layout normal|low_latency|both]

Each rank routes its T tokens to top-k of E experts uniformly at random (the load a trained router
spreads over EP ranks), then times dispatch and combine separately (median over iterations, each
bracketed by a barrier so the slowest rank sets the time). GB/s counts the rows that cross ranks:
T * k * (N - 1) / N rows of `hidden` BF16 (fp32 on CPU) values sent by each rank, in each direction.
Printed beside it: the same bytes through one `all_to_all_single` of equal splits in the same run
(the collective's own ceiling). NCCL on GPU, gloo on CPU. The low-latency layout is timed only up to
256 tokens per rank: its fixed-capacity receive buffers `[E_local, N * T, H]` are the decode layout
(at 4096 tokens and 8 ranks they would be 32 x 32768 x 7168 values).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from nmoe.serve import ep
from nmoe.serve.dist import init_dist, shutdown
from nmoe.serve.ep.testing import ScaledIdentity, random_routing
from nmoe.serve.ep.transport import run_experts

LL_MAX_TOKENS = 256


def timed(ctx, fn, iters: int) -> float:
    """Median seconds of `fn()` over `iters` runs, all ranks in step."""
    times = []
    for _ in range(iters):
        if ctx.distributed:
            dist.barrier(group=ctx.cpu_group)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.cpu_group)
    return float(t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="128,4096")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--layout", choices=["normal", "low_latency", "both"], default="both")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ctx = init_dist("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    n = ctx.world_size
    layouts = ["0", "1"] if args.layout == "both" else ["1" if args.layout == "low_latency" else "0"]
    rows = []
    for t in (int(x) for x in args.tokens.split(",")):
        gen = torch.Generator().manual_seed(1000 + ctx.rank)
        x = torch.randn(t, args.hidden, generator=gen).to(ctx.device, dtype)
        weights, ids = random_routing(t, args.experts, args.top_k, gen, ctx.device)
        sent_bytes = t * args.top_k * (n - 1) / n * args.hidden * x.element_size()
        for ll in layouts:
            if ll == "1" and t > LL_MAX_TOKENS:
                continue  # [E_local, N * T, H] buffers: the decode layout, not one for prefill batches
            transport = ep.make_transport(ctx, args.experts, max_tokens_per_rank=t, low_latency=ll)
            experts = ScaledIdentity(transport.expert_ids, args.experts).to(ctx.device)
            d = transport.dispatch(x, ids)
            out = run_experts(experts, d).to(dtype)
            t_dispatch = timed(ctx, lambda: transport.dispatch(x, ids), args.iters)  # noqa: B023
            t_combine = timed(ctx, lambda: transport.combine(d, out, weights), args.iters)  # noqa: B023
            rows.append((t, "low_latency" if ll == "1" else "normal", t_dispatch, t_combine, sent_bytes))
        if ctx.distributed and n > 1:
            flat = torch.zeros(t * args.top_k * args.hidden, dtype=dtype, device=ctx.device)
            recv = torch.empty_like(flat)
            t_a2a = timed(ctx, lambda: dist.all_to_all_single(recv, flat, group=ctx.tensor_group), args.iters)  # noqa: B023
            rows.append((t, "all_to_all_single (ceiling)", t_a2a, float("nan"), sent_bytes))
    if ctx.rank == 0:
        print(f"EP transport, {n} ranks on {ctx.device.type} ({'NCCL' if ctx.device.type == 'cuda' else 'gloo'}), "
              f"hidden {args.hidden}, {args.experts} experts, top-{args.top_k}, {dtype}")
        print(f"{'tokens/rank':>11s} {'layout':>28s} {'dispatch us':>12s} {'GB/s':>8s} {'combine us':>11s} {'GB/s':>8s}")
        for t, name, td, tc, b in rows:
            comb = "" if tc != tc else f"{tc * 1e6:11.0f} {b / tc / 1e9:8.2f}"
            print(f"{t:11d} {name:>28s} {td * 1e6:12.0f} {b / td / 1e9:8.2f} {comb}")
    shutdown(ctx)


if __name__ == "__main__":
    main()
