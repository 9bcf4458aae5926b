"""MLA decode over the paged latent cache: torch.ops.nmoe.mla_decode_paged vs a torch baseline
(gather the pages, bf16 matmuls, fp32 softmax), beside the HBM bandwidth and bf16 matmul rate
measured in the same run. Floor = max(KV bytes / bandwidth, FLOPs / matmul rate), with FLOPs =
B * ctx * H * (2 * 576 + 2 * 512); "% floor" = floor time / kernel time.

    python benchmarks/bench_mla.py [--heads 128 16] [--batch 32 64 128 256] [--ctx 2000 8192 32768]
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


def baseline(q, cache, table, ctx, scale):
    b = q.shape[0]
    n_pages = -(-ctx // PAGE)
    kv = cache[table[:, :n_pages]].view(b, n_pages * PAGE, R + D)[:, :ctx]
    s = torch.matmul(q, kv.transpose(1, 2)).float() * scale
    p = torch.softmax(s, -1).to(q.dtype)
    return torch.matmul(p, kv[..., :R])


def run_case(heads, batch, ctx, bw, peak, with_baseline):
    n_pages = -(-ctx // PAGE)
    cache = torch.randn(batch * n_pages, PAGE, R + D, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(batch * n_pages, device="cuda", dtype=torch.int32).view(batch, n_pages)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, R + D, device="cuda", dtype=torch.bfloat16)
    scale = 192**-0.5
    iters = max(3, min(50, int(2e9 / (batch * ctx * 1152))))
    t = time_us(functools.partial(torch.ops.nmoe.mla_decode_paged, q, cache, table, lens, scale), iters=iters)
    kv_bytes = batch * ctx * (R + D) * 2
    flops = batch * ctx * heads * (2 * (R + D) + 2 * R)
    floor = max(kv_bytes / bw, flops / peak) * 1e6
    base = float("nan")
    if with_baseline and batch * ctx * heads * 6 < 24e9:
        base = time_us(
            functools.partial(baseline, q, cache, table, ctx, scale), iters=max(2, iters // 4), warmup=1
        )
    bound = "memory" if kv_bytes / bw >= flops / peak else "compute"
    print(
        f"| {heads} | {batch} | {ctx} | {t:9.1f} | {kv_bytes / t / 1e3:7.0f} | {flops / t / 1e6:6.1f} | {bound} |"
        f" {100 * floor / t:5.1f}% | {base:9.1f} | {base / t:5.1f}x |",
        flush=True,
    )
    del cache, table, q
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, nargs="+", default=[128, 16])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--ctx", type=int, nargs="+", default=[2000, 8192, 32768])
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
    print("| H | B | ctx | kernel us | GB/s | TFLOP/s | bound | % floor | torch us | speedup |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for heads in args.heads:
        for batch in args.batch:
            for ctx in args.ctx:
                run_case(heads, batch, ctx, bw, peak, not args.no_baseline)


if __name__ == "__main__":
    main()
