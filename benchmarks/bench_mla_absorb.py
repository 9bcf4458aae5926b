"""The absorbed projections around MLA decode: the fused kernels (`mla_absorb_q`: W_UK per head +
rope + the query's assembly; `mla_absorb_out`: W_UV per head + o_proj's FP8 quantization) against
what the engine ran before in the same run (cuBLAS batched matmuls + `mla_decode_q`, and batched
matmul + `quant_fp8_act`). Device time per call from CUDA graphs over 8 copies of the weights
(134 MB per side, more than the L2 holds, so each call reads its weights from HBM as a decode step
does). Floor = bytes read and written / the copy bandwidth measured in the same run.

    python benchmarks/bench_mla_absorb.py [--batch 1 32 64 256] [--heads 128]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _roofline import graph_time_us, hbm_bandwidth  # noqa: E402

NOPE, V, R, D, COPIES = 128, 128, 512, 64, 8


def cycling(fn, copies):
    """fn(copy) over the copies in turn: each captured call reads another copy's weights."""
    it = itertools.cycle(copies)
    return lambda: fn(next(it))


def run_case(batch: int, heads: int, bw: float):
    from nmoe.serve.ops.attention import mla_absorb_out, mla_absorb_q, mla_decode_q
    from nmoe.serve.ops.fp8 import quant_fp8_act

    g = torch.Generator(device="cuda").manual_seed(batch)
    ws = [torch.randn(heads, NOPE + V, R, device="cuda", generator=g).mul_(0.05).to(torch.bfloat16)
          for _ in range(COPIES)]
    q = torch.randn(batch, heads, NOPE + D, device="cuda", generator=g).to(torch.bfloat16)
    q_nope, q_pe = q[..., :NOPE], q[..., NOPE:]
    angles = torch.rand(batch, D // 2, device="cuda", generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    o_lat = torch.randn(batch, heads, R, device="cuda", generator=g).to(torch.bfloat16)
    w_bytes = heads * NOPE * R * 2
    rows = []
    q_bytes = w_bytes + batch * heads * (NOPE + D + R + D) * 2
    fused = graph_time_us(cycling(lambda w: mla_absorb_q(q_nope, w[:, :NOPE], q_pe, cos, sin), ws))
    base = graph_time_us(cycling(lambda w: mla_decode_q(torch.bmm(q_nope.transpose(0, 1), w[:, :NOPE]), q_pe,
                                                        cos, sin), ws))
    rows.append(("query: W_UK + rope", q_bytes, fused, base))
    o_bytes = w_bytes + batch * heads * (R * 2 + V + 4)
    fused = graph_time_us(cycling(lambda w: mla_absorb_out(o_lat, w[:, NOPE:], quantize=True), ws))
    base = graph_time_us(cycling(lambda w: quant_fp8_act(torch.bmm(o_lat.transpose(0, 1), w[:, NOPE:].transpose(1, 2))
                                                         .transpose(0, 1)), ws))
    rows.append(("output: W_UV + quant", o_bytes, fused, base))
    for name, nbytes, t, tb in rows:
        floor = nbytes / bw * 1e6
        print(f"| {heads} | {batch} | {name} | {t:.1f} | {floor / t:.0%} | {tb:.1f} | {tb / t:.2f}x | {floor:.1f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 64, 256])
    ap.add_argument("--heads", type=int, nargs="+", default=[128])
    args = ap.parse_args()
    try:
        import nmoe._C  # noqa: F401
    except ImportError:
        pass
    assert hasattr(torch.ops.nmoe, "mla_absorb_q"), "nmoe._C is not built"
    bw = hbm_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s")
    print("| H | B | op | fused us | of floor | before us | speedup | floor us |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for heads in args.heads:
        for batch in args.batch:
            run_case(batch, heads, bw)


if __name__ == "__main__":
    main()
