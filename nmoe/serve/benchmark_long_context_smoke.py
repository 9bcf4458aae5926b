"""Long-context smoke: one 128k-token prompt, chunked prefill, a few decode tokens; PASS or FAIL.

    python -m nmoe.serve.benchmark_long_context_smoke --device cuda --random-weights \\
        --simulate-world-size 8 --prompt-len 131072 --chunk-size 2048 --output-len 16

Passes when the request returns `--output-len` tokens whose logprobs are all finite. Prints the
prefill time (the steps that carried prompt tokens), TTFT (submit to first token) and the decode
inter-token latency. Exits 1 on FAIL. Last line: one JSON object (`passed`, `prefill_s`, `ttft_s`, `itl_ms`, ...).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from nmoe.serve.benchmarking import add_cli_args, build_engine, emit, maybe_plot, random_prompt, summary
from nmoe.serve.request import SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m nmoe.serve.benchmark_long_context_smoke",
                                 description=__doc__.split("\n")[0])
    add_cli_args(ap)
    ap.add_argument("--prompt-len", type=int, default=131072)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--plot", default=None, help="write a PNG of the step times")
    args = ap.parse_args(argv)
    need = args.prompt_len + args.output_len + 1
    pages = -(-need // args.page_size) + 2
    for name, value in (("max_seq_len", need), ("num_pages", pages), ("max_prefill_tokens", args.chunk_size)):
        if getattr(args, name) < value:
            print(f"--{name.replace('_', '-')} raised to {value}")
            setattr(args, name, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    engine = build_engine(args)
    gen = torch.Generator().manual_seed(args.seed)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, logprobs=True, ignore_eos=True)
    t0 = time.perf_counter()
    rid = engine.add_request(random_prompt(gen, args.prompt_len, engine.model_cfg.vocab_size), params)
    prefill_s, arrivals, step_ms, out = 0.0, [], [], None
    while out is None:
        before = engine.stats["prefill_tokens"]
        s0 = time.perf_counter()
        touched = engine.step()
        now = time.perf_counter()
        step_ms.append((now - s0) * 1e3)
        if engine.stats["prefill_tokens"] > before:
            prefill_s += now - s0
        for req in touched:
            if req.rid == rid:
                arrivals += [now] * (len(req.output_ids) - len(arrivals))
        out = next((o for o in engine.pop_finished() if o.request_id == rid), None)
        if out is None and not engine.has_work():
            break
    lps = list(out.logprobs or []) if out is not None else []
    passed = bool(out is not None and out.finish_reason == "length" and len(out.token_ids) == args.output_len
                  and len(lps) == args.output_len and all(math.isfinite(x) for x in lps))
    ttft_s = arrivals[0] - t0 if arrivals else math.nan
    itl = summary([(b - a) * 1e3 for a, b in zip(arrivals, arrivals[1:])])
    print(f"{'PASS' if passed else 'FAIL'}: prompt {args.prompt_len} tokens in chunks of {args.chunk_size}, "
          f"{len(arrivals)}/{args.output_len} tokens, logprobs finite: {all(math.isfinite(x) for x in lps)}")
    print(f"prefill {prefill_s:.2f} s ({args.prompt_len / max(prefill_s, 1e-9):.0f} tok/s), TTFT {ttft_s:.2f} s, "
          f"decode ITL mean {itl['mean']:.2f} ms (p50 {itl['p50']:.2f}, p99 {itl['p99']:.2f})")

    def draw(plt):
        plt.plot(step_ms, ".-")
        plt.xlabel("step")
        plt.ylabel("ms")
        plt.yscale("log")

    maybe_plot(args.plot, draw)
    emit({
        "passed": passed, "prefill_s": prefill_s, "ttft_s": ttft_s, "itl_ms": itl["mean"],
        "itl_p50_ms": itl["p50"], "itl_p99_ms": itl["p99"], "prompt_len": args.prompt_len,
        "output_tokens": len(arrivals), "world_size": args.simulate_world_size, "device": str(engine.device),
    })
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
