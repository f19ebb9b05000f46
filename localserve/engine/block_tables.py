"""Host mirror of the running requests' block tables as rows of one int32 array.

A step's [B, max_blocks] table is then one gather instead of B list-to-array conversions.
A request's block_table only grows by appending (KVCacheManager.allocate) or is replaced by a
new list (free, match), so a row is refreshed by copying its new tail, or whole when the list
object changed. Invariant: row r holds exactly its list, zero-padded.
"""

from __future__ import annotations

import numpy as np

from localserve.engine.request import Request


class BlockTableRows:
    def __init__(self, rows: int = 64, cols: int = 64) -> None:
        self.table = np.zeros((rows, cols), dtype=np.int32)
        self._row_of: dict[Request, int] = {}
        self._src: list[list[int] | None] = [None] * rows  # the list each row mirrors
        self._filled = [0] * rows
        self._free = list(range(rows - 1, -1, -1))

    def rows(self, reqs: list[Request]) -> np.ndarray:
        """Row index of each request (int64 [B]), after bringing its row up to date."""
        out = np.empty(len(reqs), dtype=np.int64)
        row_of, src, filled = self._row_of, self._src, self._filled
        for i, req in enumerate(reqs):
            r = row_of.get(req)
            if r is None:
                r = self._new_row(req)
            bt = req.block_table
            n = len(bt)
            have = filled[r]
            if src[r] is not bt:  # replaced (freed, re-matched): rewrite the row
                src[r] = bt
                if have > n:
                    self.table[r, n:have] = 0
                have = 0
            if n > have:
                if n > self.table.shape[1]:
                    self._grow(cols=max(n, 2 * self.table.shape[1]))
                self.table[r, have:n] = bt[have:n]
            filled[r] = n
            out[i] = r
        return out

    def release(self, req: Request) -> None:
        r = self._row_of.pop(req, None)
        if r is None:
            return
        self.table[r, : self._filled[r]] = 0
        self._src[r] = None
        self._filled[r] = 0
        self._free.append(r)

    def _new_row(self, req: Request) -> int:
        if not self._free:
            old = self.table.shape[0]
            self._grow(rows=2 * old)
            self._src.extend([None] * old)
            self._filled.extend([0] * old)
            self._free.extend(range(2 * old - 1, old - 1, -1))
        r = self._free.pop()
        self._row_of[req] = r
        return r

    def _grow(self, rows: int | None = None, cols: int | None = None) -> None:
        r0, c0 = self.table.shape
        t = np.zeros((rows or r0, cols or c0), dtype=np.int32)
        t[:r0, :c0] = self.table
        self.table = t
