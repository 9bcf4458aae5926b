"""Sampling B x V logits: torch.ops.nmoe.sample vs the sort-based torch reference (sample_ref on
the GPU), beside the time to read the logits once at the copy bandwidth measured in the same run.

    python benchmarks/bench_sampling.py [--batch 256] [--vocab 129280] [--kernels split,cluster8]
                                        [--no-baseline] [--profile]

`kernel us` is the op replayed from a CUDA graph (device time: the op's host side - five output
allocations and the dispatch - is not in it); `eager us` is back-to-back calls from Python.
--kernels: one table per sampler, picked through NMOE_SAMPLE_KERNEL (read at every call): split
(the default from 128 rows), cluster8 (the default below), cluster16, rowwise (the one-CTA-per-row
sampler). --profile adds each
kernel's device time per case (torch.profiler).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _roofline import graph_time_us, hbm_bandwidth, time_us  # noqa: E402

from nmoe.serve.ops.sampling import sample_ref  # noqa: E402

CASES = [  # name, temperature, top_k, top_p, min_p, num_top_logprobs
    ("greedy", 0.0, 0, 1.0, 0.0, 0),
    ("t=1 (full vocab)", 1.0, 0, 1.0, 0.0, 0),
    ("top_k=50", 0.7, 50, 1.0, 0.0, 0),
    ("top_p=0.9", 1.0, 0, 0.9, 0.0, 0),
    ("top_k=40 top_p=0.95 min_p=0.05", 0.8, 40, 0.95, 0.05, 0),
    ("top_p=0.9 + 20 top logprobs", 1.0, 0, 0.9, 0.0, 20),
]


def kernel_times(op, calls=5):
    """Mean device time per call of each kernel the op launches (a memset included), as text."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                op()
            torch.cuda.synchronize()
    except RuntimeError as e:  # no CUPTI
        return f"(no profile: {e})"
    rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    return ", ".join(f"{e.key[:40]} {e.self_device_time_total / calls:.1f} us" for e in rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=129280)
    ap.add_argument("--kernels", default="split,cluster8", help="comma-separated: split, cluster8, cluster16, rowwise")
    ap.add_argument("--no-baseline", action="store_true", help="skip the sort-based torch reference")
    ap.add_argument("--profile", action="store_true", help="also each kernel's device time per case (torch.profiler)")
    args = ap.parse_args()
    try:
        import nmoe._C  # noqa: F401
    except ImportError:
        pass
    assert hasattr(torch.ops.nmoe, "sample"), "nmoe._C is not built"
    b, v = args.batch, args.vocab
    bw = hbm_bandwidth()
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(b, v, device="cuda", generator=g) * 2
    top = torch.randint(0, v, (b, 8), device="cuda", generator=g)
    logits.scatter_add_(1, top, torch.rand(b, 8, device="cuda", generator=g) * 12 + 4)
    read_once = b * v * 4 / bw * 1e6
    seed = torch.arange(b, device="cuda")
    pos = torch.zeros(b, dtype=torch.int64, device="cuda")
    base = {}
    for kernel in args.kernels.split(","):
        os.environ["NMOE_SAMPLE_KERNEL"] = kernel
        print(
            f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s; B={b} V={v}: "
            f"reading the logits once takes {read_once:.1f} us; sampler {kernel}"
        )
        print(
            "| case | kernel us | x read-once | GB/s (one read) | eager us | torch sort-based us | speedup |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, t, k, p, mp, ntop in CASES:
            args_ = (
                logits,
                torch.full((b,), t, device="cuda"),
                torch.full((b,), k, dtype=torch.int32, device="cuda"),
                torch.full((b,), p, device="cuda"),
                torch.full((b,), mp, device="cuda"),
                seed,
                pos,
                ntop,
                True,
            )
            op = functools.partial(torch.ops.nmoe.sample, *args_)
            eager = time_us(op, iters=20)
            dev = graph_time_us(op)
            us = dev if dev is not None else eager
            if name not in base and not args.no_baseline:
                base[name] = time_us(functools.partial(sample_ref, *args_), iters=3, warmup=1)
            ref = base.get(name)
            ref_s = f"{ref:9.1f} | {ref / us:5.1f}x" if ref is not None else "- | -"
            print(
                f"| {name} | {us:8.1f} | {us / read_once:5.2f} | {b * v * 4 / us / 1e3:6.0f} | {eager:8.1f} | {ref_s} |",
                flush=True,
            )
            if args.profile:
                print(f"|   kernels: {kernel_times(op)} | | | | | |", flush=True)


if __name__ == "__main__":
    main()
