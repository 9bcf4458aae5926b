"""The DeepSeek-V3 router on decode batches: the fused gate + route op against the two-op path.

    python benchmarks/bench_router.py [--tokens 1,8,32,64,128] [--hidden 7168] [--experts 256]

Per batch of T tokens: torch.ops.nmoe.moe_gate_route (the gate GEMM in K slices, then the slices'
sum and the route: two kernels), the two-op path it replaced (cuBLAS BF16 x BF16 -> fp32 logits,
then torch.ops.nmoe.moe_route) and the torch reference on the GPU, each replayed from a CUDA graph
(device time, launches included). The floor is the gate weight and the activations read once at
the copy bandwidth measured in the same run. `same ids` is the share of rows where the fused op and
the two-op path choose the same experts (their fp32 logits differ in summation order only, so a
near tie may go either way; tests/cuda/test_router_fused.py holds the exact checks).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _roofline import graph_time_us, hbm_bandwidth  # noqa: E402

from nmoe.serve.ops.router import _route_args, gate_logits, moe_route, moe_route_ref  # noqa: E402

ROUTE = dict(n_group=8, topk_group=4, top_k=8, norm_topk_prob=True, routed_scaling_factor=2.5)


def two_op(x, w, bias):
    return moe_route(gate_logits(x, w), bias, **ROUTE)


def reference(x, w, bias):
    return moe_route_ref(gate_logits(x, w), bias, **ROUTE)


def fused(x, w, bias):
    return torch.ops.nmoe.moe_gate_route(x, w, bias, *_route_args(ROUTE))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,8,32,64,128")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=256)
    args = ap.parse_args()
    import nmoe._C  # noqa: F401  (the ops; fails clearly where the extension is not built)

    bw = hbm_bandwidth()
    g = torch.Generator(device="cuda").manual_seed(0)
    e, h = args.experts, args.hidden
    w = (torch.randn(e, h, device="cuda", generator=g) * h**-0.5).to(torch.bfloat16)
    bias = torch.randn(e, device="cuda", generator=g) * 0.01
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s; E={e} hidden={h}")
    print("| T | floor us | fused us | x floor | two-op us | torch ref us | fused vs two-op | same ids |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for t in (int(s) for s in args.tokens.split(",")):
        x = torch.randn(t, h, device="cuda", generator=g).to(torch.bfloat16)
        idf, id2 = fused(x, w, bias)[1], two_op(x, w, bias)[1]
        same = (idf == id2).all(dim=1).float().mean().item()
        floor = (e * h + t * h) * 2 / bw * 1e6
        times = [graph_time_us(functools.partial(f, x, w, bias)) for f in (fused, two_op, reference)]
        ft, tt, rt = (float("nan") if v is None else v for v in times)
        print(f"| {t} | {floor:.2f} | {ft:.2f} | {ft / floor:.1f} | {tt:.2f} | {rt:.1f} | {tt / ft:.2f}x | {same:.3f} |", flush=True)


if __name__ == "__main__":
    main()
