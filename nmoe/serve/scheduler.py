"""Scheduler: admission, chunked prefill, mixed batches, lazy page allocation, preemption.

The engine's loop is `batch = schedule()`, forward, `complete(batch)` (`abort(batch)` if the forward
failed); for every item that `reaches_end` it appends the sampled token to `seq.token_ids` or calls
`finish(seq)`, before or after `complete`. Pure Python; per-step cost is O(batch).

Policy, per step (a mixed step: decodes and prefill chunks in one batch, decodes first):
1. Decode: every RUNNING sequence whose tokens are all computed except the last gets that token.
   At most `max_batch_size` sequences are RUNNING, so every decode fits. (With
   `enable_mixed_steps=False` a step is prefill only when any prefill can run, else decode only.)
2. Prefill, under `max_prefill_tokens` tokens per step (decode tokens are not counted; a step with
   decodes takes at most `mixed_prefill_tokens` when that is set and prefill is chunked): RUNNING
   sequences still mid-prefill first (oldest first), then WAITING ones in queue order (strict FCFS:
   the head blocks the rest). A sequence gets at most one chunk per step, of at most `chunk_size`
   tokens. Without chunked prefill a sequence's remaining tokens are scheduled whole or not at all,
   except that a prompt longer than the budget is scheduled when it is the step's first prefill.
3. Admission (WAITING -> RUNNING) matches `token_ids[:-1]` (or fewer: `seq.prefix_match_limit`)
   against the prefix cache - at least one token is always fed, so the step has logits - and starts
   after the matched full pages.
4. Pages are allocated as tokens are scheduled. When none is free: evict the prefix cache, then
   preempt the newest RUNNING sequence (highest `arrival`) and retry. A WAITING sequence being
   admitted only preempts sequences newer than itself, otherwise it waits (so two sequences never
   take turns preempting each other, and the oldest sequence always makes progress). A preempted sequence
   loses its pages and computed KV, keeps its token ids (generated tokens are recomputed like prompt
   tokens), and goes back to the front of the queue; it is not readmitted in the same step.

Prefix caching: when `complete` finds new full pages of computed tokens, they go into the tree -
prompt and generated tokens alike (a page's KV depends only on the tokens before it), so a preempted
sequence or a follow-up turn can reuse them. Each RUNNING sequence holds one `PrefixHandle` locking
the tree path of its cached pages; a page that is in the tree is full and is never written again.
If the tree already has a newly full page (another sequence computed the same prefix meanwhile), the
sequence switches to the tree's page and frees its own, so `seq.pages` can change in `complete` -
only for full pages, whose KV is the same.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field

from nmoe.serve.cache import PageAllocator, PrefixHandle, RadixCache


@dataclass
class SchedulerConfig:
    num_pages: int
    page_size: int = 64
    max_seq_len: int = 16384
    max_batch_size: int = 256  # most RUNNING sequences (hence most items in a batch)
    max_prefill_tokens: int = 8192  # prefill tokens per step; decode tokens come on top
    chunk_size: int = 2048
    enable_prefix_cache: bool = True
    enable_chunked_prefill: bool = True
    debug_invariants: bool = False
    enable_mixed_steps: bool = True  # False: a step is all prefill (when there is any) or all decode
    # prefill tokens of a step that also carries decodes (0: max_prefill_tokens); bounds how much a
    # concurrent long prefill stretches the running sequences' inter-token latency (chunked only)
    mixed_prefill_tokens: int = 0

    def __post_init__(self) -> None:
        for name in (
            "num_pages",
            "page_size",
            "max_seq_len",
            "max_batch_size",
            "max_prefill_tokens",
            "chunk_size",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SchedulerConfig: field '{name}' must be a positive integer, got {v!r}")


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    rid: int
    token_ids: list[int]  # prompt (+ forced tokens) + generated so far; the engine appends
    num_prompt_tokens: int
    max_new_tokens: int  # capacity checked at `add`: len(token_ids) + max_new_tokens
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # tokens whose KV is in this sequence's pages
    pages: list[int] = field(default_factory=list)  # block table, in order
    num_cached_tokens: int = 0  # tokens reused from the prefix cache at the latest admission
    arrival: int = 0  # order of `add`, from 1 (set by the scheduler; kept across preemption; 0: never added)
    num_preemptions: int = 0
    prefix_handle: PrefixHandle | None = field(default=None, repr=False)  # set while RUNNING
    # at most this many leading tokens may come from the prefix cache (None: all but the last);
    # teacher forcing caps it so every position whose logits are scored is computed
    prefix_match_limit: int | None = None


@dataclass(slots=True)
class ScheduledSeq:
    """`num_tokens` tokens of `seq` fed this step: token_ids[start : start + num_tokens].

    `seq_len` is len(seq.token_ids) when scheduled; the properties answer against it, so they stay
    true after the engine appends the sampled token.
    """

    seq: Sequence
    start: int  # == seq.num_computed at schedule time
    num_tokens: int
    seq_len: int = -1

    def __post_init__(self) -> None:
        if self.seq_len < 0:
            self.seq_len = len(self.seq.token_ids)

    @property
    def reaches_end(self) -> bool:
        """The last fed token is the sequence's last token: its logits give the next token."""
        return self.start + self.num_tokens == self.seq_len

    @property
    def is_decode(self) -> bool:
        """One token fed, everything before it already computed."""
        return self.num_tokens == 1 and self.start + 1 == self.seq_len

    def input_ids(self) -> list[int]:
        return self.seq.token_ids[self.start : self.start + self.num_tokens]

    def positions(self) -> range:
        return range(self.start, self.start + self.num_tokens)

    def out_loc(self, page_size: int) -> list[int]:
        """KV slot of every fed token: page * page_size + offset (runs of consecutive slots per page)."""
        out: list[int] = []
        pages = self.seq.pages
        pos, end = self.start, self.start + self.num_tokens
        while pos < end:
            idx, off = divmod(pos, page_size)
            stop = min(end, (idx + 1) * page_size)
            base = pages[idx] * page_size + off
            out.extend(range(base, base + stop - pos))
            pos = stop
        return out


@dataclass
class Batch:
    items: list[ScheduledSeq]  # decodes first, then prefill chunks
    preempted: list[Sequence] = field(default_factory=list)  # preempted since the last returned batch

    def num_tokens(self) -> int:
        return sum(it.num_tokens for it in self.items)

    def input_ids(self) -> list[int]:
        return [t for it in self.items for t in it.input_ids()]

    def positions(self) -> list[int]:
        return [p for it in self.items for p in it.positions()]

    def out_loc(self, page_size: int) -> list[int]:
        """KV slot of every fed token, in `input_ids` order."""
        return [s for it in self.items for s in it.out_loc(page_size)]


class _Step:
    """What one `schedule` call has built so far."""

    def __init__(self, budget: int):
        self.decodes: list[ScheduledSeq] = []
        self.prefills: list[ScheduledSeq] = []
        self.budget = budget
        self.preempted: set[Sequence] = set()


class Scheduler:
    """Owns the queues, the page allocator and the prefix cache of one rank. Not thread-safe.

    `schedule` and `complete` (or `abort`, when the forward failed) alternate: `schedule` raises while
    a batch is outstanding. `finish` may be called at any time, also between the two.
    """

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.allocator = PageAllocator(cfg.num_pages)
        self.prefix_cache = RadixCache(self.allocator, cfg.page_size, enabled=cfg.enable_prefix_cache)
        self._waiting: deque[Sequence] = deque()
        self._running: dict[Sequence, None] = {}  # an ordered set
        self._arrivals = itertools.count(1)
        self._inflight: Batch | None = None
        self._preempted: list[Sequence] = []  # not yet reported in a batch
        self._deferred: list[Sequence] = []  # finished while in the outstanding batch; still hold pages
        self._inflight_seqs: set[int] | None = None  # ids of the outstanding batch's sequences, lazily

    # --- queries ------------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> tuple[Sequence, ...]:
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Sequence, ...]:
        """The queue, head first."""
        return tuple(self._waiting)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    # --- the engine's calls -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; ValueError (with the numbers) if it could never fit."""
        if seq.arrival or seq.status is not SeqStatus.WAITING or seq.pages or seq.num_computed:
            raise ValueError(f"add: rid={seq.rid} is not a fresh sequence (status {seq.status.name})")
        n, m = len(seq.token_ids), seq.max_new_tokens
        if n == 0:
            raise ValueError(f"add: rid={seq.rid} has no tokens")
        if m < 0:
            raise ValueError(f"add: rid={seq.rid} has max_new_tokens={m} < 0")
        cfg = self.cfg
        if n + m > cfg.max_seq_len:
            raise ValueError(
                f"add: rid={seq.rid} needs {n} prompt + {m} new = {n + m} tokens > max_seq_len={cfg.max_seq_len}"
            )
        pages = -(-(n + m) // cfg.page_size)
        if pages > cfg.num_pages:
            raise ValueError(
                f"add: rid={seq.rid} needs {pages} pages of {cfg.page_size} tokens for {n} prompt + {m} new "
                f"tokens > num_pages={cfg.num_pages}"
            )
        seq.arrival = next(self._arrivals)
        self._waiting.append(seq)

    def schedule(self) -> Batch | None:
        """The next step's batch, or None when there is nothing to feed."""
        if self._inflight is not None:
            raise RuntimeError("schedule: the previous batch has not been completed")
        step = _Step(self.cfg.max_prefill_tokens)
        if self.cfg.enable_mixed_steps:
            self._schedule_decodes(step)
            mixed = self.cfg.mixed_prefill_tokens
            if step.decodes and mixed > 0 and self.cfg.enable_chunked_prefill:
                step.budget = min(step.budget, mixed)
            self._schedule_prefills(step)
        else:  # prefill first; decode when there is no prefill to run
            self._schedule_prefills(step)
            if not step.prefills and not step.decodes:
                self._schedule_decodes(step)
        items = step.decodes + step.prefills
        if not items:
            return None  # anything preempted is reported with the next batch
        batch = Batch(items, self._preempted)
        self._preempted = []
        self._inflight = batch
        if self.cfg.debug_invariants:
            self.check_invariants()
        return batch

    def complete(self, batch: Batch) -> None:
        """The batch's forward ran and its KV is written: advance `num_computed` and put the newly full
        pages into the prefix cache - also for sequences finished since `schedule`, whose pages are
        returned only now."""
        if batch is not self._inflight:
            raise RuntimeError("complete: not the batch last returned by schedule")
        self._inflight, self._inflight_seqs = None, None
        ps, cache = self.cfg.page_size, self.prefix_cache
        for it in batch.items:
            seq = it.seq
            if seq.num_computed != it.start:
                raise RuntimeError(
                    f"complete: rid={seq.rid} computed {seq.num_computed} tokens, item starts at {it.start}"
                )
            seq.num_computed = it.start + it.num_tokens
            if cache.enabled and seq.num_computed // ps > seq.prefix_handle.num_pages:
                cache.extend(seq.prefix_handle, seq.token_ids, seq.pages, seq.num_computed // ps)
        self._release_deferred()
        if self.cfg.debug_invariants:
            self.check_invariants()

    def abort(self, batch: Batch) -> None:
        """The batch's forward did not run (or failed): nothing in it counts as computed. RUNNING
        sequences are scheduled again from where they were; those finished since `schedule` are
        released without caching anything."""
        if batch is not self._inflight:
            raise RuntimeError("abort: not the batch last returned by schedule")
        self._inflight, self._inflight_seqs = None, None
        self._release_deferred()
        if self.cfg.debug_invariants:
            self.check_invariants()

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (done, cancelled or failed, WAITING or RUNNING): its pages are returned and
        its prefix lock released. Idempotent; ValueError for a sequence this scheduler never saw.

        Between `schedule` and `complete` a sequence in the outstanding batch keeps its pages until
        `complete` (its KV is being written, and is cached once written) or `abort`."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            if seq not in self._running:
                raise ValueError(f"finish: rid={seq.rid} is not running in this scheduler")
            del self._running[seq]
            if self._in_flight(seq):
                self._deferred.append(seq)
            else:
                self._release(seq)
        else:
            try:
                self._waiting.remove(seq)
            except ValueError:
                raise ValueError(f"finish: rid={seq.rid} is not waiting in this scheduler") from None
        seq.status = SeqStatus.FINISHED
        if self.cfg.debug_invariants:
            self.check_invariants()

    # --- policy helpers -----------------------------------------------------------------------------
    def _schedule_decodes(self, step: _Step) -> None:
        ps, decodes, running = self.cfg.page_size, step.decodes, SeqStatus.RUNNING
        for seq in list(self._running):
            if seq.status is not running:
                continue  # preempted earlier in this loop
            n, done = len(seq.token_ids), seq.num_computed
            if n - done == 1 and (done < len(seq.pages) * ps or self._reserve(seq, n, step)):
                decodes.append(ScheduledSeq(seq, done, 1, n))

    def _schedule_prefills(self, step: _Step) -> None:
        """Chunks for RUNNING sequences mid-prefill (oldest first), then admissions from the queue."""
        prefilling = [s for s in self._running if len(s.token_ids) - s.num_computed > 1]
        prefilling.sort(key=_arrival)
        for seq in prefilling:
            if step.budget <= 0:
                break
            if seq.status is SeqStatus.RUNNING:
                self._schedule_chunk(seq, step)
        while self._waiting and step.budget > 0 and len(self._running) < self.cfg.max_batch_size:
            if self._waiting[0] in step.preempted or not self._admit(step):
                break

    def _chunk_len(self, start: int, length: int, budget: int) -> int:
        left = length - start
        cfg = self.cfg
        if cfg.enable_chunked_prefill:
            return min(left, cfg.chunk_size, budget)
        return left if left <= budget or budget == cfg.max_prefill_tokens else 0

    def _schedule_chunk(self, seq: Sequence, step: _Step) -> bool:
        n = self._chunk_len(seq.num_computed, len(seq.token_ids), step.budget)
        if n == 0 or not self._reserve(seq, seq.num_computed + n, step):
            return False
        item = ScheduledSeq(seq, seq.num_computed, n, len(seq.token_ids))
        if item.is_decode:  # a prefix hit left one token: it runs as a decode
            step.decodes.append(item)
        else:
            step.prefills.append(item)
            step.budget -= n
        return True

    def _admit(self, step: _Step) -> bool:
        """Try to start the queue's head; on failure it stays at the head with nothing held."""
        seq = self._waiting.popleft()
        limit = len(seq.token_ids) - 1
        if seq.prefix_match_limit is not None:
            limit = min(limit, seq.prefix_match_limit)
        m = self.prefix_cache.match(seq.token_ids, limit)
        seq.pages, seq.prefix_handle, seq.num_computed = m.pages, m.handle, m.num_tokens
        if self._schedule_chunk(seq, step):
            seq.status = SeqStatus.RUNNING
            seq.num_cached_tokens = m.num_tokens
            self._running[seq] = None
            return True
        self._release(seq)
        seq.num_computed = 0
        self._waiting.appendleft(seq)
        return False

    def _reserve(self, seq: Sequence, end: int, step: _Step) -> bool:
        """Give `seq` the pages for tokens [0, end), evicting and preempting as needed. False if `seq`
        cannot have them now (it was preempted itself, or it is WAITING and everything running is older)."""
        need = -(-end // self.cfg.page_size) - len(seq.pages)
        while need > 0:
            pages = self.allocator.alloc(need)
            if pages is not None:
                seq.pages.extend(pages)
                return True
            short = need - self.allocator.num_free
            if self.prefix_cache.evict(short) >= short:
                continue
            victim = max(self._running, key=_arrival, default=None)
            if victim is None or (victim is seq and len(self._running) == 1):
                raise RuntimeError(
                    f"rid={seq.rid} needs {need} more pages for {end} tokens, none can be freed "
                    f"(num_pages={self.cfg.num_pages}; did the engine append past max_new_tokens?)"
                )
            if seq.status is SeqStatus.WAITING and victim.arrival < seq.arrival:
                return False
            self._preempt(victim, step)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, step: _Step) -> None:
        del self._running[seq]
        # O(batch), but only when preempting; the victim may already be in this step's batch
        step.decodes[:] = [it for it in step.decodes if it.seq is not seq]
        kept = [it for it in step.prefills if it.seq is not seq]
        step.budget += sum(it.num_tokens for it in step.prefills if it.seq is seq)
        step.prefills[:] = kept
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        self._waiting.appendleft(seq)
        self._preempted.append(seq)
        step.preempted.add(seq)

    def _in_flight(self, seq: Sequence) -> bool:
        if self._inflight is None:
            return False
        if self._inflight_seqs is None:  # built on the first finish of a step, not on every step
            self._inflight_seqs = {id(it.seq) for it in self._inflight.items}
        return id(seq) in self._inflight_seqs

    def _release_deferred(self) -> None:
        for seq in self._deferred:
            self._release(seq)
        self._deferred = []

    def _release(self, seq: Sequence) -> None:
        if seq.prefix_handle is not None:
            self.prefix_cache.release(seq.prefix_handle)
            seq.prefix_handle = None
        if seq.pages:
            self.allocator.decref(seq.pages)
            seq.pages = []

    # --- checks -------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError naming what is wrong. Scans every page: debug mode and tests only."""
        cfg, alloc, cache = self.cfg, self.allocator, self.prefix_cache
        ps = cfg.page_size
        alloc.check_invariants()
        running = list(self._running)
        deferred = self._deferred
        assert not deferred or self._inflight is not None, "finished sequences held with no batch outstanding"
        cache.check_invariants([s.prefix_handle for s in running + deferred if s.prefix_handle is not None])
        assert len(running) <= cfg.max_batch_size, (
            f"{len(running)} running > max_batch_size={cfg.max_batch_size}"
        )
        assert len(set(self._waiting)) == len(self._waiting), "a sequence is queued twice"
        holders = [0] * alloc.num_total
        for s in running:
            where = f"running rid={s.rid}"
            assert s.status is SeqStatus.RUNNING, f"{where}: status {s.status.name}"
            assert s not in self._waiting, f"{where}: also waiting"
            assert 0 <= s.num_computed <= len(s.token_ids), (
                f"{where}: computed {s.num_computed} of {len(s.token_ids)}"
            )
            lo, hi = -(-s.num_computed // ps), -(-len(s.token_ids) // ps)
            assert lo <= len(s.pages) <= hi, (
                f"{where}: {len(s.pages)} pages, {s.num_computed}/{len(s.token_ids)} tokens"
            )
            assert len(set(s.pages)) == len(s.pages), f"{where}: a page twice in its block table {s.pages}"
            for i in range(s.num_computed // ps, len(s.pages)):
                p = s.pages[i]
                assert alloc.refcount(p) == 1, f"{where}: page {p} (index {i}) will be written but is shared"
            h = s.prefix_handle
            assert h is not None and h.active, f"{where}: no live prefix handle"
            assert h.num_pages * ps <= s.num_computed, (
                f"{where}: handle covers {h.num_pages} pages, computed {s.num_computed}"
            )
            if cache.enabled:
                assert h.num_pages == s.num_computed // ps, (
                    f"{where}: handle covers {h.num_pages} pages, {s.num_computed // ps} full"
                )
                got = cache.path_tokens(h)
                assert got == s.token_ids[: len(got)], f"{where}: its tree path is another prefix"
                assert cache.path_pages(h) == s.pages[: h.num_pages], (
                    f"{where}: holds duplicates of cached pages"
                )
            for p in s.pages:
                holders[p] += 1
        for s in deferred:
            assert s.status is SeqStatus.FINISHED and s not in self._running, (
                f"deferred rid={s.rid}: {s.status.name}"
            )
            for p in s.pages:
                holders[p] += 1
        for s in self._waiting:
            where = f"waiting rid={s.rid}"
            assert s.status is SeqStatus.WAITING, f"{where}: status {s.status.name}"
            assert not s.pages and s.prefix_handle is None and s.num_computed == 0, (
                f"{where}: holds pages or KV"
            )
        for p in cache.cached_pages():
            holders[p] += 1
        for p, n in enumerate(holders):
            assert alloc.refcount(p) == n, (
                f"page {p}: refcount {alloc.refcount(p)}, but {n} holders (sequences + tree)"
            )


def _arrival(seq: Sequence) -> int:
    return seq.arrival
