"""Prefill attention of one chunk over its cached context (the naive MLA form, `MLA._prefill_sdpa`:
the context expanded through kv_b_proj a group of heads at a time, torch SDPA with a lower-right
causal mask), per SDPA backend, beside the bf16 matmul rate measured in the same run.

FLOPs = 2 * heads * (qk 192 + v 128) * (query, key) pairs under the mask; "% matmul" = FLOPs / time
over the measured matmul rate. Rows: the shipped call (`MLA.PREFILL_SDPA_BACKENDS`, cuDNN first)
and the memory-efficient kernel alone. Queries of 2048 are a long prompt's chunk, 256 a mixed
step's prefill budget. (Flash takes no mask and needs v as wide as q and k: it refuses these.)

    python benchmarks/bench_prefill_attention.py [--q 256 2048] [--ctx 4096 32768 131072]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _roofline import bf16_matmul_rate, time_us  # noqa: E402

from nmoe.serve.model import MLA, lower_right_causal_mask  # noqa: E402
from nmoe.serve.random_weights import deepseek_v3_config  # noqa: E402


def make_mla() -> MLA:
    """DeepSeek-V3's layer-0 attention, only kv_b_proj materialized (all `_prefill_sdpa` reads)."""
    with torch.device("meta"):
        mla = MLA(deepseek_v3_config(4), 0, fp8=True)
    mla.kv_b_proj.weight = torch.nn.Parameter(
        torch.randn(128 * 256, 512, device="cuda", dtype=torch.bfloat16) * 512**-0.5, requires_grad=False)
    return mla


def attend(mla: MLA, backends, *inputs) -> torch.Tensor:
    """`_prefill_sdpa` with `backends` (names of SDPBackend, in priority order)."""
    shipped = MLA.PREFILL_SDPA_BACKENDS
    MLA.PREFILL_SDPA_BACKENDS = backends
    try:
        q_nope, c_kv = inputs[0], inputs[2]
        return mla._prefill_sdpa(*inputs, lower_right_causal_mask(q_nope.shape[0], c_kv.shape[0], c_kv.device))
    finally:
        MLA.PREFILL_SDPA_BACKENDS = shipped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--q", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--ctx", type=int, nargs="+", default=[4096, 32768, 131072])
    args = ap.parse_args()
    peak = bf16_matmul_rate()
    mla = make_mla()
    h = mla.n_heads
    print(f"bf16 matmul {peak / 1e12:.0f} TFLOP/s; {h} heads")
    rows = []
    for q, n in ((q, n) for q in args.q for n in args.ctx if q <= n):
        pairs = q * (n - q) + q * (q + 1) // 2
        flops = 2 * h * (192 + 128) * pairs
        qn = torch.randn(q, h, 128, device="cuda", dtype=torch.bfloat16)
        qp = torch.randn(q, h, 64, device="cuda", dtype=torch.bfloat16)
        c_kv = torch.randn(n, 512, device="cuda", dtype=torch.bfloat16)
        k_pe = torch.randn(n, 64, device="cuda", dtype=torch.bfloat16)
        ref = None
        for name, backends in (("shipped", MLA.PREFILL_SDPA_BACKENDS), ("efficient", ("EFFICIENT_ATTENTION",))):
            call = functools.partial(attend, mla, backends, qn, qp, c_kv, k_pe)
            try:
                out = call()
                t = time_us(call, iters=3 if n > 65536 else 10, warmup=1)
            except RuntimeError as e:
                rows.append((q, n, name, None, None, str(e).split("\n")[0][:60]))
                continue
            ref = out if ref is None else ref
            diff = (out.float() - ref.float()).abs().max().item()
            rows.append((q, n, name, t, flops / (t * 1e-6), f"max diff vs shipped {diff:.2e}"))
    print("| queries | ctx | call | ms | TFLOP/s | % matmul | note |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for q, n, name, t, rate, note in rows:
        if t is None:
            print(f"| {q} | {n} | {name} | n/a | | | {note} |")
        else:
            print(f"| {q} | {n} | {name} | {t / 1e3:.2f} | {rate / 1e12:.0f} | {100 * rate / peak:.0f}% | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
