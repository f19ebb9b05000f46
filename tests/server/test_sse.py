"""sse.with_keepalive on its own: None while the first item is slow, errors at once, and a
stream left early closes its source."""

from __future__ import annotations

import asyncio

import pytest

from localserve.errors import InvalidRequestError
from localserve.server.sse import with_keepalive


async def items(delay: float, values, fail: Exception | None = None, closed: list | None = None):
    try:
        if fail is not None:
            raise fail
        await asyncio.sleep(delay)
        for v in values:
            yield v
    finally:
        if closed is not None:
            closed.append(True)


def collect(stream):
    async def run():
        return [x async for x in stream]
    return asyncio.run(run())


def test_fast_first_item_passes_through():
    assert collect(with_keepalive(items(0, [1, 2, 3]), first_wait=0.2, interval=0.2)) == [1, 2, 3]


def test_slow_first_item_is_preceded_by_keepalives():
    out = collect(with_keepalive(items(0.55, [1, 2]), first_wait=0.1, interval=0.2))
    assert out[-2:] == [1, 2] and set(out[:-2]) == {None} and 2 <= len(out[:-2]) <= 4, out


def test_an_error_before_the_first_item_raises_at_once():
    async def run():
        stream = with_keepalive(items(0, [], fail=InvalidRequestError("no")), first_wait=5)
        with pytest.raises(InvalidRequestError):
            await asyncio.wait_for(anext(stream), 1)
    asyncio.run(run())


def test_leaving_while_waiting_closes_the_source():
    closed: list = []

    async def run():
        stream = with_keepalive(items(30, [1], closed=closed), first_wait=0.05, interval=0.05)
        assert await anext(stream) is None
        await stream.aclose()
    asyncio.run(run())
    assert closed == [True]
