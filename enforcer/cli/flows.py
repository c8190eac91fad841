"""``enforcer flows``: read the flow log back, filter it, show it as a table or a summary.

``read_flows`` / ``follow_flows`` (tail -F semantics) with a ``FlowFilter``, and
``format_table`` / ``format_summary`` / ``format_record`` that escape control characters so a
logged value can never inject terminal escapes.  A login challenge (decision ``login``: the
redirect to sign in, or a 401) is counted apart from denials: ``--denied`` leaves it out and
``--logins`` shows only those.  Times are shown in UTC and say so.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from enforcer.config import settings as settings_mod
from enforcer.errors import Outcome
from enforcer.flow import SERVED_DECISIONS

LOGIN = Outcome.LOGIN.value

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
    flow_id: str | None = None
    """Only the record of this flow (the id on the page and in ``X-Enforcer-Flow``)."""
    logins: bool = False
    """Only login challenges (see ``is_login``)."""

    def matches(self, row: dict[str, Any]) -> bool:
        """True if the record passes every condition of the filter."""
        if self.flow_id is not None and row.get("flow_id") != self.flow_id:
            return False
        if self.logins and not is_login(row):
            return False
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


def is_login(row: dict[str, Any]) -> bool:
    """A login challenge: no session where one is needed, so a redirect to sign in (or a 401)."""
    return row.get("decision") == LOGIN


def is_denied(row: dict[str, Any]) -> bool:
    """Not served and not a login challenge: a decision outside ``SERVED_DECISIONS`` and not
    ``login``, or a login callback that failed."""
    decision = row.get("decision")
    if decision not in SERVED_DECISIONS:
        return decision != LOGIN
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
    f: BinaryIO | None = None
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
    """The record's time in UTC, saying so: ``2024-05-01 12:00:00.123 UTC``."""
    when = _row_time(row)
    if when is None:
        return _safe(row.get("time"))
    when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S") + f".{when.microsecond // 1000:03d} UTC"


def _ms(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.1f}"
    return _safe(value)


_COLUMNS: tuple[tuple[str, int], ...] = (
    ("TIME", 27),
    ("SERVICE", 16),
    ("CLIENT", 21),
    ("USER", 16),
    ("EMAIL", 24),
    ("METHOD", 7),
    ("PATH", 32),
    ("STATUS", 6),
    ("DECISION", 11),
    ("REASON", 22),
    ("MS", 9),
)

_DECISION = [name for name, _ in _COLUMNS].index("DECISION")

_COLORS = {"allow": "\x1b[32m", "login": "\x1b[33m", "logout": "\x1b[36m", "callback": "\x1b[36m"}
_RED = "\x1b[31m"
_RESET = "\x1b[0m"


def format_table(
    rows: Iterable[dict[str, Any]], out: TextIO, *, color: bool = False, flush: bool = False
) -> None:
    """Fixed-width columns, one row per record; values escaped, long ones cut with ``…``."""
    out.write(" ".join(_fit(name, width) for name, width in _COLUMNS).rstrip() + "\n")
    for row in rows:
        cells = [
            _short_time(row),
            _safe(row.get("service")),
            _safe(row.get("client")),
            _safe(row.get("user")),  # always the sub (what --user matches exactly)
            _safe(row.get("email")),
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
            parts[_DECISION] = code + parts[_DECISION] + _RESET
        out.write(" ".join(parts) + "\n")
        if flush:
            out.flush()


def _user_text(row: dict[str, Any]) -> str:
    """``sub (email)``, or the sub alone: the same form for every user."""
    sub, email = _safe(row.get("user")), row.get("email")
    return sub if email is None else f"{sub} ({_safe(email)})"


RECORD_FIELDS_FIRST = ("flow_id", "time", "service", "client", "user", "email", "method", "path", "status",
                       "decision", "reason", "endpoint")


def format_record(row: dict[str, Any], out: TextIO) -> None:
    """One record, one ``field: value`` line each (the main fields first), escaped."""
    keys = [k for k in RECORD_FIELDS_FIRST if k in row] + [k for k in row if k not in RECORD_FIELDS_FIRST]
    width = max(len(k) for k in keys) if keys else 0
    for key in keys:
        value = row[key]
        text = _short_time(row) if key == "time" else (
            json.dumps(value, ensure_ascii=True) if isinstance(value, list) else _safe(value)
        )
        out.write(f"{_safe(key).ljust(width)}  {text}\n")


def format_summary(rows: Iterable[dict[str, Any]], out: TextIO, *, top: int = 10) -> None:
    """Counts by service, decision and reason, then the most denied paths and users; login
    challenges are counted on their own line, not as denials."""
    total = denied = logins = 0
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
        if is_login(row):
            logins += 1
        elif is_denied(row):
            denied += 1
            denied_paths[_safe(row.get("path"))] += 1
            denied_users[_user_text(row)] += 1

    out.write(f"records: {total}\n")
    out.write(f"denied (not served): {denied}\n")
    out.write(f"login challenges (redirects to sign in, 401s; not denials): {logins}\n")
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
    A log the daemon has not created yet (no request so far) is empty; ``--follow`` waits for it.
    Returns 2 with a message on ``err`` when its directory does not exist or options clash.
    """
    errout = err if err is not None else sys.stderr
    if follow and summary:
        errout.write("enforcer flows: --summary cannot be combined with --follow\n")
        return 2
    if not path.exists():
        if not path.parent.is_dir():
            errout.write(f"enforcer flows: {path.parent}: no such directory (check logsDir in the config)\n")
            return 2
        if not follow:  # the daemon creates the file with the first request it records
            errout.write(f"enforcer flows: no requests recorded yet ({path} appears with the first one)\n")
            if summary:
                format_summary([], out)
            return 0
    stats = ReadStats()
    rows: Iterable[dict[str, Any]]
    if follow:
        rows = follow_flows(path, flt, stop=stop, from_start=flt.since is not None, stats=stats)
    else:
        rows = read_flows(path, flt, stats=stats)
    try:
        if summary:
            format_summary(rows, out)
        elif flt.flow_id is not None and not as_json and not follow:
            for row in rows:
                format_record(row, out)
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
    if flt.flow_id is not None and not follow and not stats.matched:
        errout.write(f"enforcer flows: no flow {flt.flow_id} in {path}\n")
        return 1
    return 0


def command(args: argparse.Namespace) -> int:
    """``enforcer flows``: the flow log of the config (or ``--file``), filtered, as a table, JSON or summary."""
    path = args.file
    if path is None:
        path = settings_mod.load_settings(args.config).flow_log
    try:
        since = parse_since(args.since, datetime.now(UTC)) if args.since else None
    except ValueError as exc:
        print(f"enforcer flows: --since: {exc}", file=sys.stderr)
        return 2
    flt = FlowFilter(
        service=args.service, user=args.user, denied=args.denied, since=since, flow_id=args.id, logins=args.logins
    )
    return flows_command(path, flt, follow=args.follow, as_json=args.json, summary=args.summary, out=sys.stdout)
