"""Ceilings measured in the same run (device copy bandwidth, dense bf16 matmul rate) and timers."""

from __future__ import annotations

import torch


def time_us(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median-free mean time of `fn()` in microseconds, by CUDA events over `iters` back-to-back calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def hbm_bandwidth() -> float:
    """Bytes/s of a 4 GiB device-to-device copy, counting read + write."""
    x = torch.empty(2**30, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    t = time_us(lambda: y.copy_(x), iters=10)
    return 2 * x.numel() * 4 / (t * 1e-6)


def bf16_matmul_rate() -> float:
    """FLOP/s of an 8192^3 bf16 matmul on random data."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_us(lambda: a @ b, iters=20)
    return 2 * n**3 / (t * 1e-6)


def graph_time_us(fn, calls: int = 10, replays: int = 10) -> float | None:
    """Device time of one fn() from `calls` captured back to back in a CUDA graph; None if capture fails."""
    try:
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / (calls * replays)
    except RuntimeError as e:
        print(f"(graph capture failed: {e}; eager times only)", flush=True)
        return None
