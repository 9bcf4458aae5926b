"""KV page allocator and radix prefix cache: CPU bookkeeping over page ids, no device code.

The KV pool is `num_pages` pages of `page_size` tokens; the device only ever sees page ids (a block
table per sequence). `PageAllocator` counts references to each page; `RadixCache` is a prefix tree
whose every edge is one full page of token ids, so a prompt that starts with a cached prefix can reuse
those pages instead of recomputing them. A page is shared only read-only: the tree stores full pages
and nobody writes a slot of a page whose count is above 1 (the scheduler checks this).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass


class PageAllocator:
    """Reference-counted pool of pages `0 .. num_pages-1`.

    A page is free when its count is 0. `alloc` hands out free pages with count 1; every further holder
    (another sequence, the prefix tree) takes its own reference with `incref` and gives it back with
    `decref`; the page goes back to the free list when its last reference goes. Misuse (a page id out
    of range, `incref`/`decref` of a free page) raises ValueError naming the page, before any count in
    that call changes, except that a page repeated in one `decref` call more often than its count is
    caught only when its count reaches 0.
    """

    def __init__(self, num_pages: int):
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"PageAllocator: num_pages must be a positive integer, got {num_pages!r}")
        self._ref = [0] * num_pages
        # A stack; alloc takes from the end, so a fresh pool hands out 0, 1, 2, ...
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_total(self) -> int:
        return len(self._ref)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, page: int) -> int:
        self._check_range(page, "refcount")
        return self._ref[page]

    def alloc(self, n: int) -> list[int] | None:
        """`n` free pages, each now with count 1; None (and nothing taken) if fewer than `n` are free."""
        if n < 0:
            raise ValueError(f"alloc: n must be >= 0, got {n}")
        free = self._free
        if n > len(free):
            return None
        if n == 0:
            return []
        pages = free[-n:]
        del free[-n:]
        pages.reverse()
        ref = self._ref
        for p in pages:
            ref[p] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """Take one more reference on each page (each must be allocated; repeats count twice)."""
        pages = list(pages)
        self._check_held(pages, "incref")
        ref = self._ref
        for p in pages:
            ref[p] += 1

    def decref(self, pages: Iterable[int]) -> None:
        """Drop one reference on each page; a page whose count reaches 0 is free again."""
        pages = list(pages)
        self._check_held(pages, "decref")
        ref, free = self._ref, self._free
        for p in pages:
            c = ref[p]
            if c == 0:
                raise ValueError(f"decref: page {p} is free (listed more times than its reference count)")
            ref[p] = c - 1
            if c == 1:
                free.append(p)

    def check_invariants(self) -> None:
        """Raise AssertionError unless free + used == total and the free list is exactly the 0-count pages.

        Scans every page: for tests and debug mode only.
        """
        free = set(self._free)
        assert len(free) == len(self._free), f"free list holds duplicates: {sorted(self._free)}"
        for p, c in enumerate(self._ref):
            assert c >= 0, f"page {p} has a negative reference count {c}"
            assert (c == 0) == (p in free), (
                f"page {p}: reference count {c} but free-list membership {p in free}"
            )
        used = sum(1 for c in self._ref if c > 0)
        assert len(free) + used == self.num_total, f"free {len(free)} + used {used} != total {self.num_total}"

    def _check_range(self, page: int, op: str) -> None:
        if not 0 <= page < len(self._ref):
            raise ValueError(f"{op}: page {page} is out of range [0, {len(self._ref)})")

    def _check_held(self, pages: list[int], op: str) -> None:
        ref = self._ref
        for p in pages:
            self._check_range(p, op)
            if ref[p] == 0:
                raise ValueError(f"{op}: page {p} is free")


def page_hash(tokens: tuple[int, ...]) -> int:
    """Bucket key of one page's token ids. Only narrows a child lookup; the tokens are always compared."""
    return hash(tokens)


class _Node:
    """One full page of the tree: `key` is its `page_size` token ids, `page` the page that holds their KV."""

    __slots__ = ("key", "hash", "page", "parent", "children", "lock", "last_access")

    def __init__(self, key: tuple[int, ...], h: int, page: int, parent: _Node | None):
        self.key = key
        self.hash = h
        self.page = page
        self.parent = parent  # None for the root and for evicted nodes
        self.children: dict[int, list[_Node]] = {}  # page_hash(key) -> nodes with that hash
        self.lock = 0  # number of live handles whose path includes this node
        self.last_access = 0


@dataclass(eq=False)
class PrefixHandle:
    """A lock on the root-to-`node` path (`num_pages` deep); locked nodes are never evicted.

    Returned by `RadixCache.match`, moved deeper by `RadixCache.extend`, given back once with `release`.
    """

    node: _Node
    num_pages: int
    active: bool = True


@dataclass
class PrefixMatch:
    pages: list[int]  # the matched prefix's pages, in order, each incref'd for the caller
    num_tokens: int  # len(pages) * page_size
    handle: PrefixHandle


class RadixCache:
    """Prefix tree over full pages of token ids, sharing KV pages between sequences.

    Contracts:
    - Only full pages are cached or matched; an edge is exactly `page_size` tokens.
    - Children are found by `page_hash` of the page's tokens, then the stored tokens are compared, so a
      hash collision can cost time but never returns another prefix's pages.
    - The tree holds one reference on every page it stores; `match` takes one more per matched page for
      the caller (the caller decrefs them itself) and locks the matched path until `release`.
    - Neither `insert` nor `extend` replaces a page already stored for a prefix. After `insert` the
      caller keeps its own duplicate; `extend` makes the caller adopt the stored page instead (its
      duplicate is freed), so a sequence's locked path is made of its own pages.
    - `evict` removes only unlocked leaves, least recently used first (a logical clock ticked by every
      `match`/`insert`/`extend`, not wall time); evict(0) is always safe and so is asking for more
      than can be evicted.
    - With `enabled=False` nothing is ever stored: `match` returns no pages (with a handle that can be
      released), `insert`/`extend`/`evict` do nothing and return 0.
    """

    def __init__(self, allocator: PageAllocator, page_size: int, enabled: bool = True):
        if page_size < 1:
            raise ValueError(f"RadixCache: page_size must be >= 1, got {page_size}")
        self.allocator = allocator
        self.page_size = page_size
        self.enabled = enabled
        self._root = _Node((), 0, -1, None)
        self._num_nodes = 0
        self._clock = 0
        # Eviction candidates as (last_access, tie-break, node). Entries go stale when a node is
        # touched, gains a child, is locked or is evicted; `evict` skips those, and `_maybe_push`
        # rebuilds the heap when stale entries outnumber the nodes (amortized O(1) per push).
        self._heap: list[tuple[int, int, _Node]] = []
        self._order = itertools.count()  # tie-break, so nodes themselves are never compared

    @property
    def num_cached_pages(self) -> int:
        return self._num_nodes

    def match(self, tokens: Sequence[int], limit: int | None = None) -> PrefixMatch:
        """Longest cached prefix of tokens[:limit] in full pages; its nodes locked, its pages incref'd.

        `limit` (default: all) saves the caller a copy of a long token list."""
        if not self.enabled:
            return PrefixMatch([], 0, PrefixHandle(self._root, 0))
        tick = self._tick()
        ps = self.page_size
        n = len(tokens) if limit is None else max(0, min(limit, len(tokens)))
        node, pages = self._root, []
        for start in range(0, n - ps + 1, ps):
            child = self._child(node, tuple(tokens[start : start + ps]))
            if child is None:
                break
            child.lock += 1
            child.last_access = tick
            pages.append(child.page)
            node = child
        self.allocator.incref(pages)
        return PrefixMatch(pages, len(pages) * ps, PrefixHandle(node, len(pages)))

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> int:
        """Store `pages` as the KV of `tokens` (len(tokens) == len(pages) * page_size); returns how many
        pages the tree newly stored (and took a reference on). Locks nothing."""
        if len(tokens) != len(pages) * self.page_size:
            raise ValueError(
                f"insert: {len(tokens)} tokens do not fill {len(pages)} pages of {self.page_size} tokens"
            )
        if not self.enabled:
            return 0
        node, added = self._descend(self._root, tokens, pages, 0, len(pages), adopt=False)
        self._maybe_push(node)
        return added

    def extend(self, handle: PrefixHandle, tokens: Sequence[int], pages: list[int], num_pages: int) -> int:
        """Continue `handle`'s path to `num_pages` pages: page i (handle.num_pages <= i < num_pages) holds
        tokens[i*page_size : (i+1)*page_size] in pages[i]. tokens[:handle.num_pages*page_size] must be the
        path the handle already locks; `tokens` and `pages` may be longer than what is read. The handle
        (and its lock) moves to the deepest node. Returns how many pages the tree newly stored.

        Unlike `insert`, where the tree already stores a page for a prefix the caller adopts it:
        pages[i] is replaced by the stored page and the caller's reference moves to it (its duplicate
        is decref'd, so freed). A sequence therefore never holds two copies of a cached prefix, and the
        pages on its locked path are exactly its own pages[:handle.num_pages]."""
        if not handle.active:
            raise ValueError("extend: the handle was already released")
        if not self.enabled or num_pages <= handle.num_pages:
            return 0
        if len(tokens) < num_pages * self.page_size or len(pages) < num_pages:
            raise ValueError(
                f"extend: {num_pages} pages of {self.page_size} tokens need that many pages and tokens; "
                f"got {len(pages)} pages and {len(tokens)} tokens"
            )
        node, added = self._descend(handle.node, tokens, pages, handle.num_pages, num_pages, adopt=True)
        handle.node = node
        handle.num_pages = num_pages
        return added

    def release(self, handle: PrefixHandle) -> None:
        """Unlock the handle's path (once; a second release raises ValueError). Pages are not touched."""
        if not handle.active:
            raise ValueError("release: the handle was already released")
        handle.active = False
        node = handle.node
        while node.parent is not None:
            node.lock -= 1
            node = node.parent
        self._maybe_push(handle.node)

    def evict(self, num_pages: int) -> int:
        """Evict unlocked leaves, least recently used first, dropping the tree's reference on their pages,
        until `num_pages` pages went back to the free list or nothing is evictable; returns how many did.

        A leaf whose page someone else still holds is evicted but not counted (the scheduler never has
        such leaves: a sequence locks the path of every tree page it holds).
        """
        if not self.enabled or num_pages <= 0:
            return 0
        alloc, root = self.allocator, self._root
        freed = 0
        while freed < num_pages and self._heap:  # not cached in a local: _maybe_push may rebuild it
            stamp, _, node = heapq.heappop(self._heap)
            if node.parent is None or node.lock or node.children or node.last_access != stamp:
                continue  # stale entry
            parent = node.parent
            bucket = parent.children[node.hash]
            bucket.remove(node)
            if not bucket:
                del parent.children[node.hash]
            node.parent = None
            self._num_nodes -= 1
            if alloc.refcount(node.page) == 1:
                freed += 1
            alloc.decref((node.page,))
            # A path is as recent as its deepest use: `extend` touches only the pages it adds, so the
            # parent inherits the child's time when it becomes a leaf (O(1) instead of touching ancestors).
            if stamp > parent.last_access and parent is not root:
                parent.last_access = stamp
            self._maybe_push(parent)
        return freed

    # --- inspection (O(tree) or O(depth); tests and debug checks) ------------------------------------
    def cached_pages(self) -> list[int]:
        """Every page the tree holds a reference on."""
        return [n.page for n in self._nodes()]

    def path_tokens(self, handle: PrefixHandle) -> list[int]:
        """The token ids of the handle's path, root first."""
        return [t for node in self._path(handle) for t in node.key]

    def path_pages(self, handle: PrefixHandle) -> list[int]:
        """The pages of the handle's path, root first."""
        return [node.page for node in self._path(handle)]

    def check_invariants(self, handles: Iterable[PrefixHandle] | None = None) -> None:
        """Raise AssertionError if the tree is inconsistent. With `handles` (every live handle), also
        check that each node's lock count is exactly the number of those handles whose path covers it."""
        ps, alloc = self.page_size, self.allocator
        seen: set[int] = set()
        count = 0
        for node in self._nodes():
            count += 1
            assert len(node.key) == ps, f"page {node.page}: key of {len(node.key)} tokens, page_size {ps}"
            assert node in node.parent.children.get(node.hash, ()), (
                f"page {node.page}: not in its parent's bucket"
            )
            assert node.page not in seen, f"page {node.page} is stored in two tree nodes"
            seen.add(node.page)
            assert alloc.refcount(node.page) >= 1, f"page {node.page} is in the tree but free"
            assert node.lock >= 0, f"page {node.page}: negative lock count {node.lock}"
            assert page_hash(node.key) == node.hash, f"page {node.page}: stored under a stale hash"
            for child in (c for bucket in node.children.values() for c in bucket):
                assert child.parent is node, f"page {child.page}: parent link broken"
        assert count == self._num_nodes, f"tree has {count} nodes, counter says {self._num_nodes}"
        if handles is None:
            return
        expected: dict[_Node, int] = {}
        for h in handles:
            assert h.active, "a live handle was released"
            node, depth = h.node, 0
            while node.parent is not None:
                expected[node] = expected.get(node, 0) + 1
                node, depth = node.parent, depth + 1
            assert node is self._root, f"handle of {h.num_pages} pages points at an evicted node"
            assert depth == h.num_pages, f"handle says {h.num_pages} pages, its path has {depth}"
        for node in self._nodes():
            want = expected.get(node, 0)
            assert node.lock == want, f"page {node.page}: lock count {node.lock}, {want} handles cover it"

    # --- internals ----------------------------------------------------------------------------------
    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _child(self, node: _Node, key: tuple[int, ...]) -> _Node | None:
        for child in node.children.get(page_hash(key), ()):
            if child.key == key:
                return child
        return None

    def _descend(
        self, node: _Node, tokens: Sequence[int], pages: Sequence[int], first: int, last: int, adopt: bool
    ) -> tuple[_Node, int]:
        """Walk (creating what is missing) pages first..last-1 below `node`; returns (deepest, created).
        With `adopt` (extend) the walked nodes are locked and the caller adopts already stored pages."""
        tick, ps, alloc = self._tick(), self.page_size, self.allocator
        added = 0
        for i in range(first, last):
            key = tuple(tokens[i * ps : (i + 1) * ps])
            h = page_hash(key)
            bucket = node.children.get(h)
            child = next((c for c in bucket if c.key == key), None) if bucket else None
            if child is None:
                page = pages[i]
                alloc.incref((page,))
                child = _Node(key, h, page, node)
                if bucket is None:
                    node.children[h] = [child]
                else:
                    bucket.append(child)
                self._num_nodes += 1
                added += 1
            elif adopt and child.page != pages[i]:
                alloc.incref((child.page,))
                alloc.decref((pages[i],))
                pages[i] = child.page
            child.last_access = tick
            if adopt:
                child.lock += 1
            node = child
        return node, added

    def _maybe_push(self, node: _Node) -> None:
        """Queue `node` for eviction if it is an unlocked leaf (not the root)."""
        if node.parent is None or node.lock or node.children:
            return
        if len(self._heap) > 2 * self._num_nodes + 64:
            order = self._order
            self._heap = [
                (n.last_access, next(order), n) for n in self._nodes() if not n.lock and not n.children
            ]
            heapq.heapify(self._heap)
            return  # the rebuild queued `node` too
        heapq.heappush(self._heap, (node.last_access, next(self._order), node))

    def _path(self, handle: PrefixHandle) -> list[_Node]:
        nodes = []
        node = handle.node
        while node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]

    def _nodes(self) -> Iterator[_Node]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            for bucket in node.children.values():
                stack.extend(bucket)
            if node is not self._root:
                yield node
