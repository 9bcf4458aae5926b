"""A bounded load test of the HTTP server on the tiny model (CPU by default).

    python benchmarks/bench_api_load.py [--requests 64] [--concurrency 16] [--max-tokens 32] [--nproc 1]
    python benchmarks/bench_api_load.py --url http://127.0.0.1:8000   # an already running server

Streams completions (ignore_eos, so every request makes --max-tokens tokens) and prints requests/s,
output tokens/s, and p50/p99 of TTFT (request sent -> first token) and ITL (gap between tokens),
measured at the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx

from nmoe.serve.tiny_prompts import FIXED_PROMPTS


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def one(c: httpx.AsyncClient, i: int, max_tokens: int, ttft: list, itl: list) -> int:
    body = {"prompt": FIXED_PROMPTS[i % len(FIXED_PROMPTS)][0], "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = last = time.perf_counter()
    tokens = 0
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"request {i}: HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"request {i}: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                (itl if last != start else ttft).append(now - last)
                last = now
    return tokens


async def load(url: str, n: int, concurrency: int, max_tokens: int, key: str) -> dict:
    ttft, itl = [], []
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits, headers=headers) as c:
        async def bounded(i):
            async with sem:
                return await one(c, i, max_tokens, ttft, itl)

        await one(c, 0, 4, [], [])  # warm-up
        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(bounded(i) for i in range(n)))
        wall = time.perf_counter() - t0
    return {"requests": n, "wall_s": wall, "req_per_s": n / wall, "tok_per_s": sum(tokens) / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "itl_p50": pct(itl, 0.5),
            "itl_p99": pct(itl, 0.99), "itl_mean": statistics.fmean(itl) if itl else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="an already running server (default: start the tiny model)")
    p.add_argument("--api-key", default="")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--nproc", type=int, default=1, help="ranks (torchrun) of the started server")
    args = p.parse_args()
    if args.url:
        res = asyncio.run(load(args.url, args.requests, args.concurrency, args.max_tokens, args.api_key))
    else:
        from nmoe.serve.api import ServerProcess

        with ServerProcess(["--model", "tiny", "--max-seq-len", "512"], nproc=args.nproc) as srv:
            res = asyncio.run(load(srv.url, args.requests, args.concurrency, args.max_tokens, ""))
    print(f"{res['requests']} requests, concurrency {args.concurrency}, {args.max_tokens} tokens each, "
          f"{args.nproc} rank(s): {res['wall_s']:.2f} s")
    print(f"  requests/s {res['req_per_s']:.2f}   output tokens/s {res['tok_per_s']:.1f}")
    print(f"  TTFT p50 {res['ttft_p50'] * 1e3:.1f} ms   p99 {res['ttft_p99'] * 1e3:.1f} ms")
    print(f"  ITL  p50 {res['itl_p50'] * 1e3:.1f} ms   p99 {res['itl_p99'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
