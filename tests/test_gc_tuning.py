"""runtime.gc_tuning: the serving process's collector after load."""

import gc

import pytest

from localserve.runtime.gc_tuning import DEFAULT_GEN0_THRESHOLD, tune_gc


@pytest.fixture
def restore_gc():
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tuned_freezes_what_is_alive_and_raises_gen0(restore_gc, monkeypatch):
    monkeypatch.delenv("LOCALSERVE_GC", raising=False)
    monkeypatch.delenv("LOCALSERVE_GC_THRESHOLD", raising=False)
    keep = [object() for _ in range(10)]  # noqa: F841  (alive at the freeze)
    info = tune_gc()
    assert info["gc"] == "tuned" and info["frozen"] > 0
    assert gc.get_threshold()[0] == DEFAULT_GEN0_THRESHOLD
    assert gc.get_freeze_count() == info["frozen"]

    class Node:
        pass

    a, b = Node(), Node()  # a cycle made after the freeze is still collected
    a.other, b.other = b, a
    del a, b
    assert gc.collect() >= 2


def test_env_leaves_the_collector_or_sets_the_threshold(restore_gc, monkeypatch):
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    monkeypatch.setenv("LOCALSERVE_GC", "default")
    assert tune_gc()["gc"] == "default"
    assert gc.get_threshold() == before and gc.get_freeze_count() == frozen
    monkeypatch.delenv("LOCALSERVE_GC")
    monkeypatch.setenv("LOCALSERVE_GC_THRESHOLD", "1234")
    tune_gc()
    assert gc.get_threshold()[0] == 1234
