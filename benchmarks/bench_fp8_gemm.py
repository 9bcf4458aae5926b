"""Times the FP8 ops of nmoe._C on the DeepSeek-V3 shapes, beside baselines, against measured ceilings.

    python benchmarks/bench_fp8_gemm.py [--json out.json] [--quick] [--sweep] [--split-sweep 32] [--ops quant,...]

Ceilings are measured in the same run: HBM bandwidth as a device-to-device copy (bytes read + written
per second) and dense BF16 matmul TFLOP/s (8192^3). Every time is the median of CUDA-event timings;
where a row also has a graph time (calls replayed back to back from a CUDA graph), its rates and
fractions are taken from the shorter of the two (a single eager call's events hold its launch too).
Baselines: a per-expert loop of torch._scaled_mm (block-scaled 1x128 / 128x128 when this torch
supports it, else row-wise scaled, which is a cheaper recipe), and BF16 torch.matmul on dequantized
weights (dequantized before timing).

--split-sweep M times the dense GEMMs of a decode step at M rows, in CUDA graphs: the dense decode
kernel with its automatic K-slice count against every count that divides k / 128 (forced through
torch.ops.nmoe._fp8_split_k_override), beside the grouped kernel's swapped configuration unsplit on
the same call (the baseline: forced through _fp8_gemm_override).

--sweep instead times every GEMM kernel configuration compiled into nmoe._C (forced through
torch.ops.nmoe._fp8_gemm_override) in both raster orders on the grouped and dense shapes, with the
error of each against the fp32 reference: the data to choose between them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

from nmoe.serve.ops import moe_gemm
from nmoe.serve.ops._ext import cuda_ops_available
from nmoe.serve.ops.fp8 import (
    FP8,
    dequant_block_fp8,
    fp8_gemm,
    fp8_gemm_ref,
    quant_block_fp8,
    quant_fp8_act,
    quant_fp8_act_ref,
)


def median_ms(fn, *args, iters: int = 20, warmup: int = 3) -> float:
    """Median CUDA-event time of `fn(*args)` in milliseconds."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, *args, iters: int = 20, per_graph: int = 10) -> float:
    """Median time of one call of `fn(*args)` when `per_graph` calls are replayed from a CUDA graph."""
    fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn(*args)
    return median_ms(graph.replay, iters=iters) / per_graph


def run_all(fns) -> None:
    for f in fns:
        f()


def bf16_expert_loop(xb, wb, bounds) -> None:
    for g in range(wb.shape[0]):
        xb[bounds[g] : bounds[g + 1]] @ wb[g].t()


def ceilings() -> dict:
    n = 1 << 30  # 1 GiB each way
    src, dst = (
        torch.empty(n, dtype=torch.uint8, device="cuda"),
        torch.empty(n, dtype=torch.uint8, device="cuda"),
    )
    copy_gbs = 2 * n / median_ms(dst.copy_, src) / 1e6
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_tflops = 2 * 8192**3 / median_ms(torch.matmul, a, b) / 1e9
    return {"hbm_copy_GBps": copy_gbs, "bf16_mm_TFLOPs": mm_tflops}


def expert_weights(e: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.empty(e, n, k, dtype=FP8, device="cuda")
    s = torch.empty(e, -(-n // 128), -(-k // 128), device="cuda")
    for g in range(e):
        w[g], s[g] = quant_block_fp8(torch.randn(n, k, device="cuda") * 0.02)
    return w, s


def scaled_mm_fn(xq, xs, w, ws):
    """A torch._scaled_mm call for one expert: block-scaled if supported, else row-wise. -> (fn, recipe)."""
    ref = fp8_gemm(xq, xs, w, ws).float()
    variants = [
        ("block", lambda: (xs.t().contiguous().t(), ws.t())),
        ("block", lambda: (xs.t().contiguous().t(), ws.t().contiguous())),
    ]
    for recipe, make in variants:
        try:
            sa, sb = make()
            out = torch._scaled_mm(xq, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
            if (out.float() - ref).norm() <= 1e-2 * ref.norm():
                return (
                    lambda sa=sa, sb=sb: torch._scaled_mm(xq, w.t(), sa, sb, out_dtype=torch.bfloat16)
                ), recipe
        except (RuntimeError, TypeError):
            pass
    sa = xs.amax(dim=1, keepdim=True)
    sb = ws.amax(dim=1).repeat_interleave(128)[: w.shape[0]].view(1, -1).contiguous()
    try:
        torch._scaled_mm(xq, w.t(), sa, sb, out_dtype=torch.bfloat16)
    except (RuntimeError, TypeError):
        return None, "none"
    return (lambda: torch._scaled_mm(xq, w.t(), sa, sb, out_dtype=torch.bfloat16)), "rowwise"


def row(name, shape, ms, flops, nbytes, ceil, base_scaled=None, base_bf16=None, recipe="", graph=None):
    # The rates from the device time: a single eager call's events also hold its launch (about
    # 10 us, all of a decode-sized kernel), so the graph time where it was measured and is shorter.
    t = ms if graph is None else min(ms, graph)
    r = {
        "op": name,
        "shape": shape,
        "ms": ms,
        "TFLOPs": flops / t / 1e9,
        "GBps": nbytes / t / 1e6,
        "frac_mm": flops / t / 1e9 / ceil["bf16_mm_TFLOPs"],
        "frac_hbm": nbytes / t / 1e6 / ceil["hbm_copy_GBps"],
        "scaled_mm_loop_ms": base_scaled,
        "scaled_mm_recipe": recipe,
        "bf16_ms": base_bf16,
        "graph_ms": graph,
    }
    print(
        f"| {name} | {shape} | {ms:.3f} | {graph if graph is None else f'{graph:.3f}'} | {r['TFLOPs']:.0f} | "
        f"{r['GBps']:.0f} | {r['frac_mm']:.2f} | {r['frac_hbm']:.2f} | "
        f"{'-' if base_scaled is None else f'{base_scaled:.3f} ({recipe})'} | "
        f"{'-' if base_bf16 is None else f'{base_bf16:.3f}'} |",
        flush=True,
    )
    return r


def bench_quant(ceil, rows_out):
    """The quant kernels on prefill and decode shapes (decode's are launch-bound: see the graph column)."""
    cases = []  # (op, shape, fn, reference, input, bytes moved)
    for m in (8192, 32):
        x = torch.randn(m, 7168, device="cuda", dtype=torch.bfloat16)
        nbytes = m * 7168 * 3 + m * 7168 // 32
        cases.append(("quant_fp8_act", f"{m}x7168", quant_fp8_act, quant_fp8_act_ref, x, nbytes))
    for m in (8192, 256):
        h = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        nbytes = m * 4096 * 2 + m * 4096 // 2 + m * 4096 // 64
        silu = moe_gemm.silu_mul_quant_fp8, moe_gemm.silu_mul_quant_fp8_ref
        cases.append(("silu_mul_quant_fp8", f"{m}x2048", *silu, h, nbytes))
    for name, shape, fn, ref_fn, x, nbytes in cases:
        ref = median_ms(ref_fn, x, iters=5)  # the baseline column: the torch reference on the GPU
        ms, graph = median_ms(fn, x), graph_ms(fn, x)
        rows_out.append(row(name, shape, ms, 0, nbytes, ceil, ref, recipe="torch ref", graph=graph))


def bench_dense(ceil, rows_out, shapes, ms_list):
    for n, k in shapes:
        w, ws = expert_weights(1, n, k)
        wb = dequant_block_fp8(w[0], ws[0]).to(torch.bfloat16)
        for m in ms_list:
            xq, xs = quant_fp8_act(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            ms = median_ms(fp8_gemm, xq, xs, w[0], ws[0])
            fn, recipe = scaled_mm_fn(xq, xs, w[0], ws[0])
            base = median_ms(fn) if fn else None
            xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16 = median_ms(torch.matmul, xb, wb.t())
            nbytes = n * k + m * k + 2 * m * n
            rows_out.append(
                row("fp8_gemm", f"m={m} n={n} k={k}", ms, 2 * m * n * k, nbytes, ceil, base, bf16, recipe)
            )


def imbalanced(e: int, mean: int, cap: int | None = None) -> list[int]:
    gen = torch.Generator().manual_seed(e * mean)
    c = (mean * (0.7 + 0.6 * torch.rand(e, generator=gen))).round().long()
    if cap is not None:
        c = c.clamp(max=cap)
    return c.tolist()


def bench_contiguous(ceil, rows_out, e, tokens, shapes):
    counts = imbalanced(e, tokens // e)
    m = sum(counts)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    bounds = offsets.tolist()
    for n, k in shapes:
        w, ws = expert_weights(e, n, k)
        xq, xs = quant_fp8_act(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        ms = median_ms(moe_gemm.grouped_fp8_gemm_contiguous, xq, xs, w, ws, offsets)
        fns = [
            scaled_mm_fn(xq[bounds[g] : bounds[g + 1]], xs[bounds[g] : bounds[g + 1]], w[g], ws[g])
            for g in range(e)
        ]
        recipe = fns[0][1]
        base = median_ms(run_all, [f for f, _ in fns]) if all(f for f, _ in fns) else None
        wb = torch.stack([dequant_block_fp8(w[g], ws[g]).to(torch.bfloat16) for g in range(e)])
        xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        bf16 = median_ms(bf16_expert_loop, xb, wb, bounds)
        nbytes = e * n * k + m * k + 2 * m * n
        shape = f"E={e} m={m} n={n} k={k}"
        rows_out.append(row("grouped_contiguous", shape, ms, 2 * m * n * k, nbytes, ceil, base, bf16, recipe))


def bench_masked(ceil, rows_out, e, shapes, max_ms):
    for n, k in shapes:
        w, ws = expert_weights(e, n, k)
        wb = torch.stack([dequant_block_fp8(w[g], ws[g]).to(torch.bfloat16) for g in range(e)])
        for max_m in max_ms:
            counts = imbalanced(e, max(1, (3 * max_m) // 4), cap=max_m)
            cnt = torch.tensor(counts, dtype=torch.int32, device="cuda")
            xq, xs = quant_fp8_act(torch.randn(e * max_m, k, device="cuda", dtype=torch.bfloat16))
            xq, xs = xq.view(e, max_m, k), xs.view(e, max_m, -1)
            ms = median_ms(moe_gemm.grouped_fp8_gemm_masked, xq, xs, w, ws, cnt)
            graph = graph_ms(moe_gemm.grouped_fp8_gemm_masked, xq, xs, w, ws, cnt)
            fns = [
                scaled_mm_fn(xq[g, : max(c, 1)], xs[g, : max(c, 1)], w[g], ws[g])
                for g, c in enumerate(counts)
            ]
            recipe = fns[0][1]
            base = median_ms(run_all, [f for f, _ in fns]) if all(f for f, _ in fns) else None
            xb = torch.randn(e, max_m, k, device="cuda", dtype=torch.bfloat16)
            bf16 = median_ms(torch.bmm, xb, wb.transpose(1, 2))
            m = sum(counts)
            nbytes = e * n * k  # the weights: what decode must stream
            shape = f"E={e} max_m={max_m} m={m} n={n} k={k}"
            rows_out.append(
                row("grouped_masked", shape, ms, 2 * m * n * k, nbytes, ceil, base, bf16, recipe, graph=graph)
            )


def err(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2*sum(xy)/sum(x^2+y^2) in float64 (the tests' metric)."""
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def sweep_cases(quick: bool):
    """(name, fn(), reference rows, valid-row selector, flops, bytes, graph?) per shape of issue 7.

    The references are fp32 matmuls of the dequantized operands in TF32 (seconds in full fp32 at these
    sizes): an error floor near 1e-7, far below what a broken configuration shows.
    """
    torch.backends.cuda.matmul.allow_tf32 = True
    e = 32
    counts = imbalanced(e, 8192 // e)
    m = sum(counts)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    shapes = [(4096, 7168), (7168, 2048)]
    for n, k in shapes:
        w, ws = expert_weights(e, n, k)
        xq, xs = quant_fp8_act(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        want = moe_gemm.grouped_fp8_gemm_contiguous_ref(xq, xs, w, ws, offsets)
        yield (
            f"contiguous E={e} m={m} n={n} k={k}",
            lambda xq=xq, xs=xs, w=w, ws=ws: moe_gemm.grouped_fp8_gemm_contiguous(xq, xs, w, ws, offsets),
            want,
            None,
            2 * m * n * k,
            e * n * k + m * k + 2 * m * n,
            False,
        )
        del want
        for max_m in [8, 32, 64] if not quick else [32]:
            mc = imbalanced(e, max(1, (3 * max_m) // 4), cap=max_m)
            cnt = torch.tensor(mc, dtype=torch.int32, device="cuda")
            mq, ms = quant_fp8_act(torch.randn(e * max_m, k, device="cuda", dtype=torch.bfloat16))
            mq, ms = mq.view(e, max_m, k), ms.view(e, max_m, -1)
            valid = torch.arange(max_m, device="cuda")[None, :] < cnt[:, None]
            want = moe_gemm.grouped_fp8_gemm_masked_ref(mq, ms, w, ws, cnt)
            yield (
                f"masked E={e} max_m={max_m} m={sum(mc)} n={n} k={k}",
                lambda mq=mq, ms=ms, w=w, ws=ws, cnt=cnt: moe_gemm.grouped_fp8_gemm_masked(
                    mq, ms, w, ws, cnt
                ),
                want,
                valid,
                2 * sum(mc) * n * k,
                e * n * k,
                True,
            )
        del w, ws
    for n, k in [(24576, 1536), (7168, 16384), (2112, 7168)] if not quick else [(7168, 16384)]:
        w, ws = expert_weights(1, n, k)
        for dm in (32, 4096):
            xq, xs = quant_fp8_act(torch.randn(dm, k, device="cuda", dtype=torch.bfloat16))
            want = fp8_gemm_ref(xq, xs, w[0], ws[0])
            yield (
                f"dense m={dm} n={n} k={k}",
                lambda xq=xq, xs=xs, w=w, ws=ws: fp8_gemm(xq, xs, w[0], ws[0]),
                want,
                None,
                2 * dm * n * k,
                n * k + dm * k + 2 * dm * n,
                False,
            )


def sweep(ceil, quick: bool, skip_names: list[str]) -> list[dict]:
    """Every configuration x raster order on every sweep case; prints one row per (case, config)."""
    assert cuda_ops_available(), "--sweep needs the nmoe._C extension"  # loads it: the knobs live there
    ops = torch.ops.nmoe
    count = ops._fp8_gemm_override(-1, -1)
    names = [ops._fp8_gemm_config(i) for i in range(count)]
    skip = {names.index(n) for n in skip_names if n in names}
    print(
        "| case | config | raster | ms | graph ms | TFLOP/s | GB/s | of HBM | err |\n|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for name, fn, want, valid, flops, nbytes, graph in sweep_cases(quick):
        for cfg in [-1, *range(count)]:
            for raster in (0, 1) if cfg >= 0 and not name.startswith("dense") else (-1,):
                if cfg in skip:
                    continue
                ops._fp8_gemm_override(cfg, raster)
                try:
                    out = fn()
                    e = err(out[valid], want[valid]) if valid is not None else err(out, want)
                    ms = median_ms(fn)
                    gms = graph_ms(fn) if graph else None
                except RuntimeError as exc:  # a configuration CUTLASS rejects for this shape
                    print(f"| {name} | {names[cfg] if cfg >= 0 else 'auto'} | failed: {str(exc)[:100]} |")
                    continue
                finally:
                    ops._fp8_gemm_override(-1, -1)
                best = gms if gms is not None else ms
                r = {
                    "case": name,
                    "config": names[cfg] if cfg >= 0 else "auto",
                    "raster": "MN"[raster] if raster >= 0 else "-",
                    "ms": ms,
                    "graph_ms": gms,
                    "TFLOPs": flops / best / 1e9,
                    "GBps": nbytes / best / 1e6,
                    "frac_hbm": nbytes / best / 1e6 / ceil["hbm_copy_GBps"],
                    "err": e,
                }
                rows.append(r)
                print(
                    f"| {name} | {r['config']} | {r['raster']} | {ms:.4f} | "
                    f"{'-' if gms is None else f'{gms:.4f}'} | {r['TFLOPs']:.0f} | {r['GBps']:.0f} | "
                    f"{r['frac_hbm']:.2f} | {e:.1e} |",
                    flush=True,
                )
        del fn, want, valid
    return rows


# The dense FP8 GEMMs of a DeepSeek-V3 decode step (n, k) and their calls per step at full depth:
# per layer q_a + kv_a fused, q_b, o_proj; per MoE layer (58) the shared expert's gate + up and
# down; per dense layer (3) the MLP's.
DECODE_DENSE = {
    (2112, 7168): 61, (24576, 1536): 61, (7168, 16384): 61,
    (4096, 7168): 58, (7168, 2048): 58, (36864, 7168): 3, (7168, 18432): 3,
}


def rotate(xq, xs, w, ws) -> None:
    """fp8_gemm of x with each of the stacked weights in turn."""
    for i in range(w.shape[0]):
        fp8_gemm(xq, xs, w[i], ws[i])


def split_sweep(ceil, m: int, json_path: str | None) -> None:
    """Each decode dense shape at m rows: the automatic K-slice count and every count that divides
    k / 128 (up to 32), forced through torch.ops.nmoe._fp8_split_k_override and timed in a CUDA
    graph, beside the grouped kernel unsplit on the same call; the best per shape and what it would
    save per decode step."""
    assert cuda_ops_available()  # loads nmoe._C, which registers the ops
    ops = torch.ops.nmoe
    names = [ops._fp8_gemm_config(i) for i in range(ops._fp8_gemm_override(-1, -1))]
    grouped = names.index("s256x16" if m <= 16 else "s256x32" if m <= 32 else "s256x64")
    print("| n | k | splits | graph us | GB/s | of copy | err |\n|---|---|---|---|---|---|---|")
    best: dict[str, int] = {}
    saved = 0.0
    for (n, k), calls in DECODE_DENSE.items():
        # copies of the weight, called in turn, that together overflow the L2 cache: each call
        # reads HBM as a decode step's (every layer's weights distinct) does
        copies = max(2, min(20, -(-(256 << 20) // (n * k))))
        w, ws = expert_weights(copies, n, k)
        xq, xs = quant_fp8_act(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        want = fp8_gemm_ref(xq, xs, w[0], ws[0])
        nbytes = n * k + m * k + 2 * m * n
        kb = k // 128

        def row(label, e, t, n=n, k=k, nbytes=nbytes):
            print(f"| {n} | {k} | {label} | {t * 1e3:.1f} | {nbytes / t / 1e6:.0f} | "
                  f"{nbytes / t / 1e6 / ceil['hbm_copy_GBps']:.2f} | {e:.1e} |", flush=True)

        ops._fp8_gemm_override(grouped, -1)
        try:
            e = err(fp8_gemm(xq, xs, w[0], ws[0]).float(), want)
            t_grouped = graph_ms(rotate, xq, xs, w, ws, per_graph=1) / copies
        finally:
            ops._fp8_gemm_override(-1, -1)
        row(f"grouped {names[grouped]}", e, t_grouped)
        times = {}
        for splits in [0] + [d for d in range(1, min(kb, 32) + 1) if kb % d == 0]:
            ops._fp8_split_k_override(n, k, splits)
            try:
                e = err(fp8_gemm(xq, xs, w[0], ws[0]).float(), want)
                t = graph_ms(rotate, xq, xs, w, ws, per_graph=1) / copies
            finally:
                ops._fp8_split_k_override(n, k, 0)
            if e < 1e-3:  # the tests' bound: a count that computes wrong is never "best"
                times[splits] = t
            row(splits or "auto", e, t)
        s_best = min((s for s in times if s), key=lambda s: times[s], default=0)
        if s_best and 0 in times and times[s_best] < 0.97 * times[0]:
            best[f"{n},{k}"] = s_best
            saved += (times[0] - times[s_best]) * calls
        print(f"| {n} | {k} | best {s_best} | {times.get(s_best, math.nan) * 1e3:.1f} "
              f"(auto {times.get(0, math.nan) * 1e3:.1f}, grouped {t_grouped * 1e3:.1f}) | | | |")
        del w, ws
    print(f"forcing the best splits would save {saved:.2f} ms per full-depth decode step: {best}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(best, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows and ceilings here")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--sweep", action="store_true", help="time every GEMM configuration instead")
    parser.add_argument("--skip", default="", help="--sweep: comma-separated configurations to leave out")
    parser.add_argument("--ops", default="quant,dense,contiguous,masked", help="which tables (comma-separated)")
    parser.add_argument("--split-sweep", type=int, metavar="M", help="time every K-slice count of the decode "
                        "dense shapes at M rows instead (--json: the best per shape)")
    args = parser.parse_args()
    ops = set(args.ops.split(","))
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ceil = ceilings()
    print(
        f"ceilings: HBM copy {ceil['hbm_copy_GBps']:.0f} GB/s, bf16 matmul {ceil['bf16_mm_TFLOPs']:.0f} TFLOP/s\n"
    )
    if args.split_sweep:
        return split_sweep(ceil, args.split_sweep, args.json)
    if args.sweep:
        rows = sweep(ceil, args.quick, [n for n in args.skip.split(",") if n])
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ceilings": ceil, "sweep": rows}, f, indent=1)
        return
    print(
        "| op | shape | ours ms | ours ms (graph) | TFLOP/s | GB/s | of bf16 mm | of HBM | "
        "scaled_mm loop ms | bf16 ms |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    rows: list[dict] = []
    if "quant" in ops:
        bench_quant(ceil, rows)
    if "dense" in ops:
        dense = [(24576, 1536), (7168, 16384), (2112, 7168)] if not args.quick else [(7168, 16384)]
        bench_dense(ceil, rows, dense, [32, 4096])
    if "contiguous" in ops:
        bench_contiguous(ceil, rows, 32, 8192, [(4096, 7168), (7168, 2048)])
    if "masked" in ops:
        bench_masked(ceil, rows, 32, [(4096, 7168), (7168, 2048)], [8, 32, 64] if not args.quick else [32])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceilings": ceil, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
