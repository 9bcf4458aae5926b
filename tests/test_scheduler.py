"""Scheduler: a simulated engine that checks every fed token's KV context, under tiny page pools."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from nmoe.serve.scheduler import Batch, Scheduler, SchedulerConfig, SeqStatus, Sequence


class FakeEngine:
    """Plays the engine: feeds batches, keeps a fake KV pool, samples, finishes.

    The KV written at a slot is a hash of the whole token prefix up to that position, which is what
    real KV depends on. Before a batch runs, every position a fed token attends to (0..start-1) must
    hold exactly its sequence's prefix, so stale pages, wrong cache hits and lost KV are all caught.
    """

    def __init__(self, sched: Scheduler, seed: int = 0, vocab: int = 3, sample_first: bool | None = False):
        self.sched = sched
        # sample (append / finish) before `complete`, as nmoe's engine does; None: pick at random each step
        self.sample_first = sample_first
        self.rng = random.Random(seed)
        self.vocab = vocab
        self.kv: dict[int, int] = {}
        self.fed = 0  # tokens fed, all steps
        self.steps = self.preemptions = self.cached = 0  # statistics
        self._chains: dict[Sequence, list[int]] = {}

    def prefix_hash(self, seq: Sequence, pos: int) -> int:
        chain = self._chains.setdefault(seq, [])
        while len(chain) <= pos:
            prev = chain[-1] if chain else None
            chain.append(hash((prev, seq.token_ids[len(chain)])))
        return chain[pos]

    def slot(self, seq: Sequence, pos: int) -> int:
        ps = self.sched.cfg.page_size
        return seq.pages[pos // ps] * ps + pos % ps

    def step(self) -> Batch | None:
        sched = self.sched
        ps = sched.cfg.page_size
        batch = sched.schedule()
        if batch is None:
            return None
        ids, pos, loc = batch.input_ids(), batch.positions(), batch.out_loc(ps)
        assert len(ids) == len(pos) == len(loc) == batch.num_tokens() > 0
        assert len(batch.items) <= sched.cfg.max_batch_size
        kinds = [it.is_decode for it in batch.items]
        assert kinds == sorted(kinds, reverse=True), "decodes must come first"
        assert len({id(it.seq) for it in batch.items}) == len(batch.items), "a sequence twice in one batch"
        for s in batch.preempted:
            assert s.status is not SeqStatus.RUNNING or s.num_preemptions > 0
        k = 0
        for it in batch.items:
            s = it.seq
            assert s.status is SeqStatus.RUNNING and it.start == s.num_computed
            assert 1 <= it.num_tokens and it.start + it.num_tokens <= len(s.token_ids)
            for p in range(it.start):
                assert self.kv.get(self.slot(s, p)) == self.prefix_hash(s, p), (
                    f"rid={s.rid}: KV at {p} is wrong"
                )
            for p in range(it.start, it.start + it.num_tokens):
                assert (ids[k], pos[k], loc[k]) == (s.token_ids[p], p, self.slot(s, p))
                assert sched.allocator.refcount(loc[k] // ps) == 1, f"write into shared page {loc[k] // ps}"
                k += 1
        for it in batch.items:
            for p in range(it.start, it.start + it.num_tokens):
                self.kv[self.slot(it.seq, p)] = self.prefix_hash(it.seq, p)
        sample_first = self.rng.random() < 0.5 if self.sample_first is None else self.sample_first
        if sample_first:
            self.sample_batch(batch)
        self.fed += batch.num_tokens()
        self.steps += 1
        self.preemptions += len(batch.preempted)
        self.cached += sum(
            it.seq.num_cached_tokens for it in batch.items if it.start == it.seq.num_cached_tokens
        )
        sched.complete(batch)
        if not sample_first:
            self.sample_batch(batch)
        return batch

    def sample_batch(self, batch: Batch) -> None:
        for it in batch.items:
            if it.reaches_end and it.seq.status is SeqStatus.RUNNING:
                self.sample(it.seq)

    def sample(self, seq: Sequence) -> None:
        generated = len(seq.token_ids) - seq.num_prompt_tokens
        if generated >= seq.max_new_tokens:
            self.sched.finish(seq)
            return
        seq.token_ids.append(self.rng.randrange(self.vocab))
        if generated + 1 == seq.max_new_tokens:
            self.sched.finish(seq)

    def drain(self, max_steps: int = 3000) -> int:
        steps = 0
        while self.sched.has_work():
            assert self.step() is not None, "work left but nothing scheduled"
            steps += 1
            assert steps <= max_steps, "did not drain"
        return steps


def seq(rid: int, tokens: list[int], max_new: int) -> Sequence:
    return Sequence(rid=rid, token_ids=list(tokens), num_prompt_tokens=len(tokens), max_new_tokens=max_new)


def assert_drained(sched: Scheduler) -> None:
    assert not sched.has_work() and sched.num_running == sched.num_waiting == 0
    sched.prefix_cache.evict(sched.allocator.num_total)
    assert sched.prefix_cache.num_cached_pages == 0
    assert sched.allocator.num_free == sched.allocator.num_total
    sched.check_invariants()


# --- randomized: a state machine under tiny pools -----------------------------------------------------
SHARED = [[0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0, 2, 2, 1, 1, 0, 0]]


REQUEST = st.tuples(
    st.sampled_from(SHARED), st.integers(0, 12), st.lists(st.integers(0, 2), max_size=8), st.integers(0, 10)
)


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        num_pages=st.integers(3, 10),
        page_size=st.sampled_from([1, 2, 4]),
        seq_len_scale=st.sampled_from([0.5, 1.0, 1.5]),
        max_batch_size=st.integers(1, 5),
        max_prefill_tokens=st.integers(1, 16),
        chunk_size=st.integers(1, 8),
        prefix=st.booleans(),
        chunked=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def setup(
        self,
        num_pages,
        page_size,
        seq_len_scale,
        max_batch_size,
        max_prefill_tokens,
        chunk_size,
        prefix,
        chunked,
        seed,
    ):
        self.cfg = SchedulerConfig(
            num_pages=num_pages,
            page_size=page_size,
            max_seq_len=max(2, int(num_pages * page_size * seq_len_scale)),
            max_batch_size=max_batch_size,
            max_prefill_tokens=max_prefill_tokens,
            chunk_size=chunk_size,
            enable_prefix_cache=prefix,
            enable_chunked_prefill=chunked,
            debug_invariants=True,
        )
        self.sched = Scheduler(self.cfg)
        self.engine = FakeEngine(self.sched, seed, sample_first=None)
        self.live: list[Sequence] = []
        self.rid = 0

    @rule(requests=st.lists(REQUEST, min_size=1, max_size=4))
    def arrive(self, requests):
        for base, cut, tail, max_new in requests:
            tokens = base[:cut] + tail
            if not tokens:
                continue
            s = seq(self.rid, tokens, max_new)
            self.rid += 1
            total = len(tokens) + max_new
            fits = total <= self.cfg.max_seq_len and -(-total // self.cfg.page_size) <= self.cfg.num_pages
            if fits:
                self.sched.add(s)
                self.live.append(s)
            else:
                with pytest.raises(ValueError, match=str(total) if total > self.cfg.max_seq_len else "pages"):
                    self.sched.add(s)

    @rule(n=st.integers(1, 4))
    def step(self, n):
        for _ in range(n):
            self.engine.step()

    @rule(data=st.data(), twice=st.booleans())
    def cancel(self, data, twice):
        if not self.live:
            return
        s = data.draw(st.sampled_from(self.live))
        self.sched.finish(s)
        if twice:
            self.sched.finish(s)
        assert s.status is SeqStatus.FINISHED and not s.pages and s.prefix_handle is None

    @invariant()
    def consistent(self):
        self.sched.check_invariants()
        self.live = [s for s in self.live if s.status is not SeqStatus.FINISHED]
        assert self.sched.num_running + self.sched.num_waiting == len(self.live)
        assert self.sched.num_running <= self.cfg.max_batch_size

    def teardown(self):
        if hasattr(self, "engine"):
            event(f"steps before drain >= 10: {self.engine.steps >= 10}")
            self.engine.drain()
            event(f"preempted: {self.engine.preemptions > 0}")
            event(f"cache hits: {self.engine.cached > 0}")
            assert all(s.status is SeqStatus.FINISHED for s in self.live)
            assert_drained(self.sched)


SchedulerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # no explain: slow on failure
)
test_scheduler_machine = SchedulerMachine.TestCase


def run_random_load(seed: int) -> FakeEngine:
    rng = random.Random(seed)
    cfg = SchedulerConfig(
        num_pages=rng.randint(6, 20),
        page_size=rng.choice([2, 4, 8]),
        max_seq_len=64,
        max_batch_size=rng.randint(2, 8),
        max_prefill_tokens=rng.randint(4, 32),
        chunk_size=rng.randint(2, 16),
        enable_prefix_cache=seed % 2 == 0,
        enable_chunked_prefill=seed % 3 != 2,
        debug_invariants=True,
    )
    sched = Scheduler(cfg)
    eng = FakeEngine(sched, seed, sample_first=None)
    live = []
    for rid in range(60):
        n = rng.randint(1, 30)
        tokens = (SHARED[rid % 2] * 3)[: rng.randint(0, n)] + [rng.randrange(3) for _ in range(n)]
        m = rng.randint(0, 12)
        tokens = tokens[: cfg.max_seq_len - m]
        if -(-(len(tokens) + m) // cfg.page_size) > cfg.num_pages:
            continue
        s = seq(rid, tokens, m)
        sched.add(s)
        live.append(s)
        for _ in range(rng.randint(0, 3)):
            eng.step()
        if rng.random() < 0.1:
            sched.finish(rng.choice(live))
    eng.drain()
    assert_drained(sched)
    return eng


def test_random_load_drains():
    """Longer random runs than the state machine: many arrivals, pools that force preemption."""
    engines = [run_random_load(seed) for seed in range(20)]
    assert sum(e.preemptions > 0 for e in engines) >= 10
    assert sum(e.cached > 0 for e in engines) >= 5


# --- scenarios ------------------------------------------------------------------------------------------
def test_long_prompt_in_chunks():
    cfg = SchedulerConfig(
        num_pages=300, page_size=64, max_seq_len=32768, chunk_size=1024, debug_invariants=True
    )
    sched = Scheduler(cfg)
    rng = random.Random(1)
    s = seq(0, [rng.randrange(1000) for _ in range(16384)], 1)
    sched.add(s)
    for i in range(16):
        b = sched.schedule()
        assert len(b.items) == 1
        it = b.items[0]
        assert (it.start, it.num_tokens, it.reaches_end, it.is_decode) == (i * 1024, 1024, i == 15, False)
        assert len(s.pages) == (i + 1) * 16  # allocated as scheduled
        pos = list(range(i * 1024, (i + 1) * 1024))
        assert b.positions() == pos
        assert b.input_ids() == s.token_ids[i * 1024 : (i + 1) * 1024]
        assert b.out_loc(64) == [s.pages[p // 64] * 64 + p % 64 for p in pos]
        sched.complete(b)
        assert s.num_computed == (i + 1) * 1024
    assert sched.schedule() is None  # waiting for the engine's token
    sched.finish(s)
    assert_drained(sched)


def test_mixed_steps_decode_during_long_prefill():
    cfg = SchedulerConfig(
        num_pages=400, page_size=64, max_seq_len=32768, chunk_size=1024, debug_invariants=True
    )
    sched = Scheduler(cfg)
    eng = FakeEngine(sched, vocab=1000)
    a = seq(0, list(range(10)), 100)
    sched.add(a)
    eng.step()  # a's prefill; a now has a sampled token to feed
    b = seq(1, [eng.rng.randrange(1000) for _ in range(16384)], 1)
    sched.add(b)
    for i in range(16):
        n_before = len(a.token_ids)
        batch = eng.step()
        dec, chunk = batch.items
        assert dec.seq is a and dec.is_decode and dec.start == n_before - 1
        assert chunk.seq is b and (chunk.start, chunk.num_tokens) == (i * 1024, 1024)
        assert batch.positions()[0] == n_before - 1 and batch.num_tokens() == 1025
        assert len(a.token_ids) == n_before + 1
    assert b.status is SeqStatus.FINISHED  # max_new_tokens=1: finished at its first token
    sched.finish(a)
    assert_drained(sched)


def test_mixed_prefill_tokens_caps_prefill_beside_decodes():
    cfg = SchedulerConfig(num_pages=200, page_size=64, max_seq_len=8192, chunk_size=1024, mixed_prefill_tokens=256,
                          debug_invariants=True)
    sched = Scheduler(cfg)
    eng = FakeEngine(sched, vocab=1000)
    b = seq(1, [eng.rng.randrange(1000) for _ in range(3000)], 1)
    sched.add(b)
    assert eng.step().num_tokens() == 1024  # no decodes yet: a full chunk
    a = seq(0, list(range(10)), 100)
    sched.add(a)
    assert eng.step().num_tokens() == 1024 + 10  # still no decodes: b's chunk and a's prompt
    for _ in range(3):
        batch = eng.step()
        dec, chunk = batch.items
        assert dec.seq is a and dec.is_decode and chunk.seq is b and chunk.num_tokens <= 256
    sched.finish(a)
    while b.status is not SeqStatus.FINISHED:
        eng.step()
    assert_drained(sched)


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("sample_first", [True, False])
def test_prefix_reuse_feeds_fewer_tokens(prefix, sample_first):
    cfg = SchedulerConfig(num_pages=64, page_size=64, enable_prefix_cache=prefix, debug_invariants=True)
    sched = Scheduler(cfg)
    eng = FakeEngine(sched, vocab=1000, sample_first=sample_first)
    prompt = [eng.rng.randrange(1000) for _ in range(1000)]
    sched.add(seq(0, prompt, 1))
    eng.drain()
    assert eng.fed == 1000
    second = seq(1, prompt, 1)
    sched.add(second)
    eng.drain()
    fed = eng.fed - 1000
    if prefix:
        assert (fed, second.num_cached_tokens) == (1000 - 960, 960)  # 15 full pages reused
    else:
        assert (fed, second.num_cached_tokens) == (1000, 0)
    assert_drained(sched)


def test_whole_prompt_match_still_feeds_a_token():
    cfg = SchedulerConfig(num_pages=16, page_size=4, debug_invariants=True)
    sched = Scheduler(cfg)
    eng = FakeEngine(sched)
    sched.add(seq(0, list(range(8)), 1))
    eng.drain()
    s = seq(1, list(range(8)), 2)
    sched.add(s)
    b = eng.step()
    assert (b.items[0].start, b.items[0].num_tokens, s.num_cached_tokens) == (4, 4, 4)  # matched tokens[:7]
    s2 = seq(2, list(range(9)), 1)
    sched.add(s2)
    b = eng.step()
    assert (b.items[-1].start, b.items[-1].num_tokens) == (8, 1)  # 8 tokens cached: one left to feed
    eng.drain()
    assert_drained(sched)


def test_generated_tokens_are_cached():
    cfg = SchedulerConfig(num_pages=16, page_size=4, debug_invariants=True)
    sched = Scheduler(cfg)
    eng = FakeEngine(sched)
    first = seq(0, [1, 2, 3], 6)
    sched.add(first)
    eng.drain()
    follow_up = seq(1, first.token_ids + [0], 1)  # a next turn: prompt = the whole first conversation
    sched.add(follow_up)
    eng.step()
    assert follow_up.num_cached_tokens == 8
    eng.drain()
    assert_drained(sched)


def test_max_batch_size_respected():
    cfg = SchedulerConfig(num_pages=64, page_size=4, max_batch_size=3, debug_invariants=True)
    sched = Scheduler(cfg)
    eng = FakeEngine(sched)
    for rid in range(10):
        sched.add(seq(rid, [rid % 3] * (rid + 1), 5))
    peak = 0
    while sched.has_work():
        b = eng.step()
        assert len(b.items) <= 3 and sched.num_running <= 3
        peak = max(peak, len(b.items))
    assert peak == 3
    assert_drained(sched)


def test_rejection_names_the_numbers():
    sched = Scheduler(SchedulerConfig(num_pages=16, page_size=64, max_seq_len=1024))
    with pytest.raises(
        ValueError, match=r"rid=7 needs 1000 prompt \+ 100 new = 1100 tokens > max_seq_len=1024"
    ):
        sched.add(seq(7, [0] * 1000, 100))
    sched = Scheduler(SchedulerConfig(num_pages=16, page_size=64, max_seq_len=4096))
    with pytest.raises(ValueError, match=r"rid=8 needs 17 pages of 64 tokens .* > num_pages=16"):
        sched.add(seq(8, [0] * 1000, 25))
    with pytest.raises(ValueError, match="no tokens"):
        sched.add(seq(9, [], 5))
    sched.add(seq(10, [0] * 1000, 24))  # exactly 16 pages fits
    with pytest.raises(ValueError, match="not a fresh sequence"):
        sched.add(sched.waiting[0])
    with pytest.raises(ValueError, match="chunk_size"):
        SchedulerConfig(num_pages=4, chunk_size=0)


def test_preempts_newest_and_recomputes():
    cfg = SchedulerConfig(num_pages=6, page_size=4, enable_prefix_cache=False, debug_invariants=True)
    sched = Scheduler(cfg)
    eng = FakeEngine(sched)
    a, b = seq(0, [1] * 8, 12), seq(1, [2] * 8, 12)
    sched.add(a)
    sched.add(b)
    eng.step()  # both prefilled: 4 pages used
    preempted = None
    while preempted is None:
        batch = eng.step()
        if batch.preempted:
            preempted = batch
    assert preempted.preempted == [b] and [it.seq for it in preempted.items] == [a]
    assert (b.status, b.num_computed, b.pages, b.num_preemptions) == (SeqStatus.WAITING, 0, [], 1)
    assert sched.waiting[0] is b and len(b.token_ids) == 13  # 8 prompt + 5 generated, kept
    tokens_b = list(b.token_ids)
    while a.status is not SeqStatus.FINISHED:  # b is newer than a: it waits, never preempts a
        batch = eng.step()
        assert [it.seq for it in batch.items] == [a]
    batch = eng.step()
    (it,) = batch.items
    assert it.seq is b and (it.start, it.num_tokens, it.reaches_end) == (0, 13, True)
    assert b.token_ids[:13] == tokens_b
    eng.drain()
    assert b.num_preemptions == 1
    assert_drained(sched)


def test_preempted_sequence_reuses_its_cached_pages():
    cfg = SchedulerConfig(num_pages=8, page_size=4, debug_invariants=True)
    sched = Scheduler(cfg)
    eng = FakeEngine(sched)
    a, b = seq(0, [1] * 12, 16), seq(1, [2] * 12, 12)
    sched.add(a)
    sched.add(b)
    for _ in range(5):  # prefill, then tokens 12..15: both hold 4 full pages, the pool is full
        eng.step()
    assert sched.allocator.num_free == 0 and b.num_preemptions == 0
    batch = eng.step()  # a needs a 5th page
    assert batch.preempted == [b] and sched.prefix_cache.num_cached_pages == 7  # b's last page evicted
    while b.status is SeqStatus.WAITING:
        assert eng.step() is not None
    # a took 2 more of b's cached pages before finishing; b's first page (tokens 0..3) survived
    assert b.num_cached_tokens == 4 and b.num_preemptions == 1 and a.num_preemptions == 0
    eng.drain()
    assert_drained(sched)


def test_waiting_old_sequence_preempts_newer_ones():
    """A re-admitted (older) sequence may take pages from newer running ones; a new one never does."""
    cfg = SchedulerConfig(num_pages=6, page_size=4, enable_prefix_cache=False, debug_invariants=True)
    sched = Scheduler(cfg)
    eng = FakeEngine(sched)
    old, new = seq(0, [1] * 16, 4), seq(1, [2] * 8, 4)
    sched.add(old)
    sched.add(new)
    eng.step()  # old gets 4 pages, new 2 - the pool is full
    assert old.status is SeqStatus.RUNNING and new.status is SeqStatus.RUNNING
    eng.step()  # old needs a 5th page: new is preempted
    assert new.status is SeqStatus.WAITING and new.num_preemptions == 1
    late = seq(2, [0] * 4, 1)
    sched.add(late)
    eng.drain()
    assert old.num_preemptions == 0 and late.num_preemptions == 0
    assert_drained(sched)


def test_no_chunking_schedules_whole_prompts():
    cfg = SchedulerConfig(
        num_pages=64, page_size=4, max_prefill_tokens=100, enable_chunked_prefill=False, debug_invariants=True
    )
    sched = Scheduler(cfg)
    eng = FakeEngine(sched)
    big, s1, s2 = seq(0, [0] * 150, 2), seq(1, [1] * 60, 2), seq(2, [2] * 60, 2)
    for s in (big, s1, s2):
        sched.add(s)
    b = eng.step()
    assert [(it.seq, it.num_tokens) for it in b.items] == [(big, 150)]  # too long, but alone: admitted
    b = eng.step()
    assert [(it.seq, it.num_tokens) for it in b.items] == [(big, 1), (s1, 60)]  # s2 would exceed the budget
    b = eng.step()
    assert [(it.seq, it.num_tokens) for it in b.items] == [(s1, 1), (s2, 60)]
    eng.drain()
    assert_drained(sched)


def test_cancel_waiting_and_in_flight():
    cfg = SchedulerConfig(num_pages=16, page_size=4, max_batch_size=1, debug_invariants=True)
    sched = Scheduler(cfg)
    a, b = seq(0, [1] * 10, 5), seq(1, [2] * 10, 5)
    sched.add(a)
    sched.add(b)
    sched.finish(b)  # cancelled before admission
    assert b.status is SeqStatus.FINISHED and sched.waiting == (a,)
    sched.finish(b)  # idempotent
    batch = sched.schedule()
    with pytest.raises(RuntimeError, match="not been completed"):
        sched.schedule()
    sched.finish(a)  # cancelled while its batch is on the device: pages kept until complete
    assert a.status is SeqStatus.FINISHED and not sched.has_work() and sched.allocator.num_free == 13
    sched.complete(batch)
    assert a.num_computed == 10 and not a.pages
    assert sched.prefix_cache.num_cached_pages == 2 and sched.allocator.num_free == 14  # 2 full pages cached
    with pytest.raises(RuntimeError, match="not the batch"):
        sched.complete(batch)
    with pytest.raises(ValueError, match="rid=5 is not waiting"):
        sched.finish(seq(5, [1], 1))
    assert_drained(sched)


def test_abort_schedules_the_same_tokens_again():
    cfg = SchedulerConfig(num_pages=16, page_size=4, debug_invariants=True)
    sched = Scheduler(cfg)
    a, b = seq(0, [1] * 10, 5), seq(1, [2] * 6, 5)
    sched.add(a)
    sched.add(b)
    first = sched.schedule()
    sched.finish(b)
    sched.abort(first)  # the forward failed: nothing was written
    assert (a.num_computed, b.pages, sched.prefix_cache.num_cached_pages) == (0, [], 0)
    again = sched.schedule()
    assert [(it.seq, it.start, it.num_tokens) for it in again.items] == [(a, 0, 10)]
    with pytest.raises(RuntimeError, match="abort: not the batch"):
        sched.abort(first)
    sched.complete(again)
    sched.finish(a)
    assert_drained(sched)
