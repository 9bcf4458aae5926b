"""Where a decode (or prefill) step's time goes: device kernels by share, device time against wall.

    python benchmarks/profile_decode.py --device cuda --random-weights --simulate-world-size 8 \\
        --num-layers 8 [--batch 32 --ctx 2000 --steps 5 --top 25] [--disable-cuda-graph]
    python benchmarks/profile_decode.py ... --prefill 4 --ctx 4096 --max-prefill-tokens 16384 --chunk-size 4096

`--prefill N` profiles the steps that prefill N prompts of `--ctx` tokens instead.

Builds the engine as the seed's benchmarks do (`nmoe.serve.benchmarking`), prefills `--batch`
sequences of `--ctx` tokens, warms up, then profiles `--steps` decode steps with torch.profiler and
prints the kernels that take the most device time per step. Wall minus device time is what the
host adds (Python, launches, synchronisation) when the device is not kept busy.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from nmoe.serve.benchmarking import add_cli_args, build_engine, random_prompt, sync
from nmoe.serve.request import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_cli_args(ap)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--prefill", type=int, default=0, help="profile the prefill of this many prompts instead")
    args = ap.parse_args()
    pages = args.batch * -(-(args.ctx + args.steps + 16) // args.page_size) + 8
    args.num_pages = max(args.num_pages, pages)
    args.max_seq_len = max(args.max_seq_len, args.ctx + args.steps + 16)
    args.max_batch_size = max(args.max_batch_size, args.batch)
    engine = build_engine(args)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=args.steps + 12, temperature=0.0, ignore_eos=True)
    for _ in range(args.batch):
        engine.add_request(random_prompt(gen, args.ctx, engine.model_cfg.vocab_size), params)
    while engine.stats["decode_tokens"] < 4 * args.batch:  # prefill, then a few decode steps (graph capture)
        engine.step()
    sync(engine.device)
    for rid in list(engine.requests):
        engine.cancel(rid)
    while engine.has_work():
        engine.step()
    engine.pop_finished()
    if not args.prefill:  # the decode batch again, profiled once it decodes
        for _ in range(args.batch):
            engine.add_request(random_prompt(gen, args.ctx, engine.model_cfg.vocab_size), params)
        while engine.stats["decode_tokens"] < 8 * args.batch:
            engine.step()
    else:
        one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        for _ in range(args.prefill):
            engine.add_request(random_prompt(gen, args.ctx, engine.model_cfg.vocab_size), one)
    sync(engine.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    what = "prefill" if args.prefill else "decode"
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        steps = 0
        while steps < args.steps and engine.has_work():
            engine.step()
            steps += 1
        sync(engine.device)
        wall = (time.perf_counter() - t0) / max(steps, 1)
    args.steps = max(steps, 1)
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            k = per_kernel[ev.name]
            k[0] += ev.device_time / args.steps
            k[1] += 1
    device = sum(v[0] for v in per_kernel.values())
    print(f"{what} step ({engine.stats['prefill_tokens']} prefill tokens in all): wall {wall * 1e3:.2f} ms, device (sum of kernels) {device / 1e3:.2f} ms, "
          f"{sum(v[1] for v in per_kernel.values()) // args.steps} kernel launches ({len(per_kernel)} distinct); graphs: {bool(engine._graphs and engine._graphs.graphs)}")
    print(f"{'us/step':>9} {'share':>6} {'calls':>6}  kernel")
    for name, (us, calls) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{us:9.1f} {us / max(device, 1e-9):6.1%} {calls // args.steps:6d}  {name[:110]}")


if __name__ == "__main__":
    main()
