"""Tests for enforcer.memory: trimming the C heap when the load falls."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from collections.abc import Callable

import pytest

from enforcer.run import memory
from tests.harness.prereq import require


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_trims_at_most_once_per_interval() -> None:
    """A second request within min_interval is skipped; one after it trims again."""
    calls: list[int] = []
    clock = FakeClock()
    t = memory.Trimmer(min_interval=1.0, clock=clock, trim=lambda pad: calls.append(pad) or 1)
    assert t.maybe_trim() is True
    clock.now += 0.5
    assert t.maybe_trim() is False
    clock.now += 0.6
    assert t.maybe_trim() is True
    assert calls == [0, 0]
    assert t.trims == 2


class FakeTimers:
    """loop.call_later's shape: records (delay, callback); a handle can be cancelled."""

    def __init__(self) -> None:
        self.pending: list[FakeTimers.Handle] = []

    class Handle:
        def __init__(self, delay: float, callback: Callable[[], object]) -> None:
            self.delay, self.callback, self.cancelled = delay, callback, False

        def cancel(self) -> None:
            self.cancelled = True

    def __call__(self, delay: float, callback: Callable[[], object]) -> FakeTimers.Handle:
        handle = FakeTimers.Handle(delay, callback)
        self.pending.append(handle)
        return handle


def test_a_request_within_the_interval_is_deferred_to_its_end_once() -> None:
    """Requests within min_interval schedule one trim at the interval's end, which then runs."""
    calls: list[int] = []
    clock = FakeClock()
    timers = FakeTimers()
    t = memory.Trimmer(min_interval=1.0, clock=clock, trim=lambda pad: calls.append(pad) or 1, call_later=timers)
    assert t.maybe_trim() is True
    clock.now += 0.25
    assert t.maybe_trim() is False
    assert t.maybe_trim() is False  # coalesced: still one pending trim
    assert [h.delay for h in timers.pending] == [0.75]
    clock.now += 0.75
    timers.pending[0].callback()
    assert calls == [0, 0]
    clock.now += 0.1
    assert t.maybe_trim() is False  # a new request after the deferred trim defers again
    assert len(timers.pending) == 2 and timers.pending[1].delay == pytest.approx(0.9)


def test_a_trim_that_runs_cancels_the_deferred_one_and_close_drops_it() -> None:
    """A trim running on its own (e.g. housekeeping) cancels the pending one; close() drops it."""
    clock = FakeClock()
    timers = FakeTimers()
    t = memory.Trimmer(min_interval=1.0, clock=clock, trim=lambda pad: 1, call_later=timers)
    t.maybe_trim()
    clock.now += 0.5
    t.maybe_trim()
    clock.now += 0.6
    assert t.maybe_trim() is True
    assert timers.pending[0].cancelled
    clock.now += 0.1
    t.maybe_trim()
    t.close()
    assert timers.pending[1].cancelled
    assert t.trims == 2


def test_failing_trim_never_raises() -> None:
    """A C library that fails the call leaves serving untouched: maybe_trim returns False."""

    def broken(pad: int) -> int:
        raise OSError("no")

    t = memory.Trimmer(trim=broken)
    assert t.maybe_trim() is False
    assert t.trims == 0


def test_without_malloc_trim_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the C library has no malloc_trim (musl, macOS) the trimmer is a no-op."""
    monkeypatch.setattr(memory, "_find_malloc_trim", lambda: None)
    t = memory.Trimmer()
    assert not t.available
    assert t.maybe_trim() is False


def test_glibc_trim_returns_freed_heap_pages() -> None:
    """On glibc the real malloc_trim runs and gives freed heap pages back (RSS falls)."""
    require(platform.libc_ver()[0] == "glibc", "malloc_trim is glibc's")
    t = memory.Trimmer()
    assert t.available
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    # many 4 KiB blocks below the mmap threshold, touched, then every block but the last freed:
    # the last one pins the heap top, so only malloc_trim (not free's own top trim) can return them
    blocks = [libc.malloc(4096) for _ in range(8192)]
    for b in blocks:
        libc.memset(b, 1, 4096)
    for b in blocks[:-1]:
        libc.free(b)
    before = _rss_kib()
    assert t.maybe_trim() is True
    after = _rss_kib()
    libc.free(blocks[-1])
    assert before - after > 8 * 1024, (before, after)  # most of the 32 MiB freed comes back


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")
