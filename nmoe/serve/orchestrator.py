"""The per-rank lockstep loop: every rank runs the same iterations and enters the same collectives.

One iteration, on every rank:
  1. `hooks.before_step(orch)` (may run CPU collectives: the control plane delivers new requests
     and cancels to their owner ranks here);
  2. a CPU all-reduce (MAX) of small flags: work present, shutdown vote, keep-alive vote, error;
  3. when any rank has work: `engine.step()` where this rank has work, `engine.forward_idle()` (T=0)
     where it has none; then `transport.drain()` enters whatever MoE calls this rank still owes
     (the scheduler ran nothing, or the forward failed part-way), so peers never wait forever;
  4. `hooks.after_step(orch, touched, finished)` (the control plane streams updates to rank 0).

Faults: an exception on a rank (in a hook or the forward; `NMOE_FAULT_INJECT=<rank>:<step>` raises
one in the middle MoE layer of that step's forward) is caught, the step's collectives are completed
with T=0, and the next flag all-reduce tells every rank. Then every rank learns the failing rank and
message (one object all-gather), fails its unfinished requests with that message, calls
`after_step` once more with them, prints the failure and raises `RankFailure`. A collective that
itself fails (a peer died, `NMOE_DIST_TIMEOUT_S` passed) cannot be completed: that rank raises
`RankFailure` at once, and its peers see their collectives fail or time out in turn.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback

import torch
import torch.distributed as dist

from nmoe.serve import ep
from nmoe.serve.env import ENV
from nmoe.serve.request import Request, RequestOutput

log = logging.getLogger("nmoe")

_WORK, _SHUTDOWN, _KEEP_ALIVE, _ERROR = range(4)


class StepHooks:
    """What the control plane plugs into the loop. The default does nothing and stops when idle."""

    def before_step(self, orch: Orchestrator) -> None:
        return None

    def after_step(self, orch: Orchestrator, touched: list[Request], finished: list[RequestOutput]) -> None:
        return None

    def wants_shutdown(self) -> bool:
        """This rank's vote to stop now (any rank's vote stops all)."""
        return False

    def keep_alive(self) -> bool:
        """True: keep iterating with no work (sleeping briefly), as a server does."""
        return False


class CollectOutputs(StepHooks):
    """Keeps the finished outputs of this rank's requests, by request id (offline generation)."""

    def __init__(self):
        self.outputs: dict[int, RequestOutput] = {}

    def after_step(self, orch, touched, finished) -> None:
        for out in finished:
            self.outputs[out.request_id] = out


class RankFailure(RuntimeError):
    """A rank failed; raised on every rank after they all stopped."""

    def __init__(self, rank: int, step: int, message: str):
        super().__init__(f"rank {rank} failed at step {step}: {message}")
        self.rank, self.step, self.message = rank, step, message


class FaultInjected(RuntimeError):
    """The exception NMOE_FAULT_INJECT raises."""


def parse_fault(spec: str) -> tuple[int, int] | None:
    """`"<rank>:<step>"` -> (rank, step); empty -> None."""
    if not spec:
        return None
    try:
        rank, step = (int(v) for v in spec.split(":"))
    except ValueError as e:
        raise ValueError(f"NMOE_FAULT_INJECT={spec!r}: expected '<rank>:<step>'") from e
    return rank, step


class _Faulty:
    """Stands in for a transport in one MoE layer for one step, and raises there."""

    def __init__(self, message: str):
        self.message = message

    def moe(self, x, weights, ids, experts, add=None):
        raise FaultInjected(self.message)


class Orchestrator:
    """Drives one rank's `engine` in lockstep with its peers over `ctx` (a `dist.DistContext`).

    Attaches a transport built from the environment (`ep.setup`) unless the engine's model already
    has one. `run()` returns when no rank has work (and no rank keeps alive) or a rank votes to shut
    down (unfinished requests stay in the engine); it raises `RankFailure` on every rank when any
    rank fails. Under EP the engine must run one forward per `step()` (it keeps the batch whole)."""

    def __init__(self, engine, ctx, hooks: StepHooks | None = None, idle_sleep_s: float = 0.002,
                 fault: str | None = None):
        self.engine, self.ctx = engine, ctx
        self.hooks = hooks or StepHooks()
        self.idle_sleep_s = idle_sleep_s
        self.transport = ep.attached(engine.model) or ep.setup(engine, ctx)
        self.fault = parse_fault(ENV.fault_inject if fault is None else fault)
        self.step = 0  # forwards run so far (the same on every rank)
        self.iterations = 0
        self._error: tuple[int, int, str] | None = None  # this rank's (rank, step, message)
        self._has_work = False  # this rank's work flag of the current iteration

    @property
    def rank(self) -> int:
        return self.ctx.rank

    def run(self) -> None:
        while True:
            self._guard(self.hooks.before_step, self)
            flags = self._agree()
            self.iterations += 1
            if flags[_ERROR]:
                self._stop_on_error()
            if flags[_SHUTDOWN]:
                return
            if not flags[_WORK]:
                if not flags[_KEEP_ALIVE]:
                    return
                time.sleep(self.idle_sleep_s)
                continue
            touched = self._forward()
            finished = self.engine.pop_finished()
            self._guard(self.hooks.after_step, self, touched, finished)

    # --- one iteration ------------------------------------------------------------------------------

    def _agree(self) -> list[int]:
        local = [0, 0, 0, 0]
        if self._error is None:
            self._has_work = self.engine.has_work()
            local[_WORK] = int(self._has_work)
            local[_SHUTDOWN] = int(self._guard(self.hooks.wants_shutdown) or False)
            local[_KEEP_ALIVE] = int(self._guard(self.hooks.keep_alive) or False)
        local[_ERROR] = int(self._error is not None)
        flags = torch.tensor(local, dtype=torch.long)
        if self.ctx.distributed:
            self._collective(dist.all_reduce, flags, op=dist.ReduceOp.MAX, group=self.ctx.cpu_group)
        return flags.tolist()

    def _forward(self) -> list[Request]:
        """This rank's part of one lockstep step; never leaves a peer waiting in a MoE collective."""
        t = self.transport
        t.begin_forward()
        restore = self._arm_fault()
        touched: list[Request] = []
        try:
            if self._has_work:
                touched = self.engine.step()
            else:
                self.engine.forward_idle()
        except Exception as e:
            self._record(e)
        finally:
            restore()
        self._collective(t.drain)
        self.step += 1
        return touched

    def _arm_fault(self):
        """NMOE_FAULT_INJECT: make the middle MoE layer of this step raise on the chosen rank."""
        if self.fault != (self.rank, self.step) or not self.transport.layers:
            return lambda: None
        from nmoe.serve.model import MoE

        moes = [layer.mlp for layer in self.engine.model.layers if isinstance(layer.mlp, MoE)]
        target = moes[len(moes) // 2]
        target.transport = _Faulty(f"injected fault (NMOE_FAULT_INJECT={self.rank}:{self.step})")

        def restore():
            target.transport = self.transport

        return restore

    # --- errors ---------------------------------------------------------------------------------------

    def _guard(self, fn, *args):
        """Run a hook; an exception becomes this rank's error (reported at the next flag all-reduce)."""
        try:
            return fn(*args)
        except Exception as e:
            self._record(e)
            return None

    def _record(self, e: BaseException) -> None:
        if self._error is None:
            log.error("rank %d: step %d failed:\n%s", self.rank, self.step, traceback.format_exc())
            self._error = (self.rank, self.step, f"{type(e).__name__}: {e}")

    def _collective(self, fn, *args, **kw):
        """A collective that fails leaves the group unusable: stop this rank at once."""
        try:
            return fn(*args, **kw)
        except Exception as e:
            msg = f"collective failed ({type(e).__name__}: {e})"
            print(f"nmoe rank {self.rank}: stopping: {msg}", file=sys.stderr, flush=True)
            raise RankFailure(self.rank, self.step, msg) from e

    def _stop_on_error(self) -> None:
        errors: list = [None] * self.ctx.world_size
        if self.ctx.distributed:
            self._collective(dist.all_gather_object, errors, self._error, group=self.ctx.cpu_group)
        else:
            errors = [self._error]
        rank, step, message = min(e for e in errors if e is not None)
        failure = RankFailure(rank, step, message)
        for rid in list(self.engine.requests):
            self._guard(self.engine.fail, rid, str(failure))
        self._guard(self.hooks.after_step, self, [], self.engine.pop_finished())
        print(f"nmoe rank {self.rank}: stopping: {failure}", file=sys.stderr, flush=True)
        if self.ctx.distributed:  # every rank has printed before any exits (torchrun kills the rest)
            self._collective(dist.barrier, group=self.ctx.cpu_group)
        raise failure
