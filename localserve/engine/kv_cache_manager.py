"""KVCacheManager: gives requests their pages, through the prefix cache when it can.

Owns the BlockPool and the RadixCache. A request's block_table holds one reference per
page; pages that came from the cache are additionally pinned by locking the tree node
they end at, so eviction leaves them alone while the request runs.
"""

from __future__ import annotations

from localserve.engine.block_pool import BlockPool
from localserve.engine.radix_cache import RadixCache
from localserve.engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, block_size)
        self.tree = RadixCache(self.pool)
        self.enable_prefix_cache = enable_prefix_cache
        self.prefix_hit_tokens = 0  # lifetime counters for metrics
        self.prefix_query_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def num_free_blocks(self) -> int:
        """Free now, plus what eviction could free."""
        return self.pool.num_free + self.tree.evictable_pages()

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- admission ------------------------------------------------------------------------
    def match(self, req: Request) -> int:
        """Attaches the cached prefix of `req`'s tokens; returns its length in tokens.

        At least one token is always left to compute: its logits give the next token.
        """
        assert not req.block_table and req.num_computed_tokens == 0
        tokens = req.all_token_ids
        if not self.enable_prefix_cache:
            return 0
        limit = (len(tokens) - 1) // self.block_size * self.block_size
        pages, node = self.tree.match_prefix(tokens[:limit])
        self.pool.incref(pages)
        self.tree.lock(node)
        req.cache_node = node
        req.block_table = list(pages)
        req.num_computed_tokens = len(pages) * self.block_size
        return req.num_computed_tokens

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Grows req's block_table to hold num_computed + num_new tokens; False if memory is short."""
        need = self.pages_for(req.num_computed_tokens + num_new_tokens) - len(req.block_table)
        if need <= 0:
            return True
        if self.pool.num_free < need:
            self.tree.evict(need - self.pool.num_free)
            if self.pool.num_free < need:
                return False
        req.block_table.extend(self.pool.allocate(need))
        return True

    # -- release --------------------------------------------------------------------------
    def cache(self, req: Request) -> None:
        """Puts the full pages of req's computed tokens into the prefix cache."""
        if not self.enable_prefix_cache:
            return
        n_pages = req.num_computed_tokens // self.block_size
        if n_pages == 0:
            return
        tokens = req.all_token_ids[: n_pages * self.block_size]
        self.tree.insert(tokens, req.block_table[:n_pages])

    def free(self, req: Request, cache: bool = True) -> None:
        """Releases req's pages; with `cache`, its computed KV stays reusable in the tree."""
        if cache:
            self.cache(req)
        if req.cache_node is not None:
            self.tree.unlock(req.cache_node)
            req.cache_node = None
        self.pool.decref(req.block_table)
        req.block_table = []

    def record_prefix_hit(self, num_prompt_tokens: int, num_cached: int) -> None:
        self.prefix_query_tokens += num_prompt_tokens
        self.prefix_hit_tokens += num_cached

    def check_integrity(self, live: list[Request]) -> None:
        """free + cached + in use == total, and every reference is accounted for."""
        self.pool.check_integrity()
        self.tree.check_integrity()
        expected = [0] * self.pool.num_blocks
        for node in self.tree._nodes():
            for p in node.pages:
                expected[p] += 1
        for req in live:
            for p in req.block_table:
                expected[p] += 1
        assert expected == self.pool.ref_cnt, "page references do not match their holders"
