"""Control plane: rank 0 <-> owner ranks over the CPU gloo group, as orchestrator step hooks.

Every rank runs the orchestrator loop, which calls `before_step` on every rank in every iteration,
idle or not (`after_step` only in iterations that run a forward). Both collectives live in
`before_step`, so every rank enters them the same number of times:

    broadcast: rank 0 sends the iteration's inbox - new requests (each with the owner rank chosen by
               load), cancels, and the shutdown flag. Owners add / cancel on their engine.
    gather:    every rank's updates since the last gather (new token ids, logprobs, text delta,
               finishes, errors) and its gauges (pages, running tokens) go to rank 0 in one batch,
               which hands each update to its request's sink.

`after_step` only stashes the step's updates for the next iteration's gather.

Threads on rank 0: the HTTP server calls `submit` / `cancel` / `request_shutdown` from its own thread;
those only touch the inbox under a lock. Sinks are called from the orchestrator thread (the API wraps
them with `loop.call_soon_threadsafe`).

Owner choice: the rank with the fewest live tokens (its reported running tokens plus prompt +
max_tokens of the requests assigned to it in this iteration), ties broken by the most free KV
pages, then the fewest requests assigned so far (an idle cluster takes turns), then the lowest rank.
"""

from __future__ import annotations

import faulthandler
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.distributed as dist

from nmoe.serve.request import Request, RequestOutput, SamplingParams

INVALID = "invalid_request_error"  # the owner rejected the request (a check found late)
INTERNAL = "server_error"  # the request failed while running (engine.fail, a fault)


@dataclass
class Submit:
    uid: int
    owner: int
    prompt_ids: list[int]
    params: SamplingParams
    forced_output_ids: list[int] | None = None


@dataclass
class Update:
    """What one iteration produced for one request; `finish_reason` set on its last update."""

    uid: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    logits: object | None = None  # torch.Tensor [len(token_ids), vocab] in the LOGITS mode
    text: str = ""  # delta; held back while it could be the start of a stop string
    finish_reason: str | None = None
    error: str | None = None
    error_type: str | None = None
    num_cached_tokens: int = 0


@dataclass
class RankGauges:
    rank: int
    free_pages: int = 0
    total_pages: int = 0
    cached_pages: int = 0  # held only by the prefix cache: evictable
    running: int = 0
    waiting: int = 0
    running_tokens: int = 0  # tokens (prompt + generated) of this rank's live requests


@dataclass
class _Inbox:
    submits: list[Submit] = field(default_factory=list)
    cancels: list[tuple[int, int]] = field(default_factory=list)  # (uid, owner)
    shutdown: bool = False


@dataclass
class _Sent:
    tokens: int = 0
    text: int = 0


Sink = Callable[[Update], None]


class ControlPlane:
    """A StepHooks implementation; one per rank. `group` is the CPU gloo group (None at world size 1)."""

    def __init__(self, rank: int = 0, world_size: int = 1, group=None, *, max_pending: int = 512,
                 keep_alive: bool = True, idle_wait_s: float = 0.05):
        if world_size > 1 and group is None:
            raise ValueError(f"ControlPlane: world_size {world_size} needs the CPU gloo group")
        self.rank, self.world_size, self.group = rank, world_size, group
        self.max_pending = max_pending
        self._keep_alive = keep_alive
        self.idle_wait_s = idle_wait_s
        # rank 0: the handoff with the server thread
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox = _Inbox()
        self._sinks: dict[int, Sink] = {}
        self._owner: dict[int, int] = {}
        self._next_uid = 0
        self._shutdown_requested = False
        self.gauges = [RankGauges(r) for r in range(world_size)]
        self.assigned = [0] * world_size  # requests ever assigned to each rank
        self.iterations = 0
        # every rank: its own requests
        self._shutdown = False
        self._sent: dict[int, _Sent] = {}
        self._stash: list[Update] = []  # updates not yet gathered to rank 0

    # --------------------------------------------------------------------------------------------
    # Rank 0, server thread
    # --------------------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink,
               forced_output_ids: list[int] | None = None) -> int:
        """Queue a request; `sink` receives its updates on the orchestrator thread. Returns its uid.
        Raises QueueFull when `max_pending` requests are unfinished, RuntimeError when shutting down."""
        with self._lock:
            if self._shutdown_requested:
                raise RuntimeError("the server is shutting down")
            if len(self._sinks) >= self.max_pending:
                raise QueueFull(f"{len(self._sinks)} requests pending (limit {self.max_pending})")
            uid = self._next_uid
            self._next_uid += 1
            self._sinks[uid] = sink
            self._inbox.submits.append(Submit(uid, -1, list(prompt_ids), params, forced_output_ids))
        self._wake.set()
        return uid

    def cancel(self, uid: int) -> None:
        """Cancel a request wherever it is; its owner frees its pages. Unknown or finished: no-op."""
        with self._lock:
            if uid not in self._sinks:
                return
            queued = [s for s in self._inbox.submits if s.uid == uid]
            if queued:  # not yet delivered: finish it here
                self._inbox.submits.remove(queued[0])
                sink = self._sinks.pop(uid)
            else:
                self._inbox.cancels.append((uid, self._owner.get(uid, -1)))
                sink = None
        if sink is not None:
            sink(Update(uid, finish_reason="cancelled"))
        self._wake.set()

    def request_shutdown(self) -> None:
        """Stop accepting requests; the loop exits on every rank once the pending ones are done."""
        with self._lock:
            self._shutdown_requested = True
        self._wake.set()

    def shutdown_signalled(self) -> None:
        """`request_shutdown` for a signal handler, which takes no lock: the handler runs on the main
        thread between two of its bytecodes, possibly while that thread holds `_lock` (a `submit`
        of the API) or `_wake`'s lock (an `Event.set`, the handler's own on a second signal), and
        would wait for itself forever. The flag only ever turns true, so the unlocked store is
        safe; the loop sees it within `idle_wait_s` without the wake-up."""
        self._shutdown_requested = True

    def fail_all(self, message: str) -> None:
        """The loop died: finish every pending request with an error (rank 0)."""
        with self._lock:
            self._shutdown_requested = True
            sinks, self._sinks = self._sinks, {}
            self._inbox = _Inbox()
        for uid, sink in sinks.items():
            sink(Update(uid, finish_reason="error", error=message, error_type=INTERNAL))

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._sinks)

    def owner_of(self, uid: int) -> int | None:
        with self._lock:
            return self._owner.get(uid)

    # --------------------------------------------------------------------------------------------
    # StepHooks (every rank, orchestrator thread)
    # --------------------------------------------------------------------------------------------

    def before_step(self, orch) -> None:
        engine = orch.engine
        inbox = self._take_inbox(engine) if self.rank == 0 else None
        if self.world_size > 1:
            box = [inbox]
            dist.broadcast_object_list(box, src=0, group=self.group)
            inbox = box[0]
        self._shutdown = inbox.shutdown
        for s in inbox.submits:
            if s.owner == self.rank:
                self._add(engine, s)
        for uid, owner in inbox.cancels:
            if owner == self.rank:
                engine.cancel(uid)
        # Cancelled or failed before the forward: an idle iteration (no after_step) must report them too.
        self._stash += self._collect([], engine.pop_finished())
        mine = (self._stash, self._gauges_of(engine))
        self._stash = []
        if self.world_size > 1:
            everything = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object(mine, everything, dst=0, group=self.group)
        else:
            everything = [mine]
        if self.rank == 0:
            self._deliver(everything)

    def after_step(self, orch, touched: list[Request], finished: list[RequestOutput]) -> None:
        """Stash this step's updates; the next iteration's `before_step` gathers them (one gather per
        iteration, and every iteration has a before_step, idle or not)."""
        self.iterations += 1
        self._stash += self._collect(touched, finished)

    def wants_shutdown(self) -> bool:
        return self._shutdown

    def keep_alive(self) -> bool:
        return self._keep_alive

    # --------------------------------------------------------------------------------------------
    # Rank 0 internals
    # --------------------------------------------------------------------------------------------

    def _take_inbox(self, engine) -> _Inbox:
        idle = not self._sinks and all(g.running + g.waiting == 0 for g in self.gauges)
        if idle and not self._shutdown_requested and not engine.has_work():
            self._wake.wait(self.idle_wait_s)  # nothing to do: wait for the server instead of spinning
        self._wake.clear()
        with self._lock:
            inbox, self._inbox = self._inbox, _Inbox()
            inbox.shutdown = self._shutdown_requested and not self._sinks
            load = [[g.running_tokens, -g.free_pages, self.assigned[g.rank], g.rank] for g in self.gauges]
            for s in inbox.submits:
                s.owner = min(load)[3]
                new = s.params.max_tokens if s.forced_output_ids is None else len(s.forced_output_ids)
                cost = len(s.prompt_ids) + new
                load[s.owner][0] += cost
                load[s.owner][2] += 1
                self._owner[s.uid] = s.owner
                self.assigned[s.owner] += 1
        return inbox

    def _deliver(self, everything) -> None:
        calls = []
        with self._lock:
            for updates, gauges in everything:
                self.gauges[gauges.rank] = gauges
                for u in updates:
                    sink = self._sinks.get(u.uid)
                    if sink is None:
                        continue
                    if u.finish_reason is not None:
                        del self._sinks[u.uid]
                        self._owner.pop(u.uid, None)
                    calls.append((sink, u))
        for sink, u in calls:
            sink(u)

    # --------------------------------------------------------------------------------------------
    # Owner internals
    # --------------------------------------------------------------------------------------------

    def _add(self, engine, s: Submit) -> None:
        kwargs = {} if s.forced_output_ids is None else {"forced_output_ids": s.forced_output_ids}
        try:
            engine.add_request(s.prompt_ids, s.params, rid=s.uid, **kwargs)
        except (ValueError, TypeError) as e:
            self._stash.append(Update(s.uid, finish_reason="error", error=f"rank {self.rank}: {e}",
                                      error_type=INVALID))
            return
        self._sent[s.uid] = _Sent()

    def _collect(self, touched: list[Request], finished: list[RequestOutput]) -> list[Update]:
        updates = []
        for req in touched:
            if req.finish_reason is None:
                u = self._delta(req.rid, req.output_ids, req.logprobs, req.top_logprobs, req.logits,
                                _emittable(req.text, req.params.stop))
                if u is not None:
                    updates.append(u)
        for out in finished:
            u = self._delta(out.request_id, out.token_ids, out.logprobs or [], out.top_logprobs or [],
                            out.logits, out.text, final=True) or Update(out.request_id)
            u.finish_reason = out.finish_reason
            u.error = out.error
            u.error_type = INTERNAL if out.error is not None else None
            u.num_cached_tokens = out.num_cached_tokens
            self._sent.pop(out.request_id, None)
            updates.append(u)
        return updates

    def _delta(self, uid, ids, logprobs, top, logits, text, final: bool = False) -> Update | None:
        sent = self._sent.setdefault(uid, _Sent())
        n, t = sent.tokens, sent.text
        if len(ids) == n and len(text) == t and not final:
            return None
        u = Update(uid, list(ids[n:]), list(logprobs[n:]), list(top[n:]), text=text[t:])
        if logits is not None and len(logits) > n:
            u.logits = _stack(logits[n:])
        sent.tokens, sent.text = len(ids), max(t, len(text))
        return u

    def _gauges_of(self, engine) -> RankGauges:
        sch = engine.scheduler
        live = [r for r in engine.requests.values() if r.finish_reason is None]
        return RankGauges(
            rank=self.rank,
            free_pages=sch.allocator.num_free,
            total_pages=sch.allocator.num_total,
            cached_pages=sch.prefix_cache.num_cached_pages,
            running=sch.num_running,
            waiting=sch.num_waiting,
            running_tokens=sum(len(r.prompt_ids) + len(r.output_ids) for r in live),
        )


class QueueFull(RuntimeError):
    """More requests pending than `max_pending`: the client should retry later."""


def _emittable(text: str, stops: list[str]) -> str:
    """`text` minus its longest suffix that could be the start of a stop string (held back until the
    next tokens show whether the stop string follows)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[: len(text) - hold]


def _stack(rows):
    import torch

    if isinstance(rows, torch.Tensor):
        return rows.clone()
    return torch.stack(list(rows))


def run_with_driver(ctx, orch, cp: ControlPlane, drive) -> int:
    """Every rank runs `orch`; rank 0 also runs `drive()` (a client scenario) in a thread and then asks
    all ranks to shut down. The ranks leave together (a rank tearing gloo down under a peer aborts
    it). Returns the exit code: 1 with the failure printed when `drive` raised, else 0."""
    from nmoe.serve.dist import shutdown

    failure: list[BaseException] = []
    if ctx.rank == 0:
        def guarded():
            try:
                drive()
            except BaseException as e:
                failure.append(e)
            finally:
                cp.request_shutdown()

        client = threading.Thread(target=guarded, name="client", daemon=True)
        client.start()
        orch.run()
        client.join()
    else:
        orch.run()
    if ctx.distributed:
        dist.barrier(group=ctx.cpu_group)
    faulthandler.cancel_dump_traceback_later()
    shutdown(ctx)
    if failure:
        print(f"rank 0: FAILED: {failure[0]!r}", file=sys.stderr, flush=True)
        return 1
    return 0
