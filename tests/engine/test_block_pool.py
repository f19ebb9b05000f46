import pytest

from localserve.engine.block_pool import BlockPool, OutOfPagesError


def test_allocate_and_free_lru_order():
    pool = BlockPool(4, 16)
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.num_free == 1
    pool.decref([2])
    pool.decref([0])
    # 3 was never used, then 2, then 0 were freed: reuse oldest-freed first
    assert pool.allocate(3) == [3, 2, 0]
    pool.check_integrity()


def test_refcounts_shared_pages():
    pool = BlockPool(2, 4)
    (p,) = pool.allocate(1)
    pool.incref([p])
    assert pool.decref([p]) == 0 and pool.num_free == 1
    assert pool.decref([p]) == 1 and pool.num_free == 2
    pool.check_integrity()


def test_incref_of_free_page_takes_it_off_the_free_list():
    pool = BlockPool(3, 4)
    pool.incref([1])
    assert pool.num_free == 2
    assert 1 not in pool.allocate(2)
    pool.check_integrity()


def test_out_of_pages_and_double_free():
    pool = BlockPool(2, 4)
    with pytest.raises(OutOfPagesError):
        pool.allocate(3)
    pages = pool.allocate(2)
    pool.decref(pages)
    with pytest.raises(AssertionError):
        pool.decref(pages[:1])


def test_integrity_detects_corruption():
    pool = BlockPool(3, 4)
    pool.allocate(1)
    pool.ref_cnt[0] = 0  # a page with no holder that is not on the free list
    with pytest.raises(AssertionError):
        pool.check_integrity()
