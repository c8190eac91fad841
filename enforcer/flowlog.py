"""Flow log: exactly one JSON-lines record per request, written off the hot path, and read back.

Writing side (step 7 of the data path):

* ``FlowRecord`` is begun when a request arrives, filled in along the way (``record``) and
  finished once (``finish``); ``to_json`` renders it as one line that no field content can
  break (``ensure_ascii`` escapes CR, LF, ANSI escapes, quotes and every non-ASCII character).
* ``FlowLog.write`` only appends the serialized line to an in-memory buffer; the ``run`` task
  flushes the buffer with one ``write()`` system call every ``flush_interval``. Disk errors
  never reach the request path: they are counted, logged at most once a minute, and the lines
  stay buffered up to a hard cap (then the oldest are dropped and counted).

Reading side (``enforcer flows``): ``read_flows`` / ``follow_flows`` (tail -F semantics) with a
``FlowFilter``, and ``format_table`` / ``format_summary`` that escape control characters so a
logged value can never inject terminal escapes.

The log carries no secrets by construction: no query string (``path`` is the canonical path),
no cookies, no tokens, no codes; ``user`` is the ``sub`` claim.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "SERVED_DECISIONS",
    "FlowFilter",
    "FlowLog",
    "FlowRecord",
    "ReadStats",
    "flows_command",
    "follow_flows",
    "format_summary",
    "format_table",
    "is_denied",
    "parse_since",
    "read_flows",
]

log = logging.getLogger(__name__)

USER_AGENT_MAX = 256
"""User-Agent is attacker-controlled; 256 characters identify any real client."""

FILE_MODE = 0o640
"""Flow logs name users and clients: readable by the service group, not by everyone."""

DIR_MODE = 0o750

ERROR_LOG_INTERVAL = 60.0
"""Seconds between two log messages about a failing flow-log sink (the count is kept always)."""

SERVED_DECISIONS = frozenset({"allow", "logout", "callback"})
"""Decisions under which the enforcer served the request (proxied it, or completed its own
logout / login callback). Every other decision — ``deny``, ``login`` (challenge), ``error``,
``bad_request`` and any decision added later — counts as *not served* for ``--denied``."""


def _iso_ms_slow(ts: float) -> str:
    """Unix time -> ISO-8601 UTC with milliseconds, e.g. ``2024-05-01T12:00:00.123Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_iso_second: list[Any] = [None, ""]
"""(whole second, its ``YYYY-MM-DDTHH:MM:SS.`` prefix) of the last :func:`_iso_ms` call."""


def _iso_ms(ts: float) -> str:
    """:func:`_iso_ms_slow`, with the date and time of day formatted once per second.

    The split into whole seconds and microseconds is the one ``datetime.fromtimestamp``
    makes (fraction rounded half-to-even, carried into the second), so the text is identical.
    """
    if not 0.0 <= ts < 253402300799.0:
        return _iso_ms_slow(ts)
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)
    if us >= 1_000_000:
        us -= 1_000_000
        whole += 1.0
    cache = _iso_second
    if cache[0] != whole:
        cache[1] = _iso_ms_slow(whole)[:-4]  # "YYYY-MM-DDTHH:MM:SS." (".000Z" cut to ".")
        cache[0] = whole
    return f"{cache[1]}{us // 1000:03d}Z"


# One C encoder for every line: json.dumps(..., separators=...) builds a JSONEncoder and a C
# encoder per call.  Same arguments as JSONEncoder(ensure_ascii=True, separators=(",", ":"))
# uses for a one-shot encode (no circular check needed: a record is a flat dict).
_JSON_ARGS: dict[str, Any] = {"ensure_ascii": True, "separators": (",", ":")}
_c_encoder = getattr(json.encoder, "c_make_encoder", None)
_encode_line: Callable[[dict[str, Any]], str]
if _c_encoder is not None:
    _c_line = _c_encoder(
        None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True
    )

    def _encode_line(data: dict[str, Any]) -> str:
        return "".join(_c_line(data, 0))
else:  # pragma: no cover - CPython always has the C accelerator
    _encode_line = json.JSONEncoder(**_JSON_ARGS).encode


_esc = json.encoder.encode_basestring_ascii
"""The string encoder of ``_encode_line`` (C): quoted, ``ensure_ascii`` escapes."""
_INF = math.inf

_flow_ids: list[str] = []
"""Flow ids made ahead: one ``getrandom`` system call for 512 of them, not one per request."""


def _new_flow_id() -> str:
    """16 random hex characters (8 bytes from ``os.urandom``, like ``secrets.token_hex(8)``)."""
    try:
        return _flow_ids.pop()
    except IndexError:
        text = os.urandom(8 * 512).hex()
        _flow_ids.extend([text[i : i + 16] for i in range(0, len(text), 16)])
        return _flow_ids.pop()


# a forked worker must not hand out the ids its parent (or a sibling) has in stock
os.register_at_fork(after_in_child=_flow_ids.clear)


@dataclass(slots=True, kw_only=True)
class FlowRecord:
    """Everything the enforcer knows about one request; serialized once when it ends."""

    flow_id: str
    """16 random hex characters; also the correlation id shown on error pages."""
    start: float
    """Unix time the request arrived."""
    client: str
    """Client ``ip:port``."""
    method: str
    path: str
    """The canonical path the policy matched — never the query string."""
    service: str | None = None
    sni: str | None = None
    host: str | None = None
    destination: str | None = None
    """Original destination ``ip:port`` (before the redirect)."""
    user: str | None = None
    """The ``sub`` claim of the logged-in user."""
    email: str | None = None
    decision: str = "error"
    """``allow``, ``deny``, ``login``, ``error``, ``bad_request``, ``logout``, ``callback``..."""
    reason: str = "unfinished"
    """Stable reason code (the same string as the metric label and the error page code)."""
    endpoint: str | None = None
    """Label of the policy rule that decided."""
    upstream_status: int | None = None
    status: int | None = None
    """Status sent to the client."""
    bytes_in: int = 0
    bytes_out: int = 0
    duration_ms: float = 0.0
    upstream_ms: float | None = None
    tls_version: str | None = None
    user_agent: str | None = None

    @classmethod
    def begin(
        cls,
        *,
        client: str,
        sni: str | None,
        host: str | None,
        method: str,
        path: str,
        now: float,
        destination: str | None = None,
        service: str | None = None,
        tls_version: str | None = None,
        user_agent: str | None = None,
    ) -> FlowRecord:
        """Start the record for a request that just arrived (``path`` is the canonical path)."""
        return cls(
            flow_id=_new_flow_id(),
            start=now,
            client=client,
            sni=sni,
            host=host,
            method=method,
            path=path,
            destination=destination,
            service=service,
            tls_version=tls_version,
            user_agent=None if user_agent is None else user_agent[:USER_AGENT_MAX],
        )

    def record(
        self,
        *,
        decision: str,
        reason: str,
        endpoint: str | None = None,
        user: str | None = None,
        email: str | None = None,
    ) -> None:
        """Note the policy (or login/logout) decision and who asked."""
        self.decision = decision
        self.reason = reason
        self.endpoint = endpoint
        if user is not None:
            self.user = user
        if email is not None:
            self.email = email

    def finish(self, *, now: float, status: int | None = None) -> FlowRecord:
        """Stamp the duration (and the client status if given); returns ``self`` for chaining."""
        if status is not None:
            self.status = status
        self.duration_ms = round(max(0.0, (now - self.start) * 1000.0), 3)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Fields in the fixed log order, ``time`` first."""
        return {
            "time": _iso_ms(self.start),
            "flow_id": self.flow_id,
            "start": self.start,
            "service": self.service,
            "client": self.client,
            "sni": self.sni,
            "host": self.host,
            "method": self.method,
            "path": self.path,
            "destination": self.destination,
            "user": self.user,
            "email": self.email,
            "decision": self.decision,
            "reason": self.reason,
            "endpoint": self.endpoint,
            "upstream_status": self.upstream_status,
            "status": self.status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration_ms": round(self.duration_ms, 3),
            "upstream_ms": None if self.upstream_ms is None else round(self.upstream_ms, 3),
            "tls_version": self.tls_version,
            "user_agent": None if self.user_agent is None else self.user_agent[:USER_AGENT_MAX],
        }

    def to_json(self) -> str:
        """One log line (without the newline); ASCII-only so no value can split or color it.

        The text of ``_encode_line(self.to_dict())``, written out field by field (keys are
        constants, strings go through the same C escaper): 1.7x cheaper.  Any field of an
        unexpected type (an int ``start``, a NaN, a bool status...) takes the generic path.
        """
        start, dur, up_ms = self.start, self.duration_ms, self.upstream_ms
        b_in, b_out, up_st, st = self.bytes_in, self.bytes_out, self.upstream_status, self.status
        if not (
            type(start) is float and -_INF < start < _INF
            and type(dur) is float and -_INF < dur < _INF
            and (up_ms is None or (type(up_ms) is float and -_INF < up_ms < _INF))
            and type(b_in) is int and type(b_out) is int
            and (up_st is None or type(up_st) is int) and (st is None or type(st) is int)
        ):
            return _encode_line(self.to_dict())
        e = _esc
        try:
            service, sni, host, dest = self.service, self.sni, self.host, self.destination
            user, email, endpoint, tls, ua = self.user, self.email, self.endpoint, self.tls_version, self.user_agent
            return (
                f'{{"time":"{_iso_ms(start)}","flow_id":{e(self.flow_id)},"start":{start!r},'
                f'"service":{"null" if service is None else e(service)},"client":{e(self.client)},'
                f'"sni":{"null" if sni is None else e(sni)},"host":{"null" if host is None else e(host)},'
                f'"method":{e(self.method)},"path":{e(self.path)},'
                f'"destination":{"null" if dest is None else e(dest)},'
                f'"user":{"null" if user is None else e(user)},"email":{"null" if email is None else e(email)},'
                f'"decision":{e(self.decision)},"reason":{e(self.reason)},'
                f'"endpoint":{"null" if endpoint is None else e(endpoint)},'
                f'"upstream_status":{"null" if up_st is None else up_st},"status":{"null" if st is None else st},'
                f'"bytes_in":{b_in},"bytes_out":{b_out},"duration_ms":{round(dur, 3)!r},'
                f'"upstream_ms":{"null" if up_ms is None else repr(round(up_ms, 3))},'
                f'"tls_version":{"null" if tls is None else e(tls)},'
                f'"user_agent":{"null" if ua is None else e(ua[:USER_AGENT_MAX])}}}'
            )
        except TypeError:  # a text field that is not a str
            return _encode_line(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowRecord:
        """Rebuild a record from ``to_dict`` output (``time`` is derived, so it is ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


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


# --------------------------------------------------------------------------------------------
# Reader


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """Which records ``enforcer flows`` shows; all given conditions must hold."""

    service: str | None = None
    user: str | None = None
    """Matches the ``sub`` exactly or the email case-insensitively."""
    denied: bool = False
    """Only requests that were not served (see ``is_denied``)."""
    since: datetime | None = None
    decision: str | None = None

    def matches(self, row: dict[str, Any]) -> bool:
        """True if the record passes every condition of the filter."""
        if self.service is not None and row.get("service") != self.service:
            return False
        if self.decision is not None and row.get("decision") != self.decision:
            return False
        if self.user is not None:
            email = row.get("email")
            by_email = isinstance(email, str) and email.casefold() == self.user.casefold()
            if row.get("user") != self.user and not by_email:
                return False
        if self.denied and not is_denied(row):
            return False
        if self.since is not None:
            when = _row_time(row)
            if when is None or when < _aware(self.since):
                return False
        return True


def is_denied(row: dict[str, Any]) -> bool:
    """Not served: a decision outside ``SERVED_DECISIONS``, or a login callback that failed."""
    decision = row.get("decision")
    if decision not in SERVED_DECISIONS:
        return True
    status = row.get("status")
    return decision == "callback" and isinstance(status, int) and status >= 400


@dataclass(slots=True)
class ReadStats:
    """What a reader saw: total lines, corrupt (skipped) lines, and records that matched."""

    lines: int = 0
    corrupt: int = 0
    matched: int = 0


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _row_time(row: dict[str, Any]) -> datetime | None:
    start = row.get("start")
    if isinstance(start, int | float) and not isinstance(start, bool):
        try:
            return datetime.fromtimestamp(start, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    text = row.get("time")
    if isinstance(text, str):
        try:
            return _aware(datetime.fromisoformat(text))
        except ValueError:
            return None
    return None


_SINCE_RE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime) -> datetime:
    """``30s`` / ``10m`` / ``2h`` / ``1d`` / ``1w`` before ``now``, or an ISO-8601 time (UTC if
    it names no zone); the result is timezone-aware."""
    m = _SINCE_RE.match(text)
    if m:
        return _aware(now) - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    try:
        return _aware(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise ValueError(
            f"--since {text!r}: expected a duration like 30s, 10m, 2h, 1d, 1w "
            "or an ISO-8601 time like 2024-05-01T12:00:00Z"
        ) from None


def _parse_line(line: bytes | str, stats: ReadStats) -> dict[str, Any] | None:
    stats.lines += 1
    try:
        row = json.loads(line)
    except ValueError:
        row = None
    if not isinstance(row, dict):
        stats.corrupt += 1
        return None
    return row


def read_flows(
    path: Path, flt: FlowFilter, *, stats: ReadStats | None = None
) -> Iterator[dict[str, Any]]:
    """Records of ``path`` that match ``flt``; corrupt lines are skipped and counted."""
    st = stats if stats is not None else ReadStats()
    with path.open("rb") as f:
        yield from _matching(f, flt, st)


def _matching(lines: Iterable[bytes], flt: FlowFilter, st: ReadStats) -> Iterator[dict[str, Any]]:
    """The records of ``lines`` that match ``flt`` (blank lines ignored, corrupt ones counted)."""
    for line in lines:
        if not line.strip():
            continue
        row = _parse_line(line, st)
        if row is not None and flt.matches(row):
            st.matched += 1
            yield row


def follow_flows(
    path: Path,
    flt: FlowFilter,
    *,
    poll: float = 0.25,
    stop: Callable[[], bool] | None = None,
    from_start: bool = False,
    stats: ReadStats | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[dict[str, Any]]:
    """Like ``tail -F``: new matching records as they are appended, across rotation (new inode:
    the old file is drained, the new one read from its start) and truncation (read from 0).

    Starts at the end of the current file unless ``from_start``; runs until ``stop()`` is true.
    """
    st = stats if stats is not None else ReadStats()
    should_stop = stop if stop is not None else (lambda: False)
    f = None
    ident: tuple[int, int] | None = None
    partial = b""
    first = True

    def drain() -> Iterator[dict[str, Any]]:
        nonlocal partial
        assert f is not None
        while True:
            chunk = f.read(65536)
            if not chunk:
                return
            partial += chunk
            *complete, partial = partial.split(b"\n")
            yield from _matching(complete, flt, st)

    try:
        while not should_stop():
            if f is None:
                try:
                    f = path.open("rb")
                except FileNotFoundError:
                    first = False  # a file that appears later is new: read it whole
                    sleep(poll)
                    continue
                info = os.fstat(f.fileno())
                ident = (info.st_dev, info.st_ino)
                if first and not from_start:
                    f.seek(0, os.SEEK_END)
                first = False
                partial = b""
            yield from drain()
            try:
                now_info = os.stat(path)
            except FileNotFoundError:
                now_info = None  # renamed away, new one not created yet: keep the old open
            if now_info is not None and (now_info.st_dev, now_info.st_ino) != ident:
                yield from drain()  # rotated: whatever the writer added before reopening
                f.close()
                f = None
                continue
            if now_info is not None and now_info.st_size < f.tell():
                f.seek(0)  # truncated in place (copytruncate)
                partial = b""
                continue
            sleep(poll)
    finally:
        if f is not None:
            f.close()


# --------------------------------------------------------------------------------------------
# Output


def _safe(value: Any) -> str:
    """Render a field for a terminal: every non-printable character becomes an escape."""
    text = "-" if value is None else str(value)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


def _fit(text: str, width: int) -> str:
    if len(text) > width:
        return text[: width - 1] + "…"
    return text.ljust(width)


def _short_time(row: dict[str, Any]) -> str:
    when = _row_time(row)
    if when is None:
        return _safe(row.get("time"))
    return when.strftime("%Y-%m-%d %H:%M:%S") + f".{when.microsecond // 1000:03d}"


def _ms(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.1f}"
    return _safe(value)


_COLUMNS: tuple[tuple[str, int], ...] = (
    ("TIME", 23),
    ("SERVICE", 16),
    ("CLIENT", 21),
    ("USER", 24),
    ("METHOD", 7),
    ("PATH", 40),
    ("STATUS", 6),
    ("DECISION", 11),
    ("REASON", 22),
    ("MS", 9),
)

_COLORS = {"allow": "\x1b[32m", "login": "\x1b[33m", "logout": "\x1b[36m", "callback": "\x1b[36m"}
_RED = "\x1b[31m"
_RESET = "\x1b[0m"


def format_table(
    rows: Iterable[dict[str, Any]], out: TextIO, *, color: bool = False, flush: bool = False
) -> None:
    """Fixed-width columns, one row per record; values escaped, long ones cut with ``…``."""
    out.write(" ".join(_fit(name, width) for name, width in _COLUMNS).rstrip() + "\n")
    for row in rows:
        user = row.get("email") or row.get("user")
        cells = [
            _short_time(row),
            _safe(row.get("service")),
            _safe(row.get("client")),
            _safe(user),
            _safe(row.get("method")),
            _safe(row.get("path")),
            _safe(row.get("status")),
            _safe(row.get("decision")),
            _safe(row.get("reason")),
            _ms(row.get("duration_ms")),
        ]
        parts = [_fit(cell, width) for cell, (_, width) in zip(cells, _COLUMNS, strict=True)]
        parts[-1] = parts[-1].rstrip()
        if color:
            code = _COLORS.get(str(row.get("decision")), _RED)
            if is_denied(row):
                code = _RED if row.get("decision") != "login" else _COLORS["login"]
            parts[7] = code + parts[7] + _RESET
        out.write(" ".join(parts) + "\n")
        if flush:
            out.flush()


def format_summary(rows: Iterable[dict[str, Any]], out: TextIO, *, top: int = 10) -> None:
    """Counts by service, decision and reason, then the most denied paths and users."""
    total = 0
    by_service: collections.Counter[str] = collections.Counter()
    by_decision: collections.Counter[str] = collections.Counter()
    by_reason: collections.Counter[str] = collections.Counter()
    denied_paths: collections.Counter[str] = collections.Counter()
    denied_users: collections.Counter[str] = collections.Counter()
    for row in rows:
        total += 1
        by_service[_safe(row.get("service"))] += 1
        by_decision[_safe(row.get("decision"))] += 1
        by_reason[_safe(row.get("reason"))] += 1
        if is_denied(row):
            denied_paths[_safe(row.get("path"))] += 1
            denied_users[_safe(row.get("email") or row.get("user"))] += 1

    out.write(f"records: {total}\n")
    sections = (
        ("by service", by_service, None),
        ("by decision", by_decision, None),
        ("by reason", by_reason, None),
        ("top denied paths", denied_paths, top),
        ("top denied users", denied_users, top),
    )
    for title, counter, limit in sections:
        out.write(f"\n{title}:\n")
        if not counter:
            out.write("  (none)\n")
        for key, n in counter.most_common(limit):
            out.write(f"  {n:>8}  {key}\n")


def flows_command(
    path: Path,
    flt: FlowFilter,
    *,
    follow: bool,
    as_json: bool,
    summary: bool,
    out: TextIO,
    err: TextIO | None = None,
    color: bool | None = None,
    stop: Callable[[], bool] | None = None,
) -> int:
    """``enforcer flows``: print matching records (table, JSON lines or a summary); exit code.

    ``--follow`` starts at the end of the file, or at its start when ``--since`` is given.
    Returns 2 with a message on ``err`` when the file does not exist or options clash.
    """
    errout = err if err is not None else sys.stderr
    if follow and summary:
        errout.write("enforcer flows: --summary cannot be combined with --follow\n")
        return 2
    if not path.exists():
        errout.write(f"enforcer flows: {path}: no such flow log (check flowLog.path)\n")
        return 2
    stats = ReadStats()
    rows: Iterable[dict[str, Any]]
    if follow:
        rows = follow_flows(path, flt, stop=stop, from_start=flt.since is not None, stats=stats)
    else:
        rows = read_flows(path, flt, stats=stats)
    try:
        if summary:
            format_summary(rows, out)
        elif as_json:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=True, separators=(",", ":")) + "\n")
                if follow:
                    out.flush()
        else:
            use_color = color if color is not None else out.isatty()
            format_table(rows, out, color=use_color, flush=follow)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        errout.write(f"enforcer flows: {path}: {exc.strerror or exc}\n")
        return 2
    if stats.corrupt:
        errout.write(f"enforcer flows: skipped {stats.corrupt} corrupt line(s)\n")
    return 0
