"""End-to-end prefill and decode throughput at the seed's operating point.

    python -m nmoe.serve.benchmark_lmsys_e2e --device cuda --random-weights \\
        --simulate-world-size 8 --simulate-rank 0 [--num-layers L] [--plot out.png]

Prefill: `--prefill-requests` prompts of each length in `--prefill-lens` (1024, 2048, 4096), one
token each, chunked under `--max-prefill-tokens`. Decode: `--decode-batch` sequences per node
(256; this rank holds its DP share, batch / world size) at `--decode-ctx` (2000) context, timed over
`--decode-tokens` (100) steps after `--warmup-steps`. Figures per node are this rank's times the
(simulated) world size: the ranks run in lockstep, each on its own sequences.

The decode floor is what the step must read once - this rank's weights (all but the embedding
table) and its sequences' KV cache - over the measured copy bandwidth (or `--hbm-gbs`).
Last line: one JSON object (`prefill_tok_s`, `decode_tok_s`, `decode_step_ms`, `decode_floor_ms`, ...).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from nmoe.serve.benchmarking import (
    add_cli_args,
    build_engine,
    decode_weight_bytes,
    emit,
    forward_flops_per_token,
    maybe_plot,
    measure_bandwidth,
    measure_fp8_tflops,
    percentile,
    random_prompt,
    sync,
)
from nmoe.serve.request import SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m nmoe.serve.benchmark_lmsys_e2e", description=__doc__.split("\n")[0])
    add_cli_args(ap)
    ap.add_argument("--prefill-lens", default="1024,2048,4096", help="comma-separated prompt lengths")
    ap.add_argument("--prefill-requests", type=int, default=4, help="prompts per prefill length (this rank)")
    ap.add_argument("--decode-batch", type=int, default=256, help="decode sequences per node")
    ap.add_argument("--decode-ctx", type=int, default=2000, help="context length at the start of decode")
    ap.add_argument("--decode-tokens", type=int, default=100, help="timed decode steps")
    ap.add_argument("--warmup-steps", type=int, default=3, help="decode steps before timing")
    ap.add_argument("--hbm-gbs", type=float, default=None, help="bandwidth for the floor (default: measured)")
    ap.add_argument("--plot", default=None, help="write a PNG (throughput vs batch / prompt length)")
    args = ap.parse_args(argv)
    args.prefill_lens = [int(x) for x in args.prefill_lens.split(",") if x]
    size_engine(args)
    return args


def size_engine(args: argparse.Namespace) -> None:
    """Raise the cache and batch limits to what the runs need (printed when changed)."""
    per_rank = max(1, args.decode_batch // args.simulate_world_size)
    # sequences whose prefill ends early decode while the rest of the batch prefills: room for that
    args.decode_max_tokens = (args.decode_tokens + args.warmup_steps + 2
                              + -(-per_rank * args.decode_ctx // args.max_prefill_tokens) + per_rank)
    decode_len = args.decode_ctx + args.decode_max_tokens + 1
    longest = max([decode_len] + [n + 2 for n in args.prefill_lens])
    pages = per_rank * -(-decode_len // args.page_size)
    pages = max(pages, args.prefill_requests * -(-longest // args.page_size)) + 8
    for name, need in (("max_seq_len", longest), ("num_pages", pages), ("max_batch_size", per_rank)):
        if getattr(args, name) < need:
            print(f"--{name.replace('_', '-')} raised to {need}")
            setattr(args, name, need)
    args.decode_per_rank = per_rank


def run_until_done(engine, rids: set[int]) -> list[tuple[float, bool]]:
    """Step until every request in `rids` finished; returns (seconds, had prefill tokens) per step."""
    steps = []
    done: set[int] = set()
    while not rids <= done:
        before = engine.stats["prefill_tokens"]
        t0 = time.perf_counter()
        engine.step()
        steps.append((time.perf_counter() - t0, engine.stats["prefill_tokens"] > before))
        done |= {o.request_id for o in engine.pop_finished()}
    return steps


def bench_prefill(engine, args, gen) -> dict[int, float]:
    """Prompt tokens per second of this rank, per prompt length."""
    vocab = engine.model_cfg.vocab_size
    greedy = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    run_until_done(engine, {engine.add_request(random_prompt(gen, min(args.prefill_lens), vocab), greedy)})  # warm
    out = {}
    for n in args.prefill_lens:
        rids = {engine.add_request(random_prompt(gen, n, vocab), greedy) for _ in range(args.prefill_requests)}
        sync(engine.device)
        t0 = time.perf_counter()
        run_until_done(engine, rids)
        sync(engine.device)
        out[n] = n * len(rids) / (time.perf_counter() - t0)
    return out


def bench_decode(engine, args, gen) -> list[float]:
    """Seconds of each timed decode step (every sequence of the batch adds one token)."""
    vocab = engine.model_cfg.vocab_size
    params = SamplingParams(max_tokens=args.decode_max_tokens, temperature=0.0, ignore_eos=True)
    rids = {engine.add_request(random_prompt(gen, args.decode_ctx, vocab), params) for _ in range(args.decode_per_rank)}
    times: list[float] = []
    warm = 0
    while len(times) < args.decode_tokens:
        before = engine.stats["prefill_tokens"]
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if engine.stats["prefill_tokens"] > before:
            continue  # still prefilling the batch
        if warm < args.warmup_steps:
            warm += 1
        else:
            times.append(dt)
        finished = engine.pop_finished()
        if finished and len(times) < args.decode_tokens:
            raise RuntimeError(f"{len(finished)} sequences finished before the decode run ended")
    for rid in rids:
        engine.cancel(rid)
    engine.pop_finished()
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    engine = build_engine(args)
    n = args.simulate_world_size
    mc = engine.model_cfg
    gen = torch.Generator().manual_seed(args.seed)
    print(f"model: {mc.num_hidden_layers} layers, hidden {mc.hidden_size}, {len(engine.rank.local_experts(mc.n_routed_experts))}"
          f"/{mc.n_routed_experts} experts on this rank (simulated rank {args.simulate_rank} of {n}), "
          f"weights {engine.model.weights_format} on {engine.device}")

    prefill = bench_prefill(engine, args, gen)
    fp8_peak = measure_fp8_tflops(engine.device)
    prefill_tflops = {k: rate * forward_flops_per_token(mc, k / 2) / 1e12 for k, rate in prefill.items()}
    for length, rate in prefill.items():
        frac = f" = {prefill_tflops[length] / fp8_peak:.1%} of FP8 peak {fp8_peak:.0f}" if fp8_peak else ""
        print(f"prefill {length:>6} tokens x {args.prefill_requests}: {rate:10.1f} tok/s per rank, {rate * n:10.1f} "
              f"per node; {prefill_tflops[length]:.1f} TFLOP/s{frac} (steps of <= {args.max_prefill_tokens} tokens)")

    steps = bench_decode(engine, args, gen)
    step_s = statistics.median(steps)
    b = args.decode_per_rank
    bw = args.hbm_gbs or measure_bandwidth(engine.device)
    w_bytes = decode_weight_bytes(engine.model)
    kv_elt = engine.kv_caches[0].element_size()
    mean_ctx = args.decode_ctx + args.warmup_steps + args.decode_tokens / 2
    kv_bytes = b * mean_ctx * mc.num_hidden_layers * mc.kv_cache_dim * kv_elt
    floor_s = (w_bytes + kv_bytes) / (bw * 1e9)
    decode_rate = b * len(steps) / sum(steps)
    graphs = engine._graphs.graphs if engine._graphs is not None else {}
    print(f"decode CUDA graphs: {'buckets ' + str(sorted(graphs)) if graphs else 'off'}")
    print(f"decode {b} seqs/rank ({b * n}/node) at ctx {args.decode_ctx}: step p50 {step_s * 1e3:.2f} ms "
          f"(p99 {percentile(steps, 99) * 1e3:.2f} ms), {decode_rate:.1f} tok/s per rank, {decode_rate * n:.1f} per node")
    print(f"decode floor: weights {w_bytes / 1e9:.2f} GB + KV {kv_bytes / 1e9:.3f} GB over {bw:.0f} GB/s = "
          f"{floor_s * 1e3:.2f} ms; step / floor = {step_s / floor_s:.2f}x")

    def draw(plt):
        plt.subplot(1, 2, 1)
        plt.plot(list(prefill), [r * n for r in prefill.values()], "o-")
        plt.xlabel("prompt tokens")
        plt.ylabel("prefill tok/s per node")
        plt.subplot(1, 2, 2)
        plt.bar(["measured", "floor"], [step_s * 1e3, floor_s * 1e3])
        plt.ylabel(f"decode step ms (batch {b}/rank)")

    maybe_plot(args.plot, draw)
    emit({
        "prefill_tok_s": statistics.fmean(prefill.values()) * n,
        "prefill_tok_s_by_len": {str(k): v * n for k, v in prefill.items()},
        "decode_tok_s": decode_rate * n,
        "decode_step_ms": step_s * 1e3,
        "decode_step_p99_ms": percentile(steps, 99) * 1e3,
        "decode_floor_ms": floor_s * 1e3,
        "decode_floor_ratio": step_s / floor_s,
        "prefill_tflops_by_len": {str(k): v for k, v in prefill_tflops.items()},
        "fp8_peak_tflops": fp8_peak,
        "prefill_fp8_peak_frac_by_len": {str(k): v / fp8_peak for k, v in prefill_tflops.items()} if fp8_peak else None,
        "cuda_graph": bool(graphs),
        "weight_gb": w_bytes / 1e9,
        "kv_gb": kv_bytes / 1e9,
        "bandwidth_gbs": bw,
        "batch_per_rank": b,
        "world_size": n,
        "layers": mc.num_hidden_layers,
        "device": str(engine.device),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
