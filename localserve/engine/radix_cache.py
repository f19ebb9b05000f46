"""RadixCache: a radix tree over token ids whose nodes own KV pages.

Granularity is one page: a node's key is a whole number of pages of tokens and it holds
one page id per block_size tokens. The tree holds one reference on every page it owns
(BlockPool.ref_cnt), so a page leaves memory only when both the tree has evicted it and no
request lists it. `lock(node)` pins the path root..node against eviction while a request
reads those pages; `evict(n)` trims least-recently-used unlocked leaves, tail pages first.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Sequence

from localserve.engine.block_pool import BlockPool


class TreeNode:
    __slots__ = ("key", "pages", "children", "parent", "lock_ref", "last_access")

    def __init__(self, key: tuple[int, ...], pages: list[int], parent: TreeNode | None) -> None:
        self.key = key
        self.pages = pages
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_access = 0

    def __lt__(self, other: TreeNode) -> bool:  # heap order: least recently used first
        return self.last_access < other.last_access


class RadixCache:
    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self._clock = itertools.count(1)
        self.root = TreeNode((), [], None)
        self.root.lock_ref = 1  # never evicted
        self.num_pages = 0  # pages owned by the tree

    # -- lookup ---------------------------------------------------------------------------
    def match_prefix(self, tokens: Sequence[int]) -> tuple[list[int], TreeNode]:
        """Longest cached prefix of `tokens` in whole pages: (its pages, the node it ends at)."""
        pages: list[int] = []
        node, i, now = self.root, 0, next(self._clock)
        node.last_access = now
        bs = self.block_size
        while i + bs <= len(tokens):
            child = node.children.get(tuple(tokens[i : i + bs]))
            if child is None:
                break
            n = self._matching_pages(child.key, tokens, i)
            if n < len(child.pages):
                child = self._split(child, n)
            child.last_access = now
            pages.extend(child.pages)
            i += len(child.key)
            node = child
        return pages, node

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> int:
        """Caches `pages` as the KV of `tokens` (a whole number of pages).

        Returns how many leading tokens were already cached; the tree keeps its own pages
        for those and takes a reference only on the pages it adopts.
        """
        bs = self.block_size
        assert len(tokens) == len(pages) * bs, "insert takes whole pages"
        node, i, now = self.root, 0, next(self._clock)
        while i < len(tokens):
            child = node.children.get(tuple(tokens[i : i + bs]))
            if child is None:
                leaf = TreeNode(tuple(tokens[i:]), list(pages[i // bs :]), node)
                leaf.last_access = now
                node.children[leaf.key[:bs]] = leaf
                self.pool.incref(leaf.pages)
                self.num_pages += len(leaf.pages)
                return i
            n = self._matching_pages(child.key, tokens, i)
            if n < len(child.pages):
                child = self._split(child, n)
            child.last_access = now
            i += len(child.key)
            node = child
        return i

    def _matching_pages(self, key: tuple[int, ...], tokens: Sequence[int], start: int) -> int:
        bs, n = self.block_size, 0
        while (n + 1) * bs <= len(key) and start + (n + 1) * bs <= len(tokens):
            a, b = n * bs, (n + 1) * bs
            if key[a:b] != tuple(tokens[start + a : start + b]):
                break
            n += 1
        return n

    def _split(self, node: TreeNode, n_pages: int) -> TreeNode:
        """Splits `node` after n_pages pages; returns the new upper part (which keeps the parent link)."""
        assert 0 < n_pages < len(node.pages)
        cut = n_pages * self.block_size
        upper = TreeNode(node.key[:cut], node.pages[:n_pages], node.parent)
        upper.lock_ref = node.lock_ref
        upper.last_access = node.last_access
        node.parent.children[upper.key[: self.block_size]] = upper
        node.key, node.pages, node.parent = node.key[cut:], node.pages[n_pages:], upper
        upper.children[node.key[: self.block_size]] = node
        return upper

    # -- pinning --------------------------------------------------------------------------
    def lock(self, node: TreeNode) -> None:
        while node is not self.root:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        while node is not self.root:
            assert node.lock_ref > 0, "unlock without lock"
            node.lock_ref -= 1
            node = node.parent

    # -- eviction -------------------------------------------------------------------------
    def evict(self, num_pages: int) -> int:
        """Drops least-recently-used unlocked leaf pages until `num_pages` pages are free
        again in the pool (or nothing more can go); returns how many pages were freed."""
        heap = [n for n in self._nodes() if not n.children and n.lock_ref == 0 and n is not self.root]
        heapq.heapify(heap)
        freed = 0
        while freed < num_pages and heap:
            leaf = heapq.heappop(heap)
            k = min(len(leaf.pages), num_pages - freed)
            # trim from the tail so the shared beginning of the leaf survives longest
            dropped = leaf.pages[len(leaf.pages) - k :]
            self.num_pages -= k
            freed += self.pool.decref(dropped)
            if k == len(leaf.pages):
                parent = leaf.parent
                del parent.children[leaf.key[: self.block_size]]
                if parent is not self.root and not parent.children and parent.lock_ref == 0:
                    heapq.heappush(heap, parent)
            else:
                leaf.pages = leaf.pages[: len(leaf.pages) - k]
                leaf.key = leaf.key[: len(leaf.pages) * self.block_size]
                heapq.heappush(heap, leaf)
        return freed

    def evictable_pages(self) -> int:
        return sum(len(n.pages) for n in self._nodes() if n.lock_ref == 0)

    def reset(self) -> None:
        """Drops every unlocked page (e.g. to clear the cache)."""
        self.evict(self.num_pages)

    def _nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # -- invariants -----------------------------------------------------------------------
    def check_integrity(self) -> None:
        seen: set[int] = set()
        for node in self._nodes():
            assert len(node.key) == len(node.pages) * self.block_size
            if node is not self.root:
                assert node.pages, "empty non-root node"
                assert node.parent.children.get(node.key[: self.block_size]) is node
            if node is not self.root:
                assert node.lock_ref >= sum(c.lock_ref for c in node.children.values())
            for p in node.pages:
                assert p not in seen, f"page {p} owned twice by the tree"
                assert self.pool.ref_cnt[p] >= 1, f"tree page {p} has no reference"
                seen.add(p)
        assert len(seen) == self.num_pages
