"""Latency under mixed load: C concurrent sessions, an optional prefill backlog and probe stream.

    python -m nmoe.serve.benchmark_mixed_latency --device cuda --random-weights --simulate-world-size 8 \\
        --concurrency 32 --prompt-len 1024 --output-len 128 --duration 60 \\
        [--backlog 4 --backlog-prompt-len 8192] [--probe-rate 2] [--plot cdf.png]

A closed loop keeps `--concurrency` sessions (prompt `--prompt-len` random tokens, `--output-len`
tokens each) running for `--duration` seconds, starting a new one as one finishes. `--backlog` long
prompts (`--backlog-prompt-len`, one token each) are queued at the start, so the first steps mix
their prefill chunks with the sessions' decode; `--probe-rate` adds that many extra sessions per
second (open loop) whose TTFT is reported separately. Times are taken at token arrival, after the
engine step that produced the token (rank 0's view). ITL samples are split by whether the step that
delivered the token also carried prefill tokens (mixed) or not (pure decode).
Last line: one JSON object (`ttft_p50_ms`, `ttft_p99_ms`, `itl_p50_ms`, `itl_p99_ms`, `decode_tok_s`, ...).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field

import torch

from nmoe.serve.benchmarking import add_cli_args, build_engine, emit, maybe_plot, random_prompt, summary
from nmoe.serve.request import SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m nmoe.serve.benchmark_mixed_latency", description=__doc__.split("\n")[0])
    add_cli_args(ap)
    ap.add_argument("--concurrency", type=int, default=32, help="concurrent sessions (closed loop)")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--backlog", type=int, default=0, help="long prompts queued at the start")
    ap.add_argument("--backlog-prompt-len", type=int, default=8192)
    ap.add_argument("--probe-rate", type=float, default=0.0, help="extra sessions per second (open loop)")
    ap.add_argument("--baseline-steps", type=int, default=10,
                    help="pure decode steps of the C sessions timed first: the ITL without prefill (0: skip)")
    ap.add_argument("--plot", default=None, help="write a PNG of the TTFT and ITL CDFs")
    args = ap.parse_args(argv)
    longest = max(args.prompt_len + args.output_len, args.backlog_prompt_len + 1 if args.backlog else 0) + 2
    live = args.concurrency + args.backlog + int(args.probe_rate * args.duration) + 1
    longest = max(longest, args.prompt_len + baseline_tokens(args))
    pages = live * -(-longest // args.page_size) + 8
    for name, need in (("max_seq_len", longest), ("num_pages", pages), ("max_batch_size", args.concurrency + 8)):
        if getattr(args, name) < need:
            print(f"--{name.replace('_', '-')} raised to {need}")
            setattr(args, name, need)
    return args


@dataclass
class Track:
    kind: str  # "session", "probe", "backlog"
    submitted: float
    arrivals: list[float] = field(default_factory=list)
    mixed: list[bool] = field(default_factory=list)  # arrival i came from a step with prefill tokens


def baseline_tokens(args: argparse.Namespace) -> int:
    """Tokens per baseline session: the baseline steps, the steps that prefill all the sessions
    (the first ones decode meanwhile) and a margin."""
    return args.baseline_steps + 4 + -(-args.concurrency * args.prompt_len // args.max_prefill_tokens)


def pure_decode_steps(engine, args, gen) -> list[float]:
    """Milliseconds of `--baseline-steps` steps in which all C sessions decode and nothing else
    runs (their prompts prefilled first): the inter-token latency with no prefill beside it, in
    this process. The prompts prefill without `--mixed-prefill-tokens`' cap, so that the first
    sessions are not done before the last ones start decoding (a step of fewer sessions is
    cheaper: counted, it would flatter the baseline)."""
    if args.baseline_steps <= 0:
        return []
    params = SamplingParams(max_tokens=baseline_tokens(args), temperature=0.0, ignore_eos=True)
    rids = [engine.add_request(random_prompt(gen, args.prompt_len, engine.model_cfg.vocab_size), params)
            for _ in range(args.concurrency)]
    sched = engine.scheduler.cfg
    cap, sched.mixed_prefill_tokens = sched.mixed_prefill_tokens, 0
    times: list[float] = []
    try:
        while len(times) < args.baseline_steps and engine.has_work():
            prefill, decode = engine.stats["prefill_tokens"], engine.stats["decode_tokens"]
            t0 = time.perf_counter()
            engine.step()
            pure = engine.stats["prefill_tokens"] == prefill
            if pure and engine.stats["decode_tokens"] - decode == args.concurrency:
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        sched.mixed_prefill_tokens = cap
    for rid in rids:
        engine.cancel(rid)
    while engine.has_work():
        engine.step()
    engine.pop_finished()
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    engine = build_engine(args)
    vocab = engine.model_cfg.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    session = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    tracks: dict[int, Track] = {}

    def submit(kind: str, length: int, params: SamplingParams) -> None:
        rid = engine.add_request(random_prompt(gen, length, vocab), params)
        tracks[rid] = Track(kind, time.perf_counter())

    warm = engine.add_request(random_prompt(gen, 16, vocab), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    while engine.has_work():
        engine.step()
    engine.pop_finished()
    del warm

    baseline = pure_decode_steps(engine, args, gen)

    t0 = time.perf_counter()
    for _ in range(args.backlog):
        submit("backlog", args.backlog_prompt_len, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    for _ in range(args.concurrency):
        submit("session", args.prompt_len, session)
    next_probe = t0 + (1 / args.probe_rate if args.probe_rate > 0 else float("inf"))
    live = args.concurrency
    steps = 0
    while time.perf_counter() - t0 < args.duration and engine.has_work():
        before = engine.stats["prefill_tokens"]
        touched = engine.step()
        now = time.perf_counter()
        steps += 1
        mixed = engine.stats["prefill_tokens"] > before
        for req in touched:
            tr = tracks.get(req.rid)
            if tr is not None:
                new = len(req.output_ids) - len(tr.arrivals)
                tr.arrivals += [now] * max(new, 0)
                tr.mixed += [mixed] * max(new, 0)
        for out in engine.pop_finished():
            if tracks.get(out.request_id) and tracks[out.request_id].kind == "session":
                live -= 1
        while live < args.concurrency and now - t0 < args.duration:
            submit("session", args.prompt_len, session)
            live += 1
        while now >= next_probe and now - t0 < args.duration:
            submit("probe", args.prompt_len, session)
            next_probe += 1 / args.probe_rate
    elapsed = time.perf_counter() - t0

    def ttfts(kind: str) -> list[float]:
        return [(t.arrivals[0] - t.submitted) * 1e3 for t in tracks.values() if t.kind == kind and t.arrivals]

    itl_all, itl_mixed, itl_pure = [], [], []
    tokens = 0
    for t in tracks.values():
        if t.kind == "backlog":
            continue
        tokens += len(t.arrivals)
        for i in range(1, len(t.arrivals)):
            gap = (t.arrivals[i] - t.arrivals[i - 1]) * 1e3
            itl_all.append(gap)
            (itl_mixed if t.mixed[i] else itl_pure).append(gap)
    tt, tp, il = summary(ttfts("session") + ttfts("probe")), summary(ttfts("probe")), summary(itl_all)
    im, ip = summary(itl_mixed), summary(itl_pure)
    n = args.simulate_world_size
    rate = tokens / elapsed
    print(f"{steps} steps in {elapsed:.1f} s; {sum(t.kind != 'backlog' for t in tracks.values())} sessions, "
          f"{tokens} output tokens: {rate:.1f} tok/s on this rank, {rate * n:.1f} per node")
    print(f"TTFT ms: p50 {tt['p50']:.1f}  p99 {tt['p99']:.1f}  mean {tt['mean']:.1f}"
          + (f"   (probes: p50 {tp['p50']:.1f}  p99 {tp['p99']:.1f})" if args.probe_rate > 0 else ""))
    print(f"ITL ms:  p50 {il['p50']:.2f}  p99 {il['p99']:.2f}  mean {il['mean']:.2f}   "
          f"pure decode p50 {ip['p50']:.2f} / mixed steps p50 {im['p50']:.2f} ({len(itl_mixed)} samples)")
    bl = summary(baseline)
    inflation = im["p50"] / bl["p50"] if baseline and itl_mixed else math.nan
    if baseline:
        print(f"baseline (the {args.concurrency} sessions decoding, no prefill): step p50 {bl['p50']:.2f} ms; "
              f"ITL in mixed steps / baseline = {inflation:.2f}x (p50)")

    def draw(plt):
        for name, xs in (("TTFT", sorted(ttfts("session") + ttfts("probe"))), ("ITL", sorted(itl_all))):
            if xs:
                plt.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
        plt.xscale("log")
        plt.xlabel("ms")
        plt.ylabel("CDF")
        plt.legend()

    maybe_plot(args.plot, draw)
    emit({
        "ttft_p50_ms": tt["p50"], "ttft_p99_ms": tt["p99"], "ttft_mean_ms": tt["mean"],
        "probe_ttft_p50_ms": tp["p50"], "probe_ttft_p99_ms": tp["p99"],
        "itl_p50_ms": il["p50"], "itl_p99_ms": il["p99"], "itl_mean_ms": il["mean"],
        "itl_pure_p50_ms": ip["p50"], "itl_mixed_p50_ms": im["p50"], "itl_mixed_p99_ms": im["p99"],
        "baseline_decode_step_p50_ms": bl["p50"], "itl_inflation_p50": inflation,
        "decode_tok_s": rate, "decode_tok_s_node": rate * n, "steps": steps, "duration_s": elapsed,
        "world_size": n, "device": str(engine.device),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
