"""The flow-log writer: records appended off the hot path, flushed in one write, never lost silently.

``FlowLog.write`` only appends the serialized line to an in-memory buffer; the ``run`` task
flushes the buffer with one ``write()`` system call every ``flush_interval``. Disk errors never
reach the request path: they are counted, logged at most once a minute, and the lines stay
buffered up to a hard cap (then the oldest are dropped and counted).

With an echo (``flowLogStdout``, :func:`open_stdout`) the same flush also hands the lines the
file has not seen yet to a second buffer written to standard output without ever blocking: a
reader that stalls (a container runtime's pipe) fills that buffer up to the same hard cap, then
its oldest lines are dropped and counted; the file and the requests never wait for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import itertools
import logging
import os
import select
import socket
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from enforcer.flow import FlowRecord

log = logging.getLogger(__name__)

FILE_MODE = 0o640
"""Flow logs name users and clients: readable by the service group, not by everyone."""

DIR_MODE = 0o750

ERROR_LOG_INTERVAL = 60.0
"""Seconds between two log messages about a failing flow-log sink (the count is kept always)."""

Echo = Callable[[bytes], int]
"""Writes some of the bytes without blocking and returns how many; raises ``BlockingIOError``
when it can take none now (see :func:`open_stdout`)."""

PIPE_BUF = select.PIPE_BUF
"""A pipe takes a write of up to this many bytes whole or not at all: lines in such chunks never
tear or mix with another process's writes to the same pipe."""

ECHO_CHUNK = 1 << 16
"""Bytes per write to an echo only this process writes to (a pipe holds 64 KiB by default)."""

ECHO_CLOSE_WAIT = 1.0
"""Seconds ``close`` waits for a reader that is behind to take the echo's last lines."""

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
        echo: Echo | None = None,
        echo_shared: bool = False,
    ) -> None:
        """Write to ``path`` (opened lazily, append mode) or, if ``path`` is None, to ``stream``.

        ``max_buffer`` lines wake the flusher early; ``hard_cap`` lines is what survives a
        failing disk before the oldest are dropped. ``on_dropped`` / ``on_write_error`` let
        the daemon feed the metrics counters (for both sinks). ``echo``: also write every line
        there (:func:`open_stdout`), in chunks of whole lines of at most :data:`PIPE_BUF` bytes
        when ``echo_shared`` (other processes write the same pipe: the workers).
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
        self._echo = (
            None if echo is None
            else _EchoBuffer(echo, PIPE_BUF if echo_shared else ECHO_CHUNK, self._hard_cap, self._echo_failed,
                             on_dropped)
        )
        self._echoed = 0
        """How many lines at the head of ``_buffer`` the echo already has (0 without one)."""

    # -- hot path ----------------------------------------------------------------------------

    def write(self, record: FlowRecord) -> None:
        """Queue one record; never raises for I/O problems and makes no system call."""
        self._buffer.append(record.to_json() + "\n")
        if len(self._buffer) > self._hard_cap:
            self._buffer.popleft()
            if self._echoed:
                self._echoed -= 1  # the echo has it: lost for the file only
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
        """Flush everything still buffered and close the file; stops ``run``. The echo's reader
        gets up to :data:`ECHO_CLOSE_WAIT` seconds to take the rest; what it leaves is counted
        as dropped and logged."""
        self._closed = True
        self._wake.set()
        self._flush()
        self._close_fd()
        echo = self._echo
        if echo is None or not echo.lines:
            return
        deadline = self._monotonic() + ECHO_CLOSE_WAIT
        while echo.behind and echo.lines and self._monotonic() < deadline:
            await asyncio.sleep(0.02)
            echo.flush()
        if echo.lines:
            left = len(echo.lines)
            echo.drop_all()
            log.error("flow log <stdout>: %d lines not taken by the reader at the stop, dropped", left)

    def flush(self) -> None:
        """Write everything buffered now (synchronously); errors are counted, not raised."""
        self._flush()

    @property
    def pending(self) -> int:
        """Lines waiting in the buffer."""
        return len(self._buffer)

    @property
    def echo_pending(self) -> int:
        """Lines waiting for the echo (0 without one)."""
        return 0 if self._echo is None else len(self._echo.lines)

    @property
    def echo_written(self) -> int:
        """Lines the echo took whole."""
        return 0 if self._echo is None else self._echo.written

    @property
    def echo_dropped(self) -> int:
        """Lines the echo lost because its reader stalled for longer than ``hard_cap`` lines."""
        return 0 if self._echo is None else self._echo.dropped

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
        echo = self._echo
        if echo is not None:
            if self._echoed < len(self._buffer):  # the lines that came since the last flush
                echo.extend(itertools.islice(self._buffer, self._echoed, None))
                self._echoed = len(self._buffer)
            self._flush_file()
            echo.flush()
        else:
            self._flush_file()

    def _flush_file(self) -> None:
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
        self._echoed = max(0, self._echoed - complete)

    def _write_failed(self, exc: BaseException) -> None:
        self.write_errors += 1
        if self._on_write_error is not None:
            self._on_write_error()
        self._close_fd()  # reopen on the next flush (the directory may come back)
        self._log_error(self.path if self.path is not None else "<stream>", exc, len(self._buffer), self.dropped)

    def _echo_failed(self, exc: BaseException) -> None:
        self.write_errors += 1
        if self._on_write_error is not None:
            self._on_write_error()
        self._log_error("<stdout>", exc, self.echo_pending, self.echo_dropped)

    def _log_error(self, sink: object, exc: BaseException, buffered: int, dropped: int) -> None:
        now = self._monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.error(
                "flow log %s: write failed (%s); %d lines buffered, %d errors, %d dropped",
                sink, exc, buffered, self.write_errors, dropped,
            )

    def _count_dropped(self, n: int) -> None:
        self.dropped += n
        if self._on_dropped is not None:
            self._on_dropped(n)


# --------------------------------------------------------------------------------------------
# Echo: the same lines to standard output, never blocking


class _EchoBuffer:
    """The lines for the echo and how far the head one is written; bounded like the file's."""

    def __init__(
        self, echo: Echo, chunk: int, hard_cap: int,
        on_error: Callable[[BaseException], None], on_dropped: Callable[[int], None] | None,
    ) -> None:
        self.lines: collections.deque[str] = collections.deque()
        self._echo = echo
        self._chunk = chunk
        self._hard_cap = hard_cap
        self._on_error = on_error
        self._on_dropped = on_dropped
        self._offset = 0
        """Bytes of ``lines[0]`` already written (a line longer than a chunk, or a partial write)."""
        self.written = 0
        self.dropped = 0
        self.behind = False
        """The last flush stopped because the reader had no room (not for an error)."""

    def extend(self, new: Iterable[str]) -> None:
        """Queue lines; beyond the hard cap the oldest whole ones go (counted)."""
        lines = self.lines
        lines.extend(new)
        excess = len(lines) - self._hard_cap
        if excess > 0:
            if self._offset:  # never cut a line the reader has begun: keep the head
                head = lines.popleft()
                for _ in range(excess):
                    lines.popleft()
                lines.appendleft(head)
            else:
                for _ in range(excess):
                    lines.popleft()
            self.dropped += excess
            if self._on_dropped is not None:
                self._on_dropped(excess)

    def drop_all(self) -> None:
        """Give up on every queued line (counted), e.g. at the stop."""
        left = len(self.lines)
        self.lines.clear()
        self._offset = 0
        self.dropped += left
        if left and self._on_dropped is not None:
            self._on_dropped(left)

    def flush(self) -> None:
        """Write whole-line chunks until all is out or the reader takes no more (no blocking)."""
        lines = self.lines
        self.behind = False
        while lines:
            size = len(lines[0]) - self._offset
            count = 1
            for line in itertools.islice(lines, 1, None):
                if size + len(line) > self._chunk:
                    break
                size += len(line)
                count += 1
            data = "".join(itertools.islice(lines, 0, count)).encode("ascii")[self._offset:]
            try:
                done = self._echo(data)
            except BlockingIOError:
                self.behind = True
                return  # the reader is behind: the lines wait (up to the hard cap)
            except (OSError, ValueError) as exc:  # EPIPE: no reader; ValueError: a closed stream
                self._on_error(exc)
                return
            whole = done == len(data)
            done += self._offset
            while lines and done >= len(lines[0]):
                done -= len(lines.popleft())
                self.written += 1
            self._offset = done
            if not whole:
                self.behind = True
                return  # the reader took part: the rest waits for the next flush


class StdoutEcho:
    """Standard output as an :data:`Echo` that never blocks and leaves ``fd`` itself unchanged.

    A pipe, FIFO or terminal (a container runtime gives a pipe) is opened again through
    ``/proc/self/fd``: a new open file description of its own, non-blocking, so ``fd`` and
    whatever shares its description (standard error after ``2>&1``) stay blocking. A socket
    (systemd's journal) is written with ``MSG_DONTWAIT``; a regular file with plain writes,
    which do not stall on a reader. Without ``/proc`` (or with a pipe that has no reader yet)
    a write waits for ``poll`` to say there is room and takes at most :data:`PIPE_BUF` bytes.
    """

    def __init__(self, fd: int = 1) -> None:
        """Raises ``OSError`` naming ``flowLogStdout`` when ``fd`` is not open."""
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise OSError(exc.errno, f"flowLogStdout: standard output (fd {fd}) is not open") from None
        self._sock: socket.socket | None = None
        self._poll: select.poll | None = None
        if stat.S_ISSOCK(mode):
            self._sock = socket.socket(fileno=os.dup(fd))
            self._fd = -1
            return
        if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
            try:
                self._fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_APPEND | os.O_CLOEXEC)
            except OSError:
                self._fd = os.dup(fd)
                self._poll = select.poll()
                self._poll.register(self._fd, select.POLLOUT)
            return
        self._fd = os.dup(fd)

    def __call__(self, data: bytes) -> int:
        """Write some of ``data`` now; ``BlockingIOError`` when the reader has no room."""
        if self._sock is not None:
            return self._sock.send(data, socket.MSG_DONTWAIT)
        if self._poll is not None:
            if not self._poll.poll(0):
                raise BlockingIOError(errno.EAGAIN, "the reader is behind")
            data = data[:PIPE_BUF]
        return os.write(self._fd, data)

    def close(self) -> None:
        """Close this echo's own descriptor (``fd`` stays open)."""
        if self._sock is not None:
            self._sock.close()
        elif self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_stdout(fd: int = 1) -> Echo:
    """The process's standard output as an :data:`Echo` (:class:`StdoutEcho`)."""
    return StdoutEcho(fd)
