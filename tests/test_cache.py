"""PageAllocator and RadixCache: basics, errors, LRU eviction, locking, hash collisions, disabled mode."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nmoe.serve import cache as cache_mod
from nmoe.serve.cache import PageAllocator, RadixCache

PS = 4


def toks(*pages: int) -> list[int]:
    """A token list of whole pages; page value v is PS copies of v."""
    return [v for v in pages for _ in range(PS)]


def held(alloc: PageAllocator, n: int) -> list[int]:
    pages = alloc.alloc(n)
    assert pages is not None
    return pages


# --- PageAllocator ------------------------------------------------------------------------------------
def test_alloc_free_roundtrip():
    a = PageAllocator(8)
    assert (a.num_total, a.num_free) == (8, 8)
    p = a.alloc(3)
    assert p == [0, 1, 2] and a.num_free == 5
    assert all(a.refcount(x) == 1 for x in p)
    assert a.alloc(0) == []
    a.decref(p)
    assert a.num_free == 8 and all(a.refcount(x) == 0 for x in p)
    a.check_invariants()


def test_alloc_never_partial():
    a = PageAllocator(4)
    held(a, 3)
    assert a.alloc(2) is None
    assert a.num_free == 1
    assert a.alloc(1) is not None and a.alloc(1) is None
    with pytest.raises(ValueError, match="n must be >= 0"):
        a.alloc(-1)


def test_refcounts_share_pages():
    a = PageAllocator(4)
    p = held(a, 2)
    a.incref(p)
    a.incref([p[0]])
    assert a.refcount(p[0]) == 3 and a.refcount(p[1]) == 2
    a.decref(p)
    a.decref(p)
    assert a.num_free == 3 and a.refcount(p[0]) == 1
    a.decref([p[0]])
    assert a.num_free == 4
    a.check_invariants()


def test_allocator_errors_name_the_page():
    a = PageAllocator(4)
    p = held(a, 1)[0]
    with pytest.raises(ValueError, match="decref: page 3 is free"):
        a.decref([3])
    with pytest.raises(ValueError, match="incref: page 2 is free"):
        a.incref([2])
    with pytest.raises(ValueError, match=r"page 9 is out of range \[0, 4\)"):
        a.decref([9])
    with pytest.raises(ValueError, match="page -1 is out of range"):
        a.refcount(-1)
    # A failed call changes nothing.
    with pytest.raises(ValueError, match="page 3"):
        a.decref([p, 3])
    assert a.refcount(p) == 1
    with pytest.raises(ValueError, match=f"decref: page {p} is free"):
        a.decref([p, p])
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(0)
    a.check_invariants()


# --- RadixCache ---------------------------------------------------------------------------------------
def make(num_pages: int = 16, enabled: bool = True) -> tuple[PageAllocator, RadixCache]:
    a = PageAllocator(num_pages)
    return a, RadixCache(a, PS, enabled=enabled)


def insert_owned(a: PageAllocator, c: RadixCache, tokens: list[int]) -> list[int]:
    """Insert fresh pages for `tokens`, then drop the caller's reference (the tree's own remains)."""
    pages = held(a, len(tokens) // PS)
    c.insert(tokens, pages)
    a.decref(pages)
    return pages


def test_match_full_pages_only_and_incref():
    a, c = make()
    pages = insert_owned(a, c, toks(1, 2, 3))
    assert c.num_cached_pages == 3 and all(a.refcount(p) == 1 for p in pages)
    m = c.match(toks(1, 2, 3)[:-1])  # the third page is partial
    assert m.pages == pages[:2] and m.num_tokens == 2 * PS
    assert [a.refcount(p) for p in pages] == [2, 2, 1]
    m2 = c.match(toks(1, 2, 3, 4))
    assert m2.pages == pages and m2.num_tokens == 3 * PS
    assert c.match(toks(2, 1)).pages == []
    assert c.match([]).pages == [] and c.match([1] * (PS - 1)).num_tokens == 0
    c.check_invariants()


def test_insert_keeps_existing_pages():
    a, c = make()
    first = insert_owned(a, c, toks(1, 2))
    mine = held(a, 3)
    assert c.insert(toks(1, 2, 5), mine) == 1  # only the third page is new
    assert [a.refcount(p) for p in mine] == [1, 1, 2]
    assert c.match(toks(1, 2, 5)).pages == [first[0], first[1], mine[2]]
    with pytest.raises(ValueError, match="do not fill"):
        c.insert(toks(1)[:-1], [mine[0]])


def test_evict_lru_order_and_count():
    a, c = make()
    pa = insert_owned(a, c, toks(1))
    pb = insert_owned(a, c, toks(2))
    pc = insert_owned(a, c, toks(3))
    c.release(c.match(toks(1)).handle)  # touching A makes B the oldest
    a.decref(pa)  # give back match's reference
    assert c.evict(0) == 0
    assert c.evict(1) == 1 and a.refcount(pb[0]) == 0
    assert c.evict(1) == 1 and a.refcount(pc[0]) == 0
    assert c.match(toks(1)).pages == pa


def test_evict_leaves_before_parents():
    a, c = make()
    insert_owned(a, c, toks(1, 2, 3))
    insert_owned(a, c, toks(7))
    # toks(7) is the newest, but only leaves go: 3, then 2, then 1 become leaves in turn (they inherit
    # the leaf's recency, which is older than 7's).
    assert c.evict(3) == 3
    assert c.num_cached_pages == 1 and c.match(toks(7)).num_tokens == PS
    assert c.evict(100) == 0  # 7 is locked by that match
    c.check_invariants()


def test_locked_paths_are_not_evicted():
    a, c = make()
    pages = insert_owned(a, c, toks(1, 2))
    m = c.match(toks(1, 2))
    assert c.evict(10) == 0 and c.num_cached_pages == 2
    c.check_invariants([m.handle])
    c.release(m.handle)
    with pytest.raises(ValueError, match="already released"):
        c.release(m.handle)
    # Evicting drops only the tree's reference: the caller still holds the matched pages.
    assert c.evict(10) == 0 and c.num_cached_pages == 0
    assert [a.refcount(p) for p in pages] == [1, 1]
    a.decref(pages)
    assert a.num_free == a.num_total


def test_extend_moves_the_lock():
    a, c = make()
    m = c.match(toks(1, 2, 3))
    assert m.pages == []
    pages = held(a, 3)
    t = toks(1, 2, 3) + [9]  # longer than what is read
    assert c.extend(m.handle, t, pages, 2) == 2
    assert m.handle.num_pages == 2 and c.path_tokens(m.handle) == toks(1, 2)
    assert c.extend(m.handle, t, pages, 3) == 1
    c.check_invariants([m.handle])
    assert c.evict(10) == 0
    c.release(m.handle)
    a.decref(pages)
    assert c.evict(10) == 3 and a.num_free == a.num_total
    with pytest.raises(ValueError, match="already released"):
        c.extend(m.handle, t, pages, 3)


def test_extend_adopts_stored_pages():
    a, c = make()
    stored = insert_owned(a, c, toks(1, 2))
    m = c.match([])
    mine = held(a, 3)
    table = list(mine)
    assert c.extend(m.handle, toks(1, 2, 3), table, 3) == 1
    assert table == stored + [mine[2]]  # the duplicates were swapped for the stored pages...
    assert [a.refcount(p) for p in mine] == [0, 0, 2]  # ...and freed
    assert [a.refcount(p) for p in stored] == [2, 2] and c.path_pages(m.handle) == table
    c.check_invariants([m.handle])


def test_hash_collision_never_returns_wrong_pages(monkeypatch):
    monkeypatch.setattr(cache_mod, "page_hash", lambda tokens: 0)
    a, c = make()
    p1 = insert_owned(a, c, toks(1, 2))
    p2 = insert_owned(a, c, toks(1, 3))
    p3 = insert_owned(a, c, toks(4))
    assert c.match(toks(1, 2)).pages == p1
    assert c.match(toks(1, 3)).pages == [p1[0], p2[1]]
    assert c.match(toks(4, 2)).pages == p3
    assert c.match(toks(5)).pages == [] and c.match(toks(1, 5)).pages == [p1[0]]
    c.check_invariants()


def test_disabled_mode():
    a, c = make(enabled=False)
    pages = held(a, 2)
    assert c.insert(toks(1, 2), pages) == 0
    m = c.match(toks(1, 2))
    assert (m.pages, m.num_tokens, c.num_cached_pages) == ([], 0, 0)
    assert c.extend(m.handle, toks(1, 2), pages, 2) == 0
    assert c.evict(5) == 0
    c.release(m.handle)
    assert [a.refcount(p) for p in pages] == [1, 1]


class CacheMachine(RuleBasedStateMachine):
    """Random insert / match / release / evict against a dict model of which prefixes are cached."""

    def __init__(self):
        super().__init__()
        self.alloc, self.cache = make(num_pages=24)
        self.handles: list = []  # (handle, pages the match gave us)

    @rule(pages=st.lists(st.integers(0, 2), min_size=1, max_size=4))
    def insert(self, pages):
        tokens = toks(*pages)
        if self.alloc.num_free < len(pages):
            return
        insert_owned(self.alloc, self.cache, tokens)
        m = self.cache.match(tokens)
        assert m.num_tokens == len(tokens)
        self.cache.release(m.handle)
        self.alloc.decref(m.pages)

    @rule(pages=st.lists(st.integers(0, 2), max_size=5), keep=st.booleans())
    def match(self, pages, keep):
        tokens = toks(*pages)
        m = self.cache.match(tokens)
        assert m.num_tokens == len(m.pages) * PS
        assert self.cache.path_tokens(m.handle) == tokens[: m.num_tokens]
        if keep:
            self.handles.append((m.handle, m.pages))
        else:
            self.cache.release(m.handle)
            self.alloc.decref(m.pages)

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def release(self, data):
        h, pages = self.handles.pop(data.draw(st.integers(0, len(self.handles) - 1)))
        self.cache.release(h)
        self.alloc.decref(pages)

    @rule(n=st.integers(0, 6))
    def evict(self, n):
        before = self.alloc.num_free
        freed = self.cache.evict(n)
        assert freed <= n and self.alloc.num_free == before + freed

    @invariant()
    def consistent(self):
        self.alloc.check_invariants()
        self.cache.check_invariants([h for h, _ in self.handles])

    def teardown(self):
        for h, pages in self.handles:
            self.cache.release(h)
            self.alloc.decref(pages)
        self.cache.evict(self.alloc.num_total)
        assert self.cache.num_cached_pages == 0 and self.alloc.num_free == self.alloc.num_total


CacheMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # no explain: slow on failure
)
test_cache_machine = CacheMachine.TestCase
