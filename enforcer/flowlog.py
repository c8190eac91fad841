"""The flow-log writer: records appended off the hot path, flushed in one write, never lost silently.

``FlowLog.write`` only appends the serialized line to an in-memory buffer; the ``run`` task
flushes the buffer with one ``write()`` system call every ``flush_interval``. Disk errors never
reach the request path: they are counted, logged at most once a minute, and the lines stay
buffered up to a hard cap (then the oldest are dropped and counted).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from enforcer.flow import FlowRecord

log = logging.getLogger(__name__)

FILE_MODE = 0o640
"""Flow logs name users and clients: readable by the service group, not by everyone."""

DIR_MODE = 0o750

ERROR_LOG_INTERVAL = 60.0
"""Seconds between two log messages about a failing flow-log sink (the count is kept always)."""

# --------------------------------------------------------------------------------------------
# Writer


class FlowLog:
    """Buffered, append-only JSON-lines sink: ``write`` is O(1); ``run`` does the I/O."""

    def __init__(
        self,
        path: Path | None,
        *,
        stream: TextIO | None = None,
        flush_interval: float = 0.2,
        max_buffer: int = 1000,
        hard_cap: int = 100_000,
        on_dropped: Callable[[int], None] | None = None,
        on_write_error: Callable[[], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """Write to ``path`` (opened lazily, append mode) or, if ``path`` is None, to ``stream``.

        ``max_buffer`` lines wake the flusher early; ``hard_cap`` lines is what survives a
        failing disk before the oldest are dropped. ``on_dropped`` / ``on_write_error`` let
        the daemon feed the metrics counters.
        """
        if (path is None) == (stream is None):
            raise ValueError("FlowLog needs exactly one of path or stream")
        self.path = path
        self._stream = stream
        self._flush_interval = flush_interval
        self._max_buffer = max_buffer
        self._hard_cap = max(hard_cap, max_buffer)
        self._on_dropped = on_dropped
        self._on_write_error = on_write_error
        self._monotonic = monotonic
        self._buffer: collections.deque[str] = collections.deque()
        self._fd: int | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._last_error_log = -ERROR_LOG_INTERVAL * 2
        self._torn = False
        """A previous write stopped inside a line: start the next write with a newline."""
        self.written = 0
        """Lines handed to the operating system."""
        self.dropped = 0
        """Lines lost because the sink failed for longer than ``hard_cap`` lines."""
        self.write_errors = 0

    # -- hot path ----------------------------------------------------------------------------

    def write(self, record: FlowRecord) -> None:
        """Queue one record; never raises for I/O problems and makes no system call."""
        self._buffer.append(record.to_json() + "\n")
        if len(self._buffer) > self._hard_cap:
            self._buffer.popleft()
            self._count_dropped(1)
        if self._closed:
            # Late record after close() (a request finishing during shutdown): write it now.
            self._flush()
            self._close_fd()
        elif len(self._buffer) >= self._max_buffer:
            self._wake.set()

    # -- background --------------------------------------------------------------------------

    async def run(self) -> None:
        """Flush every ``flush_interval`` (or when ``max_buffer`` lines queue) until closed."""
        try:
            while not self._closed:
                try:
                    async with asyncio.timeout(self._flush_interval):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
                self._flush()
        finally:
            self._flush()

    def reopen(self) -> None:
        """After logrotate renamed the file (SIGHUP): flush to the old file, reopen ``path``."""
        self._flush()
        self._close_fd()
        if self.path is not None:
            self._open()

    async def close(self) -> None:
        """Flush everything still buffered and close the file; stops ``run``."""
        self._closed = True
        self._wake.set()
        self._flush()
        self._close_fd()

    def flush(self) -> None:
        """Write everything buffered now (synchronously); errors are counted, not raised."""
        self._flush()

    @property
    def pending(self) -> int:
        """Lines waiting in the buffer."""
        return len(self._buffer)

    # -- internals ---------------------------------------------------------------------------

    def _open(self) -> int:
        assert self.path is not None
        if self._fd is None:
            self.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            try:
                fd = os.open(self.path, flags | os.O_EXCL, FILE_MODE)
            except FileExistsError:
                fd = os.open(self.path, flags, FILE_MODE)
            else:
                os.fchmod(fd, FILE_MODE)  # the umask must not widen or narrow it
            self._fd = fd
        return self._fd

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    def _flush(self) -> None:
        if not self._buffer:
            return
        lines = list(self._buffer)
        data = "".join(lines)
        if self._torn:
            data = "\n" + data
        done = 0  # characters of ``data`` (ASCII, so also bytes) accepted by the OS
        try:
            if self._stream is not None:
                self._stream.write(data)
                self._stream.flush()
                done = len(data)
            else:
                raw = data.encode("ascii")
                fd = self._open()
                view = memoryview(raw)
                while done < len(raw):
                    done += os.write(fd, view[done:])
        except (OSError, ValueError) as exc:  # ValueError: write to a closed stream
            self._write_failed(exc)
        if self._torn:
            if done == 0:
                return  # not even the separating newline went out; still torn
            done -= 1
            self._torn = False
        self._remove_written(lines, done)

    def _remove_written(self, lines: list[str], done: int) -> None:
        """Drop the fully written lines from the buffer; note a torn line for the next write."""
        complete = 0
        for line in lines:
            if done >= len(line):
                done -= len(line)
                complete += 1
            else:
                self._torn = done > 0
                break
        for _ in range(complete):
            self._buffer.popleft()
        self.written += complete

    def _write_failed(self, exc: BaseException) -> None:
        self.write_errors += 1
        if self._on_write_error is not None:
            self._on_write_error()
        self._close_fd()  # reopen on the next flush (the directory may come back)
        now = self._monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.error(
                "flow log %s: write failed (%s); %d lines buffered, %d errors, %d dropped",
                self.path if self.path is not None else "<stream>",
                exc,
                len(self._buffer),
                self.write_errors,
                self.dropped,
            )

    def _count_dropped(self, n: int) -> None:
        self.dropped += n
        if self._on_dropped is not None:
            self._on_dropped(n)


