"""Control plane across ranks: `torchrun --nproc_per_node=8 -m nmoe.serve.test_control_plane_dp8`.

Rank 0 submits requests through the control plane (no HTTP) while every rank runs the orchestrator:
  - requests are owned by ranks other than 0 (1, 2, 3 at world size >= 4); each streams updates
    that arrive in order and add up to its final text; the tiny model's prompts complete correctly;
  - a cancelled request finishes "cancelled" and its owner's pages return;
  - a request failed on its owner (an injected per-request fault) finishes "error" with the message,
    and one only its owner can reject (it needs more KV pages than a rank has) finishes "error" with
    the owner's message; the other requests and ranks carry on;
  - a second round after all that completes, then every rank shuts down together.
Exits non-zero on any failure; `NMOE_TEST_TIMEOUT_S` bounds the wall clock.
"""

from __future__ import annotations

import faulthandler
import sys
import threading
import time

import torch

from nmoe.serve.config import ServeConfig
from nmoe.serve.control_plane import INTERNAL, INVALID, ControlPlane, Update, run_with_driver
from nmoe.serve.dist import RankInfo, init_dist
from nmoe.serve.engine import Engine
from nmoe.serve.env import ENV
from nmoe.serve.orchestrator import Orchestrator
from nmoe.serve.request import SamplingParams
from nmoe.serve.tiny_prompts import FIXED_PROMPTS

FAULT_MARK = 7  # prompt token that tells the owner (in this test only) to fail the request
NUM_PAGES, PAGE_SIZE = 16, 16  # 256 tokens of KV per rank, below max_seq_len: the owner's own check


class FaultOnOwner(ControlPlane):
    """Fails, on its owner, a request whose prompt ends in FAULT_MARK once it has two tokens."""

    def after_step(self, orch, touched, finished) -> None:
        for req in touched:
            if req.prompt_ids[-1] == FAULT_MARK and len(req.output_ids) >= 2 and req.finish_reason is None:
                orch.engine.fail(req.rid, f"injected fault on rank {self.rank}")
        finished = finished + orch.engine.pop_finished()
        super().after_step(orch, touched, finished)


class Recorder:
    """Each request's updates, in arrival order, and the rank that owned it."""

    def __init__(self, cp: ControlPlane):
        self.cp = cp
        self.owners: dict[int, int | None] = {}
        self.updates: dict[int, list[Update]] = {}
        self.done: dict[int, threading.Event] = {}
        self.lock = threading.Lock()

    def sink_for(self, key: int):
        self.updates[key] = []
        self.done[key] = threading.Event()

        def sink(u: Update) -> None:
            if key not in self.owners:  # the first update: the request is still live on its owner
                self.owners[key] = self.cp.owner_of(u.uid)
            with self.lock:
                self.updates[key].append(u)
            if u.finish_reason is not None:
                self.done[key].set()

        return sink

    def wait(self, key: int, timeout: float) -> list[Update]:
        if not self.done[key].wait(timeout):
            raise AssertionError(f"request {key} did not finish within {timeout} s")
        with self.lock:
            return list(self.updates[key])

    def tokens(self, key: int) -> int:
        with self.lock:
            return sum(len(u.token_ids) for u in self.updates[key])


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


def check_stream(ups: list[Update], key) -> tuple[list[int], str]:
    check(sum(u.finish_reason is not None for u in ups) == 1 and ups[-1].finish_reason is not None,
          f"{key}: exactly one finish, last: {[u.finish_reason for u in ups]}")
    ids = [t for u in ups for t in u.token_ids]
    return ids, "".join(u.text for u in ups)


def scenario(cp: ControlPlane, tok, world: int, timeout: float) -> None:
    rec = Recorder(cp)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    n_ok = max(3, min(world - 1, 4))
    normal = {}
    for i in range(n_ok):
        prompt, want = FIXED_PROMPTS[i % len(FIXED_PROMPTS)]
        normal[i] = (cp.submit(tok.encode(prompt), greedy, rec.sink_for(i)), want)
    cancel_uid = cp.submit(tok.encode("The capital of Spain is"), SamplingParams(max_tokens=200, ignore_eos=True),
                           rec.sink_for(100))
    fault_uid = cp.submit(tok.encode("Fault here") + [FAULT_MARK], SamplingParams(max_tokens=40, ignore_eos=True),
                          rec.sink_for(101))
    late_uid = cp.submit(tok.encode(FIXED_PROMPTS[0][0]), SamplingParams(max_tokens=NUM_PAGES * PAGE_SIZE + 8),
                         rec.sink_for(102))

    deadline = time.monotonic() + timeout
    while rec.tokens(100) < 2:
        check(time.monotonic() < deadline, "the request to cancel never produced tokens")
        time.sleep(0.01)
    cp.cancel(cancel_uid)

    for i, (_, want) in normal.items():
        ids, text = check_stream(rec.wait(i, timeout), f"request {i}")
        check(len(ids) == 12, f"request {i}: {len(ids)} tokens, expected 12")
        check(text.startswith(want), f"request {i}: {text!r} does not start with {want!r}")
        check(len(rec.updates[i]) > 2, f"request {i}: tokens came in {len(rec.updates[i])} updates, not streamed")
        check(text == tok.decode(ids), f"request {i}: streamed text {text!r} != decode of its ids")
    ups = rec.wait(100, timeout)
    check(ups[-1].finish_reason == "cancelled", f"cancelled request finished {ups[-1].finish_reason!r}")
    ups = rec.wait(101, timeout)
    check(ups[-1].finish_reason == "error" and ups[-1].error_type == INTERNAL
          and "injected fault" in (ups[-1].error or ""), f"faulted request: {ups[-1]}")
    ups = rec.wait(102, timeout)
    check(ups[-1].finish_reason == "error" and ups[-1].error_type == INVALID and "num_pages" in (ups[-1].error or ""),
          f"request only its owner can reject: {ups[-1]}")

    owners = sorted({rec.owners[i] for i in normal} | {rec.owners[100], rec.owners[101]})
    want_owners = {1, 2, 3} if world >= 4 else {1} if world > 1 else {0}
    check(want_owners <= set(owners), f"owners {owners} should include ranks {sorted(want_owners)}")
    counts = list(cp.assigned)

    # the ranks carry on: a second round, then every page is back (free or held only by the prefix cache)
    for i in range(n_ok):
        prompt, want = FIXED_PROMPTS[(i + 3) % len(FIXED_PROMPTS)]
        uid = cp.submit(tok.encode(prompt), greedy, rec.sink_for(200 + i))
        normal[200 + i] = (uid, want)
    for i in range(n_ok):
        ids, text = check_stream(rec.wait(200 + i, timeout), f"second round {i}")
        check(text.startswith(normal[200 + i][1]), f"second round {i}: {text!r}")
    while True:
        gauges = list(cp.gauges)
        if all(g.running + g.waiting == 0 for g in gauges) and cp.num_pending == 0:
            break
        check(time.monotonic() < deadline, f"ranks not idle: {gauges}")
        time.sleep(0.01)
    for g in gauges:
        check(g.free_pages + g.cached_pages == g.total_pages, f"rank {g.rank} leaked pages: {g}")
    print(f"nmoe: control plane ok at world size {world}: owners {owners}, assigned per rank {counts} "
          f"(cancelled uid {cancel_uid}, faulted uid {fault_uid}, rejected uid {late_uid})", flush=True)


def main() -> int:
    torch.set_num_threads(1)
    ctx = init_dist("cpu")
    timeout = ENV.test_timeout_s
    faulthandler.dump_traceback_later(timeout, exit=True)  # a hang dumps every stack and fails
    cfg = ServeConfig(ckpt=ENV.model_path, num_pages=NUM_PAGES, page_size=PAGE_SIZE, max_seq_len=1024)
    engine = Engine(cfg, rank=RankInfo(ctx.rank, ctx.world_size))
    cp = FaultOnOwner(ctx.rank, ctx.world_size, ctx.cpu_group)
    orch = Orchestrator(engine, ctx, hooks=cp)
    return run_with_driver(ctx, orch, cp, lambda: scenario(cp, engine.tokenizer, ctx.world_size, timeout))


if __name__ == "__main__":
    sys.exit(main())
