"""HostStaging: the pinned host buffers every per-step input passes through on its way to the
device, so that the host never waits for the GPU to launch the next step.

Why: a host-to-device copy from pageable memory may make the driver wait for the stream (it
stages the bytes itself), and a `copy_(..., non_blocking=False)` always does. Under overlap
scheduling the stream is still busy with step N when the host prepares N+1, so such a copy
stalls the host until N ends and the launch of N+1 is no longer overlapped. From page-locked
memory the copy is queued and the host returns at once.

Invariant (reuse): the bytes of a step's host tensors must stay unchanged until the device has
copied them. The buffers form a ring of `depth` slots, one slot per step (`begin` … `end`);
`end` records an event after the step's copies and `begin` waits on the event of the slot it
is about to rewrite, recorded `depth` steps ago. With the engine's at-most-one-step-in-flight
that event has long passed, so the wait costs nothing. A slot whose arena is full gets a larger
one mid-step: the old buffer stays alive while tensors refer to it, and torch's caching host
allocator does not hand it out again before the copies recorded on it are done.

`enabled=False` (LOCALSERVE_PINNED=0, for A/B runs) restores the earlier behaviour: fresh
pageable tensors from numpy. On device "cpu" there is no pinning; the arena is ordinary memory
and `to_device` returns a copy (a view would alias a slot that is rewritten later).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from localserve import envs

_ALIGN = 64  # bytes; each staged array starts on its own cache line
_NP = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32,
       torch.uint8: np.uint8, torch.bool: np.bool_}
_TORCH = {np.dtype(v): k for k, v in _NP.items()}


def pinned_default() -> bool:
    return envs.PINNED.get()


class _Slot:
    __slots__ = ("buf", "arr", "used", "event")

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.arr = self.buf.numpy()
        self.used = 0
        self.event = None


class HostStaging:
    def __init__(self, device: torch.device, enabled: bool | None = None, depth: int = 2,
                 capacity: int = 1 << 20) -> None:
        self.device = torch.device(device)
        self.depth = depth
        self.capacity = capacity
        self._slots: list[_Slot] = []
        self._index = 0
        self.enabled = False
        self.set_enabled(pinned_default() if enabled is None else enabled)

    # -- configuration ------------------------------------------------------------------
    @property
    def pinned(self) -> bool:
        """Host tensors from `host` are page-locked: copies from them never wait for the stream."""
        return self.enabled and self.device.type == "cuda"

    def set_enabled(self, enabled: bool) -> None:
        """Switches staging on or off; only while no step is in flight (benchmarks' A/B)."""
        self.enabled = bool(enabled)
        if self.enabled and not self._slots:
            pin = self.device.type == "cuda"
            self._slots = [_Slot(self.capacity, pin) for _ in range(self.depth)]
        self._index = 0
        for s in self._slots:
            s.used = 0

    # -- the step's bracket ---------------------------------------------------------------
    def begin(self) -> None:
        """Starts a step on the next slot, once the device has read what it held."""
        if not self.enabled:
            return
        self._index = (self._index + 1) % self.depth
        slot = self._slots[self._index]
        if slot.event is not None:
            slot.event.synchronize()
            slot.event = None
        slot.used = 0

    def stream(self) -> torch.cuda.Stream | None:
        """The current stream of this device (None off the GPU). Named by device:
        Event.record() with no stream looks it up through torch.cuda's device discovery (env
        reads, NVML checks: 520 calls cost 31 ms under cProfile on the H100's host)."""
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def end(self):
        """Records (and returns) an event after the step's copies; None off the GPU."""
        if self.device.type != "cuda":
            return None
        ev = torch.cuda.Event()
        ev.record(self.stream())
        if self.enabled:
            self._slots[self._index].event = ev
        return ev

    # -- staging ------------------------------------------------------------------------
    def empty(self, shape, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
        """An uninitialised host tensor in the current slot and its numpy view (write through
        either). Only while enabled."""
        assert self.enabled, "staging is off"
        shape = (int(shape),) if np.ndim(shape) == 0 else tuple(map(int, shape))
        nbytes = math.prod(shape) * dtype.itemsize
        slot = self._slots[self._index]
        start = -(-slot.used // _ALIGN) * _ALIGN
        if start + nbytes > slot.buf.numel():
            # a larger arena for this slot; the old one lives on while its tensors do
            size = max(2 * slot.buf.numel(), 2 * nbytes)
            slot.buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            slot.arr = slot.buf.numpy()
            start = 0
        slot.used = start + nbytes
        t = slot.buf[start:start + nbytes].view(dtype).view(shape)
        a = slot.arr[start:start + nbytes].view(_NP[dtype]).reshape(shape)
        return t, a

    def host(self, a: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A host tensor holding `a` (cast to dtype): pinned while enabled, else a fresh
        pageable tensor. Valid until this slot comes round again."""
        a = np.asarray(a)
        dtype = dtype or _TORCH[a.dtype]
        if not self.enabled:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=_NP[dtype]))
        t, view = self.empty(a.shape, dtype)
        view[...] = a
        return t

    def to_device(self, a: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`a` as a new device tensor, copied without waiting for the stream."""
        h = self.host(a, dtype)
        if self.device.type == "cpu":
            return h.clone() if self.enabled else h
        return h.to(self.device, non_blocking=True)

    def copy_to(self, dst: torch.Tensor, a: np.ndarray) -> None:
        """dst[...] = a (dst on the device, same number of elements)."""
        dst.copy_(self.host(a, dst.dtype).view(dst.shape), non_blocking=True)
