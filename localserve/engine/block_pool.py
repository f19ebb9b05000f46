"""BlockPool: fixed-size KV pages, their reference counts and the free list.

A page's reference count is the number of holders: each request whose block_table
lists it, plus one while the RadixCache owns it. A page is free exactly when its count
is 0, and then it sits in the free list. The free list is LRU-ordered: pages freed
longest ago are reused first, so recently released KV lingers longest in memory.
"""

from __future__ import annotations

from collections import OrderedDict


class OutOfPagesError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_cnt = [0] * num_blocks
        # OrderedDict as an O(1) LRU queue: front = reuse first
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} pages, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self.ref_cnt[b] = 1
            blocks.append(b)
        return blocks

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.ref_cnt[b] == 0:
                del self._free[b]
            self.ref_cnt[b] += 1

    def decref(self, blocks: list[int]) -> int:
        """Drops one reference from each page; returns how many became free."""
        freed = 0
        for b in blocks:
            assert self.ref_cnt[b] > 0, f"page {b} freed twice"
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self._free[b] = None
                freed += 1
        return freed

    def check_integrity(self) -> None:
        for b in range(self.num_blocks):
            in_free = b in self._free
            assert self.ref_cnt[b] >= 0, f"page {b} has a negative ref count"
            assert in_free == (self.ref_cnt[b] == 0), (
                f"page {b}: ref_cnt={self.ref_cnt[b]} but in_free_list={in_free}"
            )
        assert len(self._free) + sum(1 for r in self.ref_cnt if r > 0) == self.num_blocks
