"""MLA decode over the paged latent cache: torch.ops.nmoe.mla_decode_paged vs a torch baseline
(gather the pages, bf16 matmuls, fp32 softmax), beside the HBM bandwidth and bf16 matmul rate
measured in the same run. Floor = max(KV bytes / bandwidth, FLOPs / matmul rate), with FLOPs =
B * ctx * H * (2 * 576 + 2 * 512); "% floor" = floor time / kernel time.

For H >= 64 every kernel variant is timed side by side (the op's `variant`): 0 = mma.sync, 1 = wgmma
(deferred schedule), 2 = wgmma (eager schedule), 3 = wgmma deferred with consumer proxy fences (a
diagnostic, in the tests; here only with --variants 3), 4 = wgmma (seesaw schedule: the two
warpgroups take alternate tiles; the op's default at H >= 64); smaller H runs mma.sync only.
"max-diff" is the largest difference of a variant's output from the mma.sync output (a sanity check,
not the accuracy test: tests/cuda/test_mla_decode.py); a variant more than 5% of max|out| off is
marked BAD and left out of the summary's best. A summary table comes last.

    python benchmarks/bench_mla.py [--heads 128 16] [--batch 32 64 128 256] [--ctx 2000 8192 32768]
                                   [--variants 0 2 4] [--no-baseline]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _roofline import bf16_matmul_rate, hbm_bandwidth, time_us  # noqa: E402

R, D, PAGE = 512, 64, 64
NAMES = {0: "mma.sync", 1: "wgmma", 2: "wgmma-eager", 3: "wgmma-fenced", 4: "wgmma-seesaw"}
WGMMA_MIN_HEADS = 64


def baseline(q, cache, table, ctx, scale):
    b = q.shape[0]
    n_pages = -(-ctx // PAGE)
    kv = cache[table[:, :n_pages]].view(b, n_pages * PAGE, R + D)[:, :ctx]
    s = torch.matmul(q, kv.transpose(1, 2)).float() * scale
    p = torch.softmax(s, -1).to(q.dtype)
    return torch.matmul(p, kv[..., :R])


def run_case(heads, batch, ctx, bw, peak, with_baseline, variants, summary):
    n_pages = -(-ctx // PAGE)
    cache = torch.randn(batch * n_pages, PAGE, R + D, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(batch * n_pages, device="cuda", dtype=torch.int32).view(batch, n_pages)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, R + D, device="cuda", dtype=torch.bfloat16)
    scale = 192**-0.5
    iters = max(3, min(50, int(2e9 / (batch * ctx * 1152))))
    kv_bytes = batch * ctx * (R + D) * 2
    flops = batch * ctx * heads * (2 * (R + D) + 2 * R)
    floor = max(kv_bytes / bw, flops / peak) * 1e6
    bound = "memory" if kv_bytes / bw >= flops / peak else "compute"
    base = float("nan")
    if with_baseline and batch * ctx * heads * 6 < 24e9:
        base = time_us(
            functools.partial(baseline, q, cache, table, ctx, scale), iters=max(2, iters // 4), warmup=1
        )
    use = [v for v in variants if v == 0 or heads >= WGMMA_MIN_HEADS]
    ref = None
    if len(use) > 1:
        ref = torch.ops.nmoe.mla_decode_paged(q, cache, table, lens, scale, 0)[0].float()
    times, bad = {}, set()
    for v in use:
        fn = functools.partial(torch.ops.nmoe.mla_decode_paged, q, cache, table, lens, scale, v)
        diff = float("nan")
        if ref is not None and v != 0:
            diff = (fn()[0].float() - ref).abs().max().item()
            if not diff <= 0.05 * ref.abs().max().item():
                bad.add(v)
        t = time_us(fn, iters=iters)
        times[v] = t
        print(
            f"| {heads} | {batch} | {ctx} | {NAMES[v]} | {t:9.1f} | {kv_bytes / t / 1e3:7.0f} |"
            f" {flops / t / 1e6:6.1f} | {bound} | {100 * floor / t:5.1f}% | {diff:.2e}{' BAD' if v in bad else ''} |"
            f" {base:9.1f} |"
            f" {base / t:5.1f}x |",
            flush=True,
        )
    summary.append((heads, batch, ctx, flops, times, bad))
    del cache, table, q, ref
    torch.cuda.empty_cache()


def print_summary(summary, peak):
    print()
    print(
        f"summary: best good variant, its TFLOP/s and % of the bf16 matmul rate ({peak / 1e12:.0f} TFLOP/s),"
        " speedup over mma.sync; BAD = output off"
    )
    cols = [v for v in NAMES if any(v in row[4] for row in summary)]
    print(
        "| H | B | ctx | "
        + " | ".join(f"{NAMES[v]} us" for v in cols)
        + " | best | TFLOP/s | % matmul | speedup |"
    )
    print("| --- " * (len(cols) + 7) + "|")
    for heads, batch, ctx, flops, times, bad in summary:
        cells = [f"{times[v]:.1f}{' BAD' if v in bad else ''}" if v in times else "-" for v in cols]
        good = {v: t for v, t in times.items() if v not in bad}
        best = min(good, key=good.get)
        speedup = times[0] / good[best] if 0 in times else float("nan")
        rate = flops / good[best] / 1e6
        print(
            f"| {heads} | {batch} | {ctx} | " + " | ".join(cells) + f" | {NAMES[best]} | {rate:.1f} |"
            f" {100 * rate / (peak / 1e12):.1f}% | {speedup:.2f}x |"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, nargs="+", default=[128, 16])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--ctx", type=int, nargs="+", default=[2000, 8192, 32768])
    ap.add_argument("--variants", type=int, nargs="+", default=[0, 2, 4], choices=[0, 1, 2, 3, 4])
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    try:
        import nmoe._C  # noqa: F401
    except ImportError:
        pass
    assert hasattr(torch.ops.nmoe, "mla_decode_paged"), "nmoe._C is not built"
    bw, peak = hbm_bandwidth(), bf16_matmul_rate()
    print(
        f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s"
    )
    print("| H | B | ctx | kernel | us | GB/s | TFLOP/s | bound | % floor | max-diff | torch us | speedup |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    summary = []
    for heads in args.heads:
        for batch in args.batch:
            for ctx in args.ctx:
                run_case(heads, batch, ctx, bw, peak, not args.no_baseline, args.variants, summary)
    print_summary(summary, peak)


if __name__ == "__main__":
    main()
