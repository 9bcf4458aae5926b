"""Host cost of the scheduler per step: schedule() + complete(), no model.

    python benchmarks/bench_scheduler.py [--steps 2000] [--repeats 4]

Scenarios: steady decode of 256 sequences with 2000-token contexts (page 64), with and without the
prefix cache; a 128k-token prompt prefilled in 2048-token chunks while 32 sequences decode. The
engine's part (appending a sampled token) is not timed. The batch helpers the engine calls to build
its tensors (input_ids, positions, out_loc) are timed separately.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time

from nmoe.serve.scheduler import Batch, Scheduler, SchedulerConfig, SeqStatus, Sequence

VOCAB = 129280
PAGE = 64


def new_seq(rid: int, rng: random.Random, n: int, max_new: int) -> Sequence:
    tokens = [rng.randrange(VOCAB) for _ in range(n)]
    return Sequence(rid=rid, token_ids=tokens, num_prompt_tokens=n, max_new_tokens=max_new)


def sample(batch: Batch, rng: random.Random) -> None:
    for it in batch.items:
        if it.reaches_end and it.seq.status is SeqStatus.RUNNING:
            it.seq.token_ids.append(rng.randrange(VOCAB))


def timed_step(sched: Scheduler, rng: random.Random) -> tuple[float, float, float, Batch]:
    """One step; (schedule + complete CPU us, same in wall-clock us, helpers CPU us, batch).

    CPU time (this thread's) is the headline: it does not count time the OS gave to other processes."""
    cpu, wall = time.thread_time_ns, time.perf_counter_ns
    c0, w0 = cpu(), wall()
    batch = sched.schedule()
    c1, w1 = cpu(), wall()
    batch.input_ids()
    batch.positions()
    batch.out_loc(PAGE)
    c2, w2 = cpu(), wall()
    sched.complete(batch)
    c3, w3 = cpu(), wall()
    sample(batch, rng)
    return (c1 - c0 + c3 - c2) / 1e3, (w1 - w0 + w3 - w2) / 1e3, (c2 - c1) / 1e3, batch


def warm_decoders(sched: Scheduler, rng: random.Random, n: int, ctx: int, max_new: int) -> list[Sequence]:
    """Add `n` sequences and run (untimed) until every one of them is decoding."""
    seqs = [new_seq(i, rng, ctx, max_new) for i in range(n)]
    for s in seqs:
        sched.add(s)
    while any(s.status is SeqStatus.WAITING or s.num_computed < len(s.token_ids) - 1 for s in seqs):
        batch = sched.schedule()
        sched.complete(batch)
        sample(batch, rng)
    return seqs


def bench_decode(steps: int, prefix: bool) -> tuple[list[float], list[float], list[float]]:
    rng = random.Random(0)
    n, ctx = 256, 2000
    pages = n * -(-(ctx + steps + 8) // PAGE) + 64
    # a budget that prefills everyone in the first (untimed) step, so all contexts grow together
    cfg = SchedulerConfig(
        num_pages=pages,
        page_size=PAGE,
        max_batch_size=n,
        max_prefill_tokens=n * ctx,
        enable_prefix_cache=prefix,
    )
    sched = Scheduler(cfg)
    warm_decoders(sched, rng, n, ctx, steps + 8)
    cost, wall, helpers = [], [], []
    for _ in range(steps):
        c, w, h, batch = timed_step(sched, rng)
        assert len(batch.items) == n and all(it.is_decode for it in batch.items)
        cost.append(c)
        wall.append(w)
        helpers.append(h)
    return cost, wall, helpers


def bench_long_prefill(repeats: int) -> tuple[list[float], list[float], list[float]]:
    rng = random.Random(1)
    prompt, chunk, n_dec = 131072, 2048, 32
    steps_per_prompt = prompt // chunk
    dec_len = 2000 + repeats * (steps_per_prompt + 1) + 8
    pages = -(-(prompt + 8) // PAGE) + n_dec * -(-dec_len // PAGE) + 64
    cfg = SchedulerConfig(
        num_pages=pages, page_size=PAGE, max_seq_len=prompt + 16, chunk_size=chunk, max_prefill_tokens=8192
    )
    sched = Scheduler(cfg)
    warm_decoders(sched, rng, n_dec, 2000, dec_len - 2000)
    cost, wall, helpers = [], [], []
    for r in range(repeats):
        big = new_seq(1000 + r, rng, prompt, 1)
        sched.add(big)
        for _ in range(steps_per_prompt):
            c, w, h, batch = timed_step(sched, rng)
            assert len(batch.items) == n_dec + 1 and batch.items[-1].num_tokens == chunk
            cost.append(c)
            wall.append(w)
            helpers.append(h)
        sched.finish(big)
        sched.prefix_cache.evict(sched.allocator.num_total)  # next prompt starts cold
    return cost, wall, helpers


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000, help="timed decode steps")
    ap.add_argument("--repeats", type=int, default=4, help="128k prompts prefilled (64 steps each)")
    args = ap.parse_args()
    gc.collect()
    rows = [
        ("decode: 256 seqs x 2000 ctx, prefix cache on", *bench_decode(args.steps, True)),
        ("decode: 256 seqs x 2000 ctx, prefix cache off", *bench_decode(args.steps, False)),
        ("prefill: 128k prompt, chunk 2048, + 32 decodes", *bench_long_prefill(args.repeats)),
    ]
    print(f"{'scenario':<48} {'steps':>6} {'median us':>10} {'p99 us':>9} {'wall median':>12} {'helpers':>8}")
    for name, cost, wall, helpers in rows:
        print(
            f"{name:<48} {len(cost):>6} {statistics.median(cost):>10.1f} {p99(cost):>9.1f}"
            f" {statistics.median(wall):>12.1f} {statistics.median(helpers):>8.1f}"
        )
    print(
        "us per step of schedule() + complete(), thread CPU time (wall median beside it); "
        "helpers: median CPU us of input_ids + positions + out_loc"
    )


if __name__ == "__main__":
    main()
