"""Tests for enforcer.flowlog: record serialization, the buffered writer and the flows reader."""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enforcer import flow as flowlog_mod
from enforcer.cli.flows import (
    FlowFilter,
    ReadStats,
    flows_command,
    follow_flows,
    format_summary,
    format_table,
    is_denied,
    is_login,
    parse_since,
    read_flows,
)
from enforcer.errors import Outcome, Reason
from enforcer.flow import FlowIds, FlowRecord
from enforcer.flowlog import FILE_MODE, PIPE_BUF, FlowLog, StdoutEcho, open_stdout
from tests.harness.prereq import require

T0 = 1_714_564_800.123  # 2024-05-01T12:00:00.123Z
FLOW_IDS = FlowIds()
NASTY = 'a\r\nb\x1b[31mred\x1b[0m "q" \\ \x00 \x7f \u2028 \u202e é'


def make(
    *,
    path: str = "/x",
    user_agent: str | None = "curl/8",
    now: float = T0,
    **kw: Any,
) -> FlowRecord:
    """Build a finished record with sensible defaults."""
    rec = FlowRecord.begin(
        flow_id=FLOW_IDS(),
        client="192.0.2.1:5555",
        sni="app.example",
        host="app.example",
        method="GET",
        path=path,
        now=now,
        destination="10.0.0.1:443",
        service=kw.pop("service", "app"),
        tls_version="TLSv1.3",
        user_agent=user_agent,
    )
    rec.record(
        decision=kw.pop("decision", "allow"),
        reason=kw.pop("reason", "allowed"),
        endpoint="all",
        user=kw.pop("user", "sub-1"),
        email=kw.pop("email", "alice@example.com"),
    )
    for key, value in kw.items():
        setattr(rec, key, value)
    return rec.finish(now=now + 0.0125, status=kw.get("status", 200))


def write_sample(path: Path, records: list[FlowRecord]) -> None:
    """Write records as a flow log file."""
    path.write_text("".join(r.to_json() + "\n" for r in records))


# -- FlowRecord ------------------------------------------------------------------------------


def test_begin_generates_16_hex_flow_id() -> None:
    """begin() gives each flow a fresh 16-hex-character id."""
    a, b = make(), make()
    assert len(a.flow_id) == 16
    int(a.flow_id, 16)
    assert a.flow_id != b.flow_id


def test_json_round_trip() -> None:
    """to_json followed by from_dict restores an equal record."""
    rec = make(upstream_status=201, upstream_ms=3.5, bytes_in=10, bytes_out=20)
    line = rec.to_json()
    data = json.loads(line)
    assert FlowRecord.from_dict(data) == rec


def test_json_has_fixed_key_order_and_iso_time() -> None:
    """Keys come in a fixed order with an ISO-8601 UTC millisecond time first."""
    data = json.loads(make().to_json())
    keys = list(data)
    assert keys[:3] == ["time", "flow_id", "start"]
    assert keys[-1] == "user_agent"
    assert data["time"] == "2024-05-01T12:00:00.123Z"
    assert data["duration_ms"] == pytest.approx(12.5)
    assert list(json.loads(make(path="/y").to_json())) == keys


def test_control_characters_stay_on_one_line() -> None:
    """CR, LF, ANSI escapes and quotes in path, user agent and user are escaped in one line."""
    rec = make(path="/p" + NASTY, user_agent=NASTY, user=NASTY, email=NASTY)
    line = rec.to_json()
    assert "\n" not in line
    assert "\r" not in line
    assert "\x1b" not in line
    assert line.isascii()
    assert line.isprintable()
    data = json.loads(line)
    assert data["path"] == "/p" + NASTY
    assert data["user_agent"] == NASTY
    assert data["user"] == NASTY


@given(st.text(), st.text())
def test_any_text_serializes_to_one_printable_line(path: str, ua: str) -> None:
    """Whatever a client sends, the serialized record is one printable ASCII line."""
    line = make(path=path, user_agent=ua).to_json()
    assert line.isascii()
    assert line.isprintable()
    assert json.loads(line)["path"] == path


def test_path_is_kept_exactly_as_given() -> None:
    """Serialization neither adds nor strips anything from the canonical path."""
    data = json.loads(make(path="/a/b%20c").to_json())
    assert data["path"] == "/a/b%20c"
    assert "?" not in data["path"]


def test_user_agent_truncated_to_256() -> None:
    """A huge User-Agent is cut to 256 characters, also when assigned after begin()."""
    rec = make(user_agent="x" * 10_000)
    assert rec.user_agent == "x" * 256
    rec.user_agent = "y" * 1000
    assert json.loads(rec.to_json())["user_agent"] == "y" * 256


def test_finish_never_negative_duration() -> None:
    """A clock step backwards yields duration 0, not a negative number."""
    rec = make()
    rec.finish(now=T0 - 5)
    assert rec.duration_ms == 0.0


# -- FlowLog writer ---------------------------------------------------------------------------


def lines_of(path: Path) -> list[str]:
    """The lines of a file."""
    return path.read_text().splitlines()


async def test_close_writes_every_record_exactly_once(tmp_path: Path) -> None:
    """10k records written then close() give exactly 10k distinct lines."""
    target = tmp_path / "logs" / "flows.jsonl"
    flog = FlowLog(target, flush_interval=0.01, max_buffer=100)
    task = asyncio.create_task(flog.run())
    ids = []
    for i in range(10_000):
        rec = make(path=f"/{i}")
        ids.append(rec.flow_id)
        flog.write(rec)
        if i % 500 == 0:
            await asyncio.sleep(0)
    await flog.close()
    await asyncio.wait_for(task, 5)
    lines = lines_of(target)
    assert len(lines) == 10_000
    assert [json.loads(line)["flow_id"] for line in lines] == ids
    assert flog.written == 10_000
    assert flog.dropped == 0


async def test_run_flushes_periodically(tmp_path: Path) -> None:
    """run() writes buffered records without close() within a few flush intervals."""
    target = tmp_path / "flows.jsonl"
    flog = FlowLog(target, flush_interval=0.02)
    task = asyncio.create_task(flog.run())
    flog.write(make())
    for _ in range(100):
        await asyncio.sleep(0.01)
        if target.exists() and lines_of(target):
            break
    assert len(lines_of(target)) == 1
    flog.write(make())
    await flog.close()
    await task
    assert len(lines_of(target)) == 2


def test_write_makes_no_io(tmp_path: Path) -> None:
    """write() only buffers: the file is not even created until a flush."""
    target = tmp_path / "flows.jsonl"
    flog = FlowLog(target)
    flog.write(make())
    assert not target.exists()
    assert flog.pending == 1


async def test_file_mode_is_0640(tmp_path: Path) -> None:
    """The flow log is created with mode 0640 regardless of the umask."""
    target = tmp_path / "d" / "flows.jsonl"
    flog = FlowLog(target)
    old = os.umask(0o077)
    try:
        flog.write(make())
        await flog.close()
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == FILE_MODE


async def test_appends_to_existing_file(tmp_path: Path) -> None:
    """An existing log is appended to, never truncated."""
    target = tmp_path / "flows.jsonl"
    write_sample(target, [make()])
    flog = FlowLog(target)
    flog.write(make())
    await flog.close()
    assert len(lines_of(target)) == 2


async def test_reopen_after_rotation(tmp_path: Path) -> None:
    """After logrotate renames the file, reopen() sends new records to a fresh file."""
    target = tmp_path / "flows.jsonl"
    rotated = tmp_path / "flows.jsonl.1"
    flog = FlowLog(target)
    first = [make(path="/old1"), make(path="/old2")]
    for rec in first:
        flog.write(rec)
    flog.flush()
    flog.write(make(path="/old3"))  # buffered when the rename happens
    target.rename(rotated)
    flog.reopen()
    flog.write(make(path="/new"))
    await flog.close()
    assert [json.loads(x)["path"] for x in lines_of(rotated)] == ["/old1", "/old2", "/old3"]
    assert [json.loads(x)["path"] for x in lines_of(target)] == ["/new"]


class FailingStream(io.StringIO):
    """A stream whose writes fail while ``broken`` is set."""

    broken = True

    def write(self, s: str) -> int:
        """Raise like a full disk, or write normally once repaired."""
        if self.broken:
            raise OSError(28, "No space left on device")
        return super().write(s)


async def test_stream_errors_are_counted_not_raised() -> None:
    """A failing sink never raises into write(); lines are kept and written once it recovers."""
    stream = FailingStream()
    errors: list[int] = []
    flog = FlowLog(None, stream=stream, on_write_error=lambda: errors.append(1))
    for _ in range(3):
        flog.write(make())
        flog.flush()
    assert flog.write_errors == 3 == len(errors)
    assert flog.pending == 3
    stream.broken = False
    await flog.close()
    assert len(stream.getvalue().splitlines()) == 3
    assert flog.written == 3


async def test_hard_cap_drops_oldest_and_counts() -> None:
    """While the sink is down the buffer keeps the newest hard_cap lines and counts drops."""
    stream = FailingStream()
    drops: list[int] = []
    flog = FlowLog(None, stream=stream, max_buffer=5, hard_cap=10, on_dropped=drops.append)
    for i in range(25):
        flog.write(make(path=f"/{i}"))
        flog.flush()
    assert flog.dropped == 15 == sum(drops)
    stream.broken = False
    await flog.close()
    paths = [json.loads(x)["path"] for x in stream.getvalue().splitlines()]
    assert paths == [f"/{i}" for i in range(15, 25)]


async def test_unwritable_location_does_not_raise_and_recovers(tmp_path: Path) -> None:
    """A flow log whose directory cannot be created counts errors and writes once it can (even as root)."""
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the log directory should be")
    flog = FlowLog(blocker / "flows.jsonl", flush_interval=0.01)
    task = asyncio.create_task(flog.run())
    try:
        flog.write(make())
        await asyncio.sleep(0.05)
        assert flog.write_errors >= 1
        assert flog.pending == 1
    finally:
        blocker.unlink()
        blocker.mkdir()
    await flog.close()
    await task
    assert len(lines_of(blocker / "flows.jsonl")) == 1


async def test_parent_path_not_a_directory_does_not_raise(tmp_path: Path) -> None:
    """A log path under a regular file fails to open; errors are counted until it is fixed."""
    blocker = tmp_path / "logs"
    blocker.write_text("not a directory")
    flog = FlowLog(blocker / "flows.jsonl", flush_interval=0.01)
    task = asyncio.create_task(flog.run())
    flog.write(make())
    await asyncio.sleep(0.05)
    assert flog.write_errors >= 1
    assert flog.pending == 1
    blocker.unlink()
    await flog.close()
    await task
    assert len(lines_of(blocker / "flows.jsonl")) == 1


def test_full_disk_does_not_raise() -> None:
    """Writing to a full device (ENOSPC) is counted and keeps the lines buffered."""
    require(Path("/dev/full").exists(), "/dev/full")
    flog = FlowLog(Path("/dev/full"))
    flog.write(make())
    flog.flush()
    flog.flush()
    assert flog.write_errors == 2
    assert flog.pending == 1
    assert flog.written == 0


async def test_errors_logged_once_per_minute(caplog: pytest.LogCaptureFixture) -> None:
    """Repeated sink failures produce one log message per minute, not one per flush."""
    clock = [1000.0]
    flog = FlowLog(None, stream=FailingStream(), monotonic=lambda: clock[0])
    for _ in range(5):
        flog.write(make())
        flog.flush()
    clock[0] += 61
    flog.flush()
    messages = [r for r in caplog.records if "write failed" in r.getMessage()]
    assert len(messages) == 2


class ShortWriteFd:
    """Patch os.write to accept only part of the data once, then fail."""

    def __init__(self, accept: int) -> None:
        """Accept ``accept`` bytes on the first call, then raise once."""
        self.accept = accept
        self.calls = 0
        self.real = os.write

    def __call__(self, fd: int, data: Any) -> int:
        """First call: short write; second call: ENOSPC; later: real write."""
        self.calls += 1
        if self.calls == 1:
            return self.real(fd, bytes(data)[: self.accept])
        if self.calls == 2:
            raise OSError(28, "No space left on device")
        return self.real(fd, data)


async def test_torn_write_is_isolated_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that stops mid-line leaves one corrupt line and every record written whole."""
    target = tmp_path / "flows.jsonl"
    flog = FlowLog(target)
    recs = [make(path=f"/{i}") for i in range(3)]
    for rec in recs:
        flog.write(rec)
    first_len = len(recs[0].to_json()) + 1
    monkeypatch.setattr(os, "write", ShortWriteFd(first_len + 10))
    flog.flush()
    monkeypatch.undo()
    await flog.close()
    stats = ReadStats()
    rows = list(read_flows(target, FlowFilter(), stats=stats))
    assert [r["path"] for r in rows] == ["/0", "/1", "/2"]
    assert stats.corrupt == 1
    assert flog.written == 3


async def test_write_after_close_is_not_lost(tmp_path: Path) -> None:
    """A record finishing after close() is still written."""
    target = tmp_path / "flows.jsonl"
    flog = FlowLog(target)
    await flog.close()
    flog.write(make())
    assert len(lines_of(target)) == 1


async def test_cancelled_run_flushes(tmp_path: Path) -> None:
    """Cancelling run() (TaskGroup shutdown) still flushes the buffer."""
    target = tmp_path / "flows.jsonl"
    flog = FlowLog(target, flush_interval=10)
    task = asyncio.create_task(flog.run())
    await asyncio.sleep(0)
    flog.write(make())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(lines_of(target)) == 1


def test_needs_path_or_stream() -> None:
    """FlowLog refuses to be built with neither or both sinks."""
    with pytest.raises(ValueError, match="exactly one"):
        FlowLog(None)
    with pytest.raises(ValueError, match="exactly one"):
        FlowLog(Path("x"), stream=io.StringIO())


# -- echo to standard output (flowLogStdout) ---------------------------------------------------


class CountingEcho:
    """An echo that takes at most ``room`` bytes in total (then EAGAIN) and records each write."""

    def __init__(self, room: int = 1 << 30) -> None:
        self.room = room
        self.writes: list[bytes] = []

    def __call__(self, data: bytes) -> int:
        if self.room <= 0:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        taken = data[: self.room]
        self.room -= len(taken)
        self.writes.append(taken)
        return len(taken)

    @property
    def text(self) -> str:
        return b"".join(self.writes).decode("ascii")


def _read_all(fd: int) -> bytes:
    """Everything a non-blocking reader can take from ``fd`` now."""
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_echo_gets_the_file_lines_in_the_same_flush(tmp_path: Path) -> None:
    """With an echo, write() still makes no I/O; one flush puts the same lines in the file and, in one write, on the echo."""
    target = tmp_path / "flows.jsonl"
    echo = CountingEcho()
    flog = FlowLog(target, echo=echo)
    recs = [make(path=f"/{i}") for i in range(3)]
    for rec in recs:
        flog.write(rec)
    assert not target.exists() and echo.writes == []
    flog.flush()
    assert len(echo.writes) == 1
    assert echo.text == target.read_text() == "".join(r.to_json() + "\n" for r in recs)
    flog.flush()  # nothing new: nothing written again
    assert len(echo.writes) == 1 and flog.echo_written == 3 and flog.written == 3


@pytest.mark.parametrize(("shared", "most"), [(True, PIPE_BUF), (False, 1 << 16)])
def test_echo_chunks_are_whole_lines_and_pipe_atomic_when_shared(shared: bool, most: int) -> None:
    """A flush writes the echo in chunks of whole lines: at most PIPE_BUF bytes when workers share the pipe, else up to 64 KiB."""
    echo = CountingEcho()
    flog = FlowLog(None, stream=io.StringIO(), echo=echo, echo_shared=shared)
    recs = [make(path=f"/{i}") for i in range(100)]
    for rec in recs:
        flog.write(rec)
    flog.flush()
    assert echo.text == "".join(r.to_json() + "\n" for r in recs)
    assert all(len(w) <= most and w.endswith(b"\n") for w in echo.writes)
    assert (len(echo.writes) > 1) == shared  # 100 lines: ~45 KB


def test_a_partial_echo_write_resumes_mid_line() -> None:
    """A reader that takes part of a line gets the rest at the next flush: the echo's text is every line, whole, once."""
    first = make(path="/0").to_json() + "\n"
    echo = CountingEcho(room=len(first) + 7)
    flog = FlowLog(None, stream=io.StringIO(), echo=echo)
    recs = [make(path=f"/{i}") for i in range(4)]
    for rec in recs:
        flog.write(rec)
    flog.flush()
    assert (flog.echo_written, flog.echo_pending) == (1, 3)
    echo.room = 1 << 30
    flog.flush()
    assert echo.text == "".join(r.to_json() + "\n" for r in recs)
    assert flog.echo_pending == 0 and flog.echo_dropped == 0


def test_echo_hard_cap_drops_the_oldest_but_never_a_begun_line() -> None:
    """While the reader stalls the echo keeps hard_cap lines, dropping the oldest (counted) but not one it began to write."""
    lines = [make(path=f"/{i}").to_json() + "\n" for i in range(30)]
    echo = CountingEcho(room=len(lines[0]) + 5)
    drops: list[int] = []
    flog = FlowLog(None, stream=io.StringIO(), echo=echo, max_buffer=5, hard_cap=10, on_dropped=drops.append)
    for i in range(30):
        flog.write(FlowRecord.from_dict(json.loads(lines[i])))
        flog.flush()
    assert flog.echo_pending == 10 and flog.echo_dropped == 19 == sum(drops) and flog.dropped == 0
    echo.room = 1 << 30
    flog.flush()
    assert echo.text == lines[0] + lines[1] + "".join(lines[21:])  # /1 was begun: it stays whole


def test_the_file_failing_does_not_hold_up_the_echo() -> None:
    """A failing file keeps its lines (dropping beyond the cap) while the echo writes every line at once."""
    stream = FailingStream()
    echo = CountingEcho()
    flog = FlowLog(None, stream=stream, max_buffer=5, hard_cap=10, echo=echo)
    recs = [make(path=f"/{i}") for i in range(25)]
    for rec in recs:
        flog.write(rec)
        flog.flush()
    assert echo.text == "".join(r.to_json() + "\n" for r in recs)
    assert (flog.dropped, flog.echo_dropped, flog.pending) == (15, 0, 10)
    stream.broken = False
    flog.flush()
    assert [json.loads(x)["path"] for x in stream.getvalue().splitlines()] == [f"/{i}" for i in range(15, 25)]
    assert echo.text.count("\n") == 25  # the recovered file lines are not echoed twice


def test_a_record_dropped_before_any_flush_counts_once() -> None:
    """More than hard_cap records between two flushes: the oldest are lost for file and echo alike, counted once."""
    echo = CountingEcho()
    drops: list[int] = []
    flog = FlowLog(None, stream=io.StringIO(), max_buffer=10, hard_cap=10, echo=echo, on_dropped=drops.append)
    for i in range(25):
        flog.write(make(path=f"/{i}"))
    flog.flush()
    assert sum(drops) == 15 == flog.dropped and flog.echo_dropped == 0
    assert [json.loads(x)["path"] for x in echo.text.splitlines()] == [f"/{i}" for i in range(15, 25)]


def _stalled(kind: str) -> tuple[int, int]:
    """(write end, read end) of a pipe or a stream socket pair nobody reads yet."""
    if kind == "pipe":
        r, w = os.pipe()
        os.set_blocking(r, False)
        return w, r
    import socket  # noqa: PLC0415

    a, b = socket.socketpair()
    b.setblocking(False)
    return a.detach(), b.detach()


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_a_stalled_stdout_never_blocks_and_keeps_the_newest_lines(kind: str) -> None:
    """Standard output nobody reads (a stalled containerd pipe, a stalled journal socket) never blocks a flush:
    the file gets every line, the echo keeps the newest hard_cap lines, and whatever the reader gets is whole lines."""
    w, r = _stalled(kind)
    echo = StdoutEcho(w)
    try:
        assert os.get_blocking(w)  # our own non-blocking description (pipe) or MSG_DONTWAIT (socket)
        drops: list[int] = []
        stream = io.StringIO()
        flog = FlowLog(None, stream=stream, max_buffer=500, hard_cap=500, echo=echo, on_dropped=drops.append)
        done = threading.Event()

        def flood() -> None:
            for i in range(3000):  # ~1 MB: far more than a pipe (64 KiB) or a socket buffer holds
                flog.write(make(path=f"/{i}"))
                if i % 100 == 99:
                    flog.flush()
            done.set()

        thread = threading.Thread(target=flood, daemon=True)
        started = time.monotonic()
        thread.start()
        thread.join(20)
        assert done.is_set(), "a flush blocked on the stalled reader"
        elapsed = time.monotonic() - started
        assert len(stream.getvalue().splitlines()) == 3000
        assert flog.echo_pending == 500 and flog.echo_dropped == sum(drops) > 0
        out = _read_all(r)
        while flog.echo_pending:  # the reader wakes up: the rest follows, flush by flush
            flog.flush()
            out += _read_all(r)
        got = out.decode("ascii").splitlines()
        paths = [json.loads(line)["path"] for line in got]  # every line whole JSON
        assert paths[-499:] == [f"/{i}" for i in range(2501, 3000)]  # (the 500th: a line begun, kept whole)
        assert paths == sorted(paths, key=lambda p: int(p[1:])) and len(set(paths)) == len(paths)
        assert len(paths) + flog.echo_dropped == 3000
        print(f"{kind}: 3000 records with a stalled reader in {elapsed * 1000:.0f} ms, {flog.echo_dropped} dropped")
    finally:
        echo.close()
        os.close(w)
        os.close(r)


async def test_a_stdout_without_a_reader_counts_errors_and_never_raises() -> None:
    """A pipe whose reader is gone (EPIPE) counts a write error per flush; records, the file and close() go on."""
    r, w = os.pipe()
    os.close(r)
    echo = StdoutEcho(w)  # no reader: /proc cannot reopen it, so the poll()-first writer
    errors: list[int] = []
    stream = io.StringIO()
    flog = FlowLog(None, stream=stream, echo=echo, on_write_error=lambda: errors.append(1))
    try:
        flog.write(make())
        flog.flush()
        flog.write(make())
        await flog.close()
    finally:
        echo.close()
        os.close(w)
    assert len(errors) == 2 == flog.write_errors  # close() does not wait for a reader that is gone
    assert len(stream.getvalue().splitlines()) == 2
    assert (flog.echo_pending, flog.echo_dropped) == (0, 2)


async def test_close_gives_a_slow_reader_a_moment_then_counts_what_is_left(caplog: pytest.LogCaptureFixture) -> None:
    """At close() a reader that is behind gets ECHO_CLOSE_WAIT to take the last lines; what it leaves is dropped, counted and logged."""
    for reads_soon in (True, False):
        echo = CountingEcho(room=0)
        drops: list[int] = []
        flog = FlowLog(None, stream=io.StringIO(), echo=echo, on_dropped=drops.append)
        for i in range(3):
            flog.write(make(path=f"/{i}"))
        if reads_soon:
            asyncio.get_running_loop().call_later(0.1, setattr, echo, "room", 1 << 30)
        started = time.monotonic()
        await flog.close()
        if reads_soon:
            assert echo.text.count("\n") == 3 and drops == [] and time.monotonic() - started < 0.5
        else:
            assert echo.writes == [] and drops == [3] and flog.echo_dropped == 3
            assert time.monotonic() - started >= 0.9
            assert "3 lines not taken by the reader at the stop" in caplog.text


def test_open_stdout_of_a_closed_descriptor_names_the_setting() -> None:
    """Standard output that is not open is an OSError naming flowLogStdout."""
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError, match="flowLogStdout"):
        open_stdout(w)


# -- reader -----------------------------------------------------------------------------------


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    """A flow log with a mix of services, users, decisions and times."""
    path = tmp_path / "flows.jsonl"
    write_sample(
        path,
        [
            make(service="app", decision="allow", reason="allowed", now=T0),
            make(service="app", decision="deny", reason="missing_tags", path="/admin", now=T0 + 60),
            make(
                service="wiki",
                decision="login",
                reason="login_required",
                user=None,
                email=None,
                now=T0 + 120,
            ),
            make(
                service="wiki",
                decision="allow",
                user="sub-2",
                email="Bob@Example.com",
                now=T0 + 180,
            ),
            make(service="app", decision="error", reason="upstream_connect", now=T0 + 240),
            make(service="app", decision="callback", reason="login_success", status=302, now=T0 + 300),
            make(
                service="app", decision="callback", reason="callback_iss_mismatch", status=403, now=T0 + 360
            ),
        ],
    )
    return path


def paths(rows: Iterator[dict[str, Any]]) -> list[tuple[str, str]]:
    """(service, decision) pairs of rows."""
    return [(r["service"], r["decision"]) for r in rows]


def test_filter_none_returns_everything(sample: Path) -> None:
    """An empty filter yields every record in file order."""
    assert len(list(read_flows(sample, FlowFilter()))) == 7


def test_filter_service(sample: Path) -> None:
    """service= keeps only that service's records."""
    assert paths(read_flows(sample, FlowFilter(service="wiki"))) == [
        ("wiki", "login"),
        ("wiki", "allow"),
    ]


def test_filter_user_matches_sub_or_email(sample: Path) -> None:
    """user= matches the sub exactly or the email case-insensitively."""
    assert len(list(read_flows(sample, FlowFilter(user="sub-2")))) == 1
    assert len(list(read_flows(sample, FlowFilter(user="bob@example.com")))) == 1
    assert len(list(read_flows(sample, FlowFilter(user="nobody")))) == 0


def test_filter_denied(sample: Path) -> None:
    """denied=True keeps everything not served but login challenges: deny, error, failed callbacks."""
    assert paths(read_flows(sample, FlowFilter(denied=True))) == [
        ("app", "deny"),
        ("app", "error"),
        ("app", "callback"),
    ]


def test_is_denied_treats_unknown_decisions_as_not_served() -> None:
    """A decision the reader does not know counts as denied, so --denied never hides it."""
    assert is_denied({"decision": "bad_request"})
    assert is_denied({"decision": "something_new"})
    assert not is_denied({"decision": "logout", "status": 302})


def test_filter_since_and_decision(sample: Path) -> None:
    """since= drops older records and decision= keeps one decision."""
    since = datetime.fromtimestamp(T0 + 150, UTC)
    assert len(list(read_flows(sample, FlowFilter(since=since)))) == 4
    assert len(list(read_flows(sample, FlowFilter(decision="allow")))) == 2
    naive = since.replace(tzinfo=None)
    assert len(list(read_flows(sample, FlowFilter(since=naive, decision="allow")))) == 1


def test_corrupt_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    """Garbage, truncated JSON and non-object lines are skipped and counted."""
    path = tmp_path / "flows.jsonl"
    good = make().to_json()
    path.write_bytes(
        (
            good
            + "\n"
            + '{"time": "x", "pa'
            + "\n"
            + "[1,2]\n\n"
            + "\xff\xfe garbage\n"
            + good
            + "\n"
        ).encode("utf-8", "surrogateescape")
        + b"\xff\xfe\n"
    )
    stats = ReadStats()
    rows = list(read_flows(path, FlowFilter(), stats=stats))
    assert len(rows) == 2
    assert stats.corrupt == 4
    assert stats.matched == 2


@pytest.mark.parametrize(
    ("text", "delta"),
    [
        ("30s", timedelta(seconds=30)),
        ("10m", timedelta(minutes=10)),
        ("2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        ("1w", timedelta(weeks=1)),
    ],
)
def test_parse_since_durations(text: str, delta: timedelta) -> None:
    """Relative durations count back from now."""
    now = datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert parse_since(text, now) == now - delta


def test_parse_since_iso() -> None:
    """ISO-8601 times are accepted; a time without zone is UTC."""
    now = datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert parse_since("2024-04-30T10:00:00Z", now) == datetime(2024, 4, 30, 10, tzinfo=UTC)
    assert parse_since("2024-04-30T10:00:00", now) == datetime(2024, 4, 30, 10, tzinfo=UTC)
    assert parse_since("2024-04-30T12:00:00+02:00", now) == datetime(2024, 4, 30, 10, tzinfo=UTC)


@pytest.mark.parametrize("text", ["", "10", "m10", "10x", "yesterday", "-5m"])
def test_parse_since_rejects_garbage(text: str) -> None:
    """Anything else raises ValueError with a message naming the accepted forms."""
    with pytest.raises(ValueError, match="expected a duration like"):
        parse_since(text, datetime(2024, 5, 1, tzinfo=UTC))


# -- follow -----------------------------------------------------------------------------------


class Follower:
    """Run follow_flows in a thread, collecting rows, until stopped."""

    def __init__(self, path: Path, **kw: Any) -> None:
        """Start following ``path``."""
        self.rows: list[dict[str, Any]] = []
        self.stopped = threading.Event()
        self.started = threading.Event()

        def stop() -> bool:
            self.started.set()
            return self.stopped.is_set()

        def target() -> None:
            for row in follow_flows(path, FlowFilter(), poll=0.01, stop=stop, **kw):
                self.rows.append(row)

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        assert self.started.wait(5)
        time.sleep(0.05)  # let it open the file and seek to the end

    def wait_for(self, n: int) -> list[str]:
        """Wait (bounded) until ``n`` rows arrived; return their paths."""
        deadline = time.monotonic() + 5
        while len(self.rows) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return [r["path"] for r in self.rows]

    def stop(self) -> None:
        """Stop the follower and join its thread."""
        self.stopped.set()
        self.thread.join(5)
        assert not self.thread.is_alive()


def append(path: Path, *recs: FlowRecord) -> None:
    """Append records to a file."""
    with path.open("a") as f:
        f.write("".join(r.to_json() + "\n" for r in recs))


def test_follow_picks_up_appended_lines(tmp_path: Path) -> None:
    """Follow starts at the end and yields each appended record once."""
    path = tmp_path / "flows.jsonl"
    append(path, make(path="/before"))
    fol = Follower(path)
    try:
        append(path, make(path="/a"))
        assert fol.wait_for(1) == ["/a"]
        with path.open("a") as f:  # a line written in two pieces
            line = make(path="/b").to_json()
            f.write(line[:20])
            f.flush()
            time.sleep(0.05)
            f.write(line[20:] + "\n")
        assert fol.wait_for(2) == ["/a", "/b"]
    finally:
        fol.stop()


def test_follow_survives_rotation(tmp_path: Path) -> None:
    """After a rename-and-recreate rotation, follow drains the old file and reads the new one."""
    path = tmp_path / "flows.jsonl"
    path.touch()
    fol = Follower(path)
    try:
        append(path, make(path="/1"))
        assert fol.wait_for(1) == ["/1"]
        path.rename(tmp_path / "flows.jsonl.1")
        append(tmp_path / "flows.jsonl.1", make(path="/2"))  # writer not yet reopened
        time.sleep(0.05)
        append(path, make(path="/3"), make(path="/4"))
        assert fol.wait_for(4) == ["/1", "/2", "/3", "/4"]
    finally:
        fol.stop()


def test_follow_survives_truncation(tmp_path: Path) -> None:
    """After copytruncate, follow reads the file again from the start."""
    path = tmp_path / "flows.jsonl"
    append(path, make(path="/old1"), make(path="/old2"))
    fol = Follower(path)
    try:
        append(path, make(path="/1"))
        assert fol.wait_for(1) == ["/1"]
        path.write_text("")
        time.sleep(0.05)
        append(path, make(path="/2"))
        assert fol.wait_for(2) == ["/1", "/2"]
    finally:
        fol.stop()


def test_follow_waits_for_missing_file(tmp_path: Path) -> None:
    """A file that does not exist yet is read from its start once it appears."""
    path = tmp_path / "flows.jsonl"
    fol = Follower(path)
    try:
        append(path, make(path="/first"))
        assert fol.wait_for(1) == ["/first"]
    finally:
        fol.stop()


def test_follow_from_start_applies_filter(tmp_path: Path) -> None:
    """from_start reads existing lines and the filter applies to followed lines."""
    path = tmp_path / "flows.jsonl"
    append(path, make(path="/a", service="app"), make(path="/b", service="wiki"))
    rows: list[str] = []
    gen = follow_flows(
        path, FlowFilter(service="wiki"), poll=0.01, from_start=True, stop=lambda: len(rows) >= 1
    )
    rows.extend(r["path"] for r in gen)
    assert rows == ["/b"]


# -- output -----------------------------------------------------------------------------------


def test_table_escapes_control_characters(sample: Path) -> None:
    """Control characters in any field are shown escaped, never sent to the terminal."""
    rec = make(path="/\x1b[2J" + "\r\n", user=None, email="e\x1b]0;pwned\x07")
    rec.client = "\x9b31m"
    row = json.loads(rec.to_json())
    row["reason"] = "r\x00"  # a log line from anywhere: the reader trusts no field
    out = io.StringIO()
    format_table([row], out)
    text = out.getvalue()
    assert "\x1b" not in text
    assert "\r" not in text
    assert "\x07" not in text
    assert "\x9b" not in text
    assert "\\x1b[2J" in text
    assert "\\x07" in text
    assert len(text.splitlines()) == 2


def test_table_columns_are_fixed_width(sample: Path) -> None:
    """Every row has the same column layout; long paths are cut."""
    out = io.StringIO()
    rows = list(read_flows(sample, FlowFilter()))
    rows[0]["path"] = "/" + "x" * 500
    format_table(rows, out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("TIME")
    assert len(lines) == 8
    assert "x" * 500 not in lines[1]
    assert "…" in lines[1]
    col = lines[0].index("METHOD")
    assert all(line[col : col + 3] == "GET" for line in lines[1:])
    assert "2024-05-01 12:00:00.123 UTC" in lines[1]


def test_table_color_only_wraps_decision(sample: Path) -> None:
    """Color mode adds ANSI codes around the decision column only."""
    out = io.StringIO()
    format_table(read_flows(sample, FlowFilter(decision="deny")), out, color=True)
    row = out.getvalue().splitlines()[1]
    assert "\x1b[31mdeny" in row
    assert row.count("\x1b[") == 2


def test_summary_counts(sample: Path) -> None:
    """The summary counts records by service/decision/reason and lists top denied paths/users."""
    out = io.StringIO()
    format_summary(read_flows(sample, FlowFilter()), out)
    text = out.getvalue()
    assert "records: 7" in text
    section = text.split("by service:")[1].split("\n\n")[0]
    assert "5  app" in section
    assert "2  wiki" in section
    decisions = text.split("by decision:")[1].split("\n\n")[0]
    assert "2  allow" in decisions
    assert "2  callback" in decisions
    denied_paths = text.split("top denied paths:")[1].split("\n\n")[0]
    assert "/admin" in denied_paths
    assert "2  /x" in denied_paths  # (the login challenge to /x is no denial)
    denied_users = text.split("top denied users:")[1]
    assert "3  sub-1 (alice@example.com)" in denied_users
    assert "  -" not in denied_users  # the anonymous login challenge is no denial
    assert "denied (not served): 3\n" in text
    assert "login challenges (redirects to sign in, 401s; not denials): 1\n" in text


def test_summary_empty() -> None:
    """An empty log gives zero records and (none) sections."""
    out = io.StringIO()
    format_summary([], out)
    assert "records: 0" in out.getvalue()
    assert "(none)" in out.getvalue()


# -- flows_command ----------------------------------------------------------------------------


def test_command_missing_directory(tmp_path: Path) -> None:
    """A flow log whose directory does not exist is a configuration problem: exit 2 and a message on stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = flows_command(
        tmp_path / "nope" / "flows.jsonl", FlowFilter(), follow=False, as_json=False, summary=False, out=out, err=err
    )
    assert code == 2
    assert "no such directory" in err.getvalue() and "logsDir" in err.getvalue()
    assert out.getvalue() == ""


@pytest.mark.parametrize("summary", [False, True])
def test_command_before_the_first_request(tmp_path: Path, summary: bool) -> None:
    """A fresh install has no flow log file until its first request: that is no records (exit 0), not an error."""
    out, err = io.StringIO(), io.StringIO()
    code = flows_command(
        tmp_path / "flows.jsonl", FlowFilter(), follow=False, as_json=False, summary=summary, out=out, err=err
    )
    assert code == 0
    assert "no requests recorded yet" in err.getvalue()
    assert ("records: 0" in out.getvalue()) is summary


def test_command_json_output(sample: Path) -> None:
    """--json prints one escaped JSON object per matching record."""
    out, err = io.StringIO(), io.StringIO()
    code = flows_command(
        sample, FlowFilter(denied=True), follow=False, as_json=True, summary=False, out=out, err=err
    )
    assert code == 0
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["decision"] for r in rows] == ["deny", "error", "callback"]


def test_command_table_and_corrupt_report(sample: Path) -> None:
    """The table mode prints a header and rows and reports skipped corrupt lines on stderr."""
    with sample.open("a") as f:
        f.write("not json\n")
    out, err = io.StringIO(), io.StringIO()
    code = flows_command(
        sample, FlowFilter(), follow=False, as_json=False, summary=False, out=out, err=err
    )
    assert code == 0
    assert len(out.getvalue().splitlines()) == 8
    assert "\x1b" not in out.getvalue()
    assert "skipped 1 corrupt line" in err.getvalue()


def test_command_summary(sample: Path) -> None:
    """--summary prints the summary."""
    out = io.StringIO()
    code = flows_command(
        sample, FlowFilter(), follow=False, as_json=False, summary=True, out=out, err=io.StringIO()
    )
    assert code == 0
    assert "records: 7" in out.getvalue()


def test_command_summary_with_follow_is_rejected(sample: Path) -> None:
    """--summary with --follow is a usage error (exit 2)."""
    err = io.StringIO()
    code = flows_command(
        sample, FlowFilter(), follow=True, as_json=False, summary=True, out=io.StringIO(), err=err
    )
    assert code == 2
    assert "--summary" in err.getvalue()


def test_command_follow_with_since_reads_existing(sample: Path) -> None:
    """--follow with --since starts at the file start and stops via the stop callback."""
    out = io.StringIO()
    flt = FlowFilter(since=datetime.fromtimestamp(T0 + 350, UTC))
    code = flows_command(
        sample,
        flt,
        follow=True,
        as_json=True,
        summary=False,
        out=out,
        err=io.StringIO(),
        stop=lambda: bool(out.getvalue()),
    )
    assert code == 0
    assert [json.loads(x)["reason"] for x in out.getvalue().splitlines()] == ["callback_iss_mismatch"]


@pytest.mark.parametrize(
    "ts",
    [0.0, 0.0005, 0.0004999, 0.9995, 0.9999995, 0.9999994999, 1_700_000_000.0, 1_700_000_000.9999996,
     1_764_000_000.123456, 2**31 + 0.5, 253402300798.9999, -1.5],
)
def test_iso_ms_matches_datetime(ts: float) -> None:
    """The once-per-second cache renders exactly what datetime renders (rounding, carry)."""
    slow = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert flowlog_mod._iso_ms(ts) == slow
    assert flowlog_mod._iso_ms(ts) == slow  # cached prefix


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_iso_ms_matches_datetime_everywhere(ts: float) -> None:
    assert flowlog_mod._iso_ms(ts) == flowlog_mod._iso_ms_slow(ts)


def test_to_json_is_json_dumps_of_to_dict() -> None:
    rec = make(path="/\u00e9\x1b[31m\n", user_agent='x"\u2028')
    rec.upstream_ms = 1.23456
    assert rec.to_json() == json.dumps(rec.to_dict(), ensure_ascii=True, separators=(",", ":"))


_OPT_TEXT = st.one_of(st.none(), st.text(max_size=40))
_OPT_INT = st.one_of(st.none(), st.integers(min_value=-(2**70), max_value=2**70))
_FLOAT = st.floats(allow_nan=True, allow_infinity=True)


@given(
    start=st.one_of(st.floats(min_value=-1e9, max_value=2.5e11), st.integers(min_value=0, max_value=2**36)),
    texts=st.tuples(*[_OPT_TEXT] * 9),
    required=st.tuples(*[st.text(max_size=40)] * 4),
    codes=st.tuples(st.sampled_from(Outcome), st.sampled_from(Reason)),
    statuses=st.tuples(_OPT_INT, _OPT_INT),
    sizes=st.tuples(st.integers(min_value=0, max_value=2**70), st.integers(min_value=0, max_value=2**70)),
    duration=st.one_of(_FLOAT, st.integers(min_value=0, max_value=10**6)),
    upstream_ms=st.one_of(st.none(), _FLOAT),
)
def test_to_json_is_the_generic_encoding_for_any_field_values(
    start: float, texts: tuple[str | None, ...], required: tuple[str, ...], codes: tuple[Outcome, Reason], statuses: tuple[int | None, int | None],
    sizes: tuple[int, int], duration: float, upstream_ms: float | None,
) -> None:
    """The field-by-field line is exactly the generic JSON encoding of to_dict(), whatever the values
    (odd types and non-finite numbers take the generic path)."""
    rec = FlowRecord(flow_id=required[0], start=start, client=required[1], method=required[2], path=required[3])
    rec.decision, rec.reason = codes
    (rec.service, rec.sni, rec.host, rec.destination, rec.user, rec.email, rec.endpoint, rec.tls_version,
     rec.user_agent) = texts
    rec.upstream_status, rec.status = statuses
    rec.bytes_in, rec.bytes_out = sizes
    rec.duration_ms, rec.upstream_ms = duration, upstream_ms
    assert rec.to_json() == json.dumps(rec.to_dict(), ensure_ascii=True, separators=(",", ":"))


@pytest.mark.parametrize(("decision", "reason"), [(o, r) for o in Outcome for r in (Reason.ALLOWED, Reason.UPSTREAM_TIMEOUT)])
def test_to_json_of_enum_codes_is_the_line_of_their_strings(decision: Outcome, reason: Reason) -> None:
    """An Outcome and a Reason serialise as their plain string values, byte for byte, on both paths."""
    rec = make(decision=decision, reason=reason)
    plain = json.loads(rec.to_json())
    assert plain["decision"] == decision.value
    assert plain["reason"] == reason.value
    text = rec.to_json()
    assert text == json.dumps(rec.to_dict(), ensure_ascii=True, separators=(",", ":"))
    assert text == json.dumps(dict(rec.to_dict(), decision=decision.value, reason=reason.value),
                              ensure_ascii=True, separators=(",", ":"))


def test_record_stores_members_and_refuses_unknown_codes() -> None:
    """record() turns code strings into Outcome/Reason members and raises on text that is not a code."""
    rec = make(decision="deny", reason="missing_tags")
    assert rec.decision is Outcome.DENY
    assert rec.reason is Reason.MISSING_TAGS
    with pytest.raises(ValueError, match="not a flow code"):
        rec.record(decision="deny", reason="bad thing: \x1b[31m")
    with pytest.raises(ValueError, match="not a flow code"):
        rec.record(decision="maybe", reason="allowed")


def test_a_new_record_is_an_unfinished_error() -> None:
    """A record nobody filled in says decision error, reason unfinished."""
    rec = FlowRecord.begin(flow_id="f" * 16, client="c", sni=None, host=None, method="GET", path="/", now=T0)
    assert (rec.decision, rec.reason) == (Outcome.ERROR, Reason.UNFINISHED)


@pytest.mark.parametrize("field", ["status", "upstream_status", "bytes_in"])
def test_to_json_of_a_bool_or_str_number_matches_json(field: str) -> None:
    """A field of an unexpected type (a bool status, a text size) is still rendered as json would."""
    for odd in (True, "7", 7.5):
        rec = make()
        setattr(rec, field, odd)
        assert rec.to_json() == json.dumps(rec.to_dict(), ensure_ascii=True, separators=(",", ":"))


def test_to_json_of_a_non_text_field_matches_json() -> None:
    rec = make(service=7, user=("a",))
    assert rec.to_json() == json.dumps(rec.to_dict(), ensure_ascii=True, separators=(",", ":"))


def test_flow_ids_are_unique_and_each_source_has_its_own_stock() -> None:
    """Ids are 16 hex characters made ahead in batches; two sources (two processes' daemons) never share a stock."""
    first, second = FlowIds(), FlowIds()
    ids = [first() for _ in range(2000)]
    assert len(set(ids)) == 2000 and all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    others = {second() for _ in range(2000)}
    assert not others & set(ids)


def test_a_record_carries_the_id_and_time_it_was_begun_with() -> None:
    """FlowRecord.begin takes its id and its clock reading from the caller: nothing hidden is drawn."""
    rec = FlowRecord.begin(flow_id="0123456789abcdef", client="c", sni=None, host=None, method="GET", path="/", now=T0)
    assert (rec.flow_id, rec.start) == ("0123456789abcdef", T0)


def test_to_json_of_an_ordinary_record_is_written_field_by_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """The request path's records (floats, ints, text, None) never need the generic encoder."""
    expected = [make(upstream_ms=1.5, upstream_status=200), make(user=None, email=None, user_agent=None)]
    lines = [r.to_json() for r in expected]

    def generic(_: dict[str, Any]) -> str:
        raise AssertionError("generic encoder used")

    monkeypatch.setattr(flowlog_mod, "_encode_line", generic)
    assert [r.to_json() for r in expected] == lines


def test_from_dict_rebuilds_a_record_without_a_decision_or_reason() -> None:
    """A record dict that was never decided (no decision, no reason key) rebuilds with the defaults."""
    data = make().to_dict()
    del data["decision"], data["reason"]
    rec = FlowRecord.from_dict(data)
    assert (rec.decision, rec.reason) == (Outcome.ERROR, Reason.UNFINISHED)  # an unfinished request
    assert rec.flow_id == data["flow_id"]


# -- deny fields (issue 18 item 4) ---------------------------------------------------------------


def test_deny_record_keeps_tag_sets_and_fingerprint_not_tags() -> None:
    """A deny keeps the allowing tag sets, the missing tags and a fingerprint, never the user's tags."""
    rec = make(decision="deny", reason="missing_tags", status=403)
    tags = frozenset({"email=eve@example.com", "groups=staff"})
    rec.note_deny(
        would_allow=(frozenset({"groups=admins"}), frozenset({"groups=ops", "email=bob@example.com"})),
        missing=frozenset({"groups=admins"}), tags=tags,
    )
    line = rec.to_json()
    data = json.loads(line)
    assert data["would_allow"] == [["groups=admins"], ["email=bob@example.com", "groups=ops"]]
    assert data["missing"] == ["groups=admins"]
    assert data["tags_fp"] == flowlog_mod.tags_fingerprint(tags)
    assert len(data["tags_fp"]) == flowlog_mod.TAGS_FINGERPRINT_CHARS
    assert "eve@example.com" not in line and "groups=staff" not in line
    assert list(data)[-3:] == ["would_allow", "missing", "tags_fp"]
    assert FlowRecord.from_dict(data) == rec
    assert line == flowlog_mod._encode_line(rec.to_dict())


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (["groups=a", "email=x@y"], ["email=x@y", "groups=a"], True),
        (["groups=a"], ["groups=b"], False),
        ([], ["groups=a"], False),
    ],
)
def test_tags_fingerprint_ignores_order_only(a: list[str], b: list[str], same: bool) -> None:
    """Two tag sets have the same fingerprint exactly when they hold the same tags."""
    assert (flowlog_mod.tags_fingerprint(a) == flowlog_mod.tags_fingerprint(b)) is same


def test_tags_fingerprint_of_no_session_is_none() -> None:
    """An anonymous request (no tags at all) has no fingerprint."""
    assert flowlog_mod.tags_fingerprint(None) is None


def test_records_without_deny_fields_keep_their_line() -> None:
    """A record that is not a deny writes exactly the keys it always wrote, via the fast path."""
    rec = make()
    data = json.loads(rec.to_json())
    assert "would_allow" not in data and "missing" not in data and "tags_fp" not in data
    assert rec.to_json() == flowlog_mod._encode_line(rec.to_dict())


def test_filter_logins_keeps_only_login_challenges(sample: Path) -> None:
    """logins=True keeps the login challenges that denied=True leaves out."""
    assert paths(read_flows(sample, FlowFilter(logins=True))) == [("wiki", "login")]
    assert is_login({"decision": "login"}) and not is_denied({"decision": "login"})


def test_table_user_column_is_always_the_sub(sample: Path) -> None:
    """USER shows the sub on every row and EMAIL the email, never one in place of the other."""
    out = io.StringIO()
    format_table(read_flows(sample, FlowFilter()), out)
    lines = out.getvalue().splitlines()
    user, email = lines[0].index("USER"), lines[0].index("EMAIL")
    assert [line[user:email].strip() for line in lines[1:]] == ["sub-1", "sub-1", "-", "sub-2", "sub-1", "sub-1", "sub-1"]
    assert lines[4][email:].startswith("Bob@Example.com")


def test_command_id_finds_one_record_and_shows_it_whole(tmp_path: Path) -> None:
    """--id prints the one record of that flow id, every field on its line, deny fields too."""
    deny = make(decision="deny", reason="missing_tags", status=403)
    deny.note_deny(would_allow=[frozenset({"groups=admins"})], missing={"groups=admins"}, tags={"groups=staff"})
    path = tmp_path / "flows.jsonl"
    write_sample(path, [make(), deny, make()])
    out, err = io.StringIO(), io.StringIO()
    code = flows_command(path, FlowFilter(flow_id=deny.flow_id), follow=False, as_json=False, summary=False,
                         out=out, err=err)
    text = out.getvalue()
    assert code == 0 and err.getvalue() == ""
    assert text.splitlines()[0].split() == ["flow_id", deny.flow_id]
    assert 'would_allow      [["groups=admins"]]' in text
    assert "2024-05-01 12:00:00.123 UTC" in text


def test_command_id_that_is_not_there_says_so(sample: Path) -> None:
    """--id of a flow the log does not hold exits 1 with a message."""
    out, err = io.StringIO(), io.StringIO()
    code = flows_command(sample, FlowFilter(flow_id="0" * 16), follow=False, as_json=False, summary=False,
                         out=out, err=err)
    assert code == 1 and "no flow 0000000000000000" in err.getvalue() and out.getvalue() == ""
