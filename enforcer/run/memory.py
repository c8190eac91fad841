"""Give the C heap's freed memory back to the operating system when the load falls.

CPython hands objects over 512 bytes, OpenSSL its per-connection state and SQLite its rows
to the C allocator. glibc keeps what they free for reuse: after a burst of connections the
process can hold several MiB of free heap pages that count in its RSS until the next burst.
``malloc_trim(0)`` returns those pages (what it gave back is in PERFORMANCE.md).
:class:`Trimmer` calls it when a burst of connections is over (httpserver.Server.on_idle:
the open connections fell to a quarter of their peak) and from housekeeping, never more
often than ``min_interval``. A request that comes too soon is not dropped but deferred to
the end of the interval (one pending trim at most): the last connections of a burst usually
close within a few milliseconds of the first trim, and their buffers would otherwise stay
resident until the next housekeeping round.

On a C library without ``malloc_trim`` (musl, macOS) the trimmer does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable
from typing import Final, Protocol

log = logging.getLogger(__name__)

MIN_INTERVAL: Final = 0.25
"""Seconds between two trims at least: a trim scans the whole heap, so its pace is bounded."""


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        fn = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    trim: Callable[[int], int] = fn
    return trim


class _Timer(Protocol):
    def cancel(self) -> None: ...


CallLater = Callable[[float, Callable[[], object]], _Timer]
"""``loop.call_later``'s shape: run a callback after a delay, return a cancellable handle."""


class Trimmer:
    """Trims the C heap when asked, at most once per ``min_interval`` seconds; a request
    within the interval runs at its end instead (given ``call_later``, e.g. the event loop's)."""

    def __init__(
        self,
        *,
        min_interval: float = MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        trim: Callable[[int], int] | None = None,
        call_later: CallLater | None = None,
    ) -> None:
        self._trim = trim if trim is not None else _find_malloc_trim()
        self._min_interval = min_interval
        self._clock = clock
        self._last = float("-inf")
        self.call_later = call_later
        """Where a too-early request is deferred to (None: it is skipped)."""
        self._pending: _Timer | None = None
        self.trims = 0
        """How many trims ran (for tests and the debug log)."""

    @property
    def available(self) -> bool:
        """The C library can trim (glibc)."""
        return self._trim is not None

    def maybe_trim(self) -> bool:
        """Trim now unless one ran less than ``min_interval`` ago (then defer it to the end of
        the interval, once); True when it ran now."""
        trim = self._trim
        if trim is None:
            return False
        now = self._clock()
        wait = self._last + self._min_interval - now
        if wait > 0:
            if self._pending is None and self.call_later is not None:
                self._pending = self.call_later(wait, self._deferred)
            return False
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._last = now
        try:
            trim(0)
        except Exception:  # a trim is an optimisation: never let it break serving
            log.debug("malloc_trim failed", exc_info=True)
            return False
        self.trims += 1
        return True

    def _deferred(self) -> None:
        self._pending = None
        self.maybe_trim()

    def close(self) -> None:
        """Drop a pending deferred trim and defer no more (the loop is going away)."""
        self.call_later = None
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


GC_THRESHOLDS = (20_000, 50, 100)
"""CPython's default (700, 10, 10) runs a young-generation collection every few proxied
requests (each allocates hundreds of containers that reference counting frees anyway).
A collection scans only what is still alive, so rarer ones cost about the same each."""


def tune_gc() -> None:
    """Once the daemon is set up: move everything made so far out of the collector's way
    (``gc.freeze``: also keeps forked workers from dirtying shared pages) and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


