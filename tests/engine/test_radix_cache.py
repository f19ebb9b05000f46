import pytest

from localserve.engine.block_pool import BlockPool
from localserve.engine.radix_cache import RadixCache

BS = 4


def make(n=32):
    pool = BlockPool(n, BS)
    return pool, RadixCache(pool)


def insert_owned(pool, tree, tokens):
    """Allocates pages for `tokens` like a request would, caches them, drops the request's refs."""
    pages = pool.allocate(len(tokens) // BS)
    present = tree.insert(tokens, pages)
    pool.decref(pages)
    return pages, present


def test_match_whole_pages_only():
    pool, tree = make()
    pages, _ = insert_owned(pool, tree, list(range(12)))
    got, node = tree.match_prefix(list(range(11)))
    assert got == pages[:2]
    got, _ = tree.match_prefix(list(range(12)) + [99])
    assert got == pages
    assert tree.match_prefix([5, 6, 7, 8])[0] == []
    tree.check_integrity()
    pool.check_integrity()


def test_insert_splits_and_reports_present_prefix():
    pool, tree = make()
    a, present = insert_owned(pool, tree, [1, 2, 3, 4, 5, 6, 7, 8])
    assert present == 0
    b, present = insert_owned(pool, tree, [1, 2, 3, 4, 9, 9, 9, 9])
    assert present == 4
    # the duplicate first page of b went back to the pool; the tree kept a's
    assert pool.ref_cnt[b[0]] == 0 and pool.ref_cnt[a[0]] == 1
    assert tree.match_prefix([1, 2, 3, 4, 9, 9, 9, 9])[0] == [a[0], b[1]]
    assert tree.match_prefix([1, 2, 3, 4, 5, 6, 7, 8])[0] == a
    assert tree.num_pages == 3
    tree.check_integrity()
    pool.check_integrity()


def test_evict_lru_leaves_tail_first_and_respects_locks():
    pool, tree = make(8)
    a, _ = insert_owned(pool, tree, list(range(8)))  # 2 pages, older
    b, _ = insert_owned(pool, tree, list(range(100, 108)))  # 2 pages, newer
    assert pool.num_free == 4
    _, node_b = tree.match_prefix(list(range(100, 108)))
    tree.lock(node_b)
    assert tree.evict(1) == 1
    # a's tail page went first; its head stays matchable
    assert tree.match_prefix(list(range(8)))[0] == a[:1]
    assert tree.evict(10) == 1  # only a's head was unlocked
    assert tree.match_prefix(list(range(100, 108)))[0] == b
    tree.unlock(node_b)
    assert tree.evict(10) == 2
    assert pool.num_free == 8 and tree.num_pages == 0
    tree.check_integrity()
    pool.check_integrity()


def test_evicted_page_in_use_by_request_is_not_freed():
    pool, tree = make(4)
    pages = pool.allocate(1)
    tree.insert([1, 2, 3, 4], pages)  # request still holds its reference
    assert tree.evict(1) == 0
    assert pool.ref_cnt[pages[0]] == 1
    pool.decref(pages)
    assert pool.num_free == 4


def test_unlock_without_lock_asserts():
    pool, tree = make()
    insert_owned(pool, tree, [1, 2, 3, 4])
    _, node = tree.match_prefix([1, 2, 3, 4])
    tree.lock(node)
    tree.unlock(node)
    with pytest.raises(AssertionError):
        tree.unlock(node)
