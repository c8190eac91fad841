"""relay: one flow record per request, begun, failed and finished the same way on both paths."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from enforcer import errors
from enforcer.flow import FlowRecord
from enforcer.http import pages, relay
from enforcer.http import upstream as upstream_client
from enforcer.http.proxy import Transfer
from enforcer.http.tls import ConnectionInfo, connection_info
from enforcer.metrics import Metrics

T0 = 1_000_000.0
INFO = ConnectionInfo("192.0.2.7", "192.0.2.7:5555", ("10.0.0.1", 443), "10.0.0.1:443", "app.test", "TLSv1.3")


class _FlowLog:
    """The flow log's write side: keeps what it is given."""

    def __init__(self) -> None:
        self.records: list[FlowRecord] = []

    def write(self, record: FlowRecord) -> None:
        self.records.append(record)


def _flow() -> FlowRecord:
    flow = relay.begin(INFO, host="app.test", method="GET", path="/x", user_agent="ua", now=T0, flow_id="0123456789abcdef")
    flow.service = "app"
    flow.record(decision="allow", reason="allowed", endpoint="app#1", user="u1")
    return flow


def test_a_flow_begins_with_the_connection_facts() -> None:
    """The record names the client, original destination, SNI and TLS version of the connection."""
    flow = relay.begin(INFO, host="app.test", method="HEAD", path="-", user_agent=None, now=T0, flow_id="0123456789abcdef")
    assert (flow.client, flow.destination, flow.sni, flow.tls_version, flow.method, flow.start) == (
        "192.0.2.7:5555", "10.0.0.1:443", "app.test", "TLSv1.3", "HEAD", T0,
    )


@pytest.mark.parametrize(
    ("peer", "destination", "client_ip", "client", "destination_text"),
    [
        (("::ffff:192.0.2.7", 5555, 0, 0), None, "192.0.2.7", "192.0.2.7:5555", None),
        (("2001:db8::1", 443, 0, 0), ("2001:db8::2", 443), "2001:db8::1", "2001:db8::1:443", "2001:db8::2:443"),
        (None, None, "-", "-", None),
    ],
    ids=["v4-mapped", "v6-redirected", "no-peer"],
)
def test_connection_info_is_built_from_the_transports_facts(
    peer: tuple[object, ...] | None, destination: tuple[str, int] | None, client_ip: str, client: str,
    destination_text: str | None,
) -> None:
    """An IPv4 client of the dual-stack listener is shown as a.b.c.d; no peer gives '-'."""
    info = connection_info(peer, destination, None)
    assert (info.client_ip, info.client, info.destination_text, info.sni, info.tls_version) == (
        client_ip, client, destination_text, None, None,
    )


@pytest.mark.parametrize(
    ("exc", "status", "reason", "page_status", "close"),
    [
        (errors.UpstreamError("connect", 502), 502, "upstream_connect", 502, False),
        (errors.UpstreamError("timeout", 504), 504, "upstream_timeout", 504, False),
        (errors.UpstreamError("body_too_large", 413), 413, "upstream_body_too_large", 413, True),
        (ConnectionResetError(), None, "client_aborted", None, None),
        (RuntimeError("a bug"), 500, "internal_error", 500, True),
    ],
    ids=["connect", "timeout", "body-too-large", "client-gone", "bug"],
)
def test_a_failure_maps_to_one_reason_status_and_page(
    exc: BaseException, status: int | None, reason: str, page_status: int | None, close: bool | None
) -> None:
    """Each failure gives its flow reason, the client status, and the page to send (closing the
    connection when the rest of the request is unread or the fault is ours); a client that left
    gets no page and status 499."""
    flow = _flow()
    got_status, page = relay.failure(flow, exc, Metrics())
    assert (got_status, flow.reason) == (status, reason)
    if page_status is None:
        assert page is None and flow.status == 499 and flow.decision == "allow"
    else:
        assert page is not None and page.status == page_status
        assert (page.keep_alive is False) is close


def test_an_app_failure_is_counted_per_service_and_kind() -> None:
    """An upstream failure increments the service's upstream error counter for its kind."""
    metrics = Metrics()
    relay.failure(_flow(), errors.UpstreamError("protocol", 502), metrics)
    value = metrics.registry.get_sample_value("enforcer_upstream_errors_total", {"service": "app", "kind": "protocol"})
    assert value == 1.0


def test_finish_writes_one_record_with_what_was_moved() -> None:
    """The record gets the upstream status, bytes and duration, and is written once."""
    flowlog = _FlowLog()
    flow = _flow()
    transfer = Transfer(status=200, bytes_in=3, bytes_out=10, upstream_ms=1.5)
    relay.finish(flow, transfer, 200, flowlog=flowlog, metrics=Metrics(), now=T0 + 0.25)  # type: ignore[arg-type]
    assert flowlog.records == [flow]
    assert (flow.upstream_status, flow.bytes_in, flow.bytes_out, flow.upstream_ms, flow.status, flow.duration_ms) == (
        200, 3, 10, 1.5, 200, 250.0,
    )


@pytest.mark.parametrize(
    ("decision", "status", "upstream_status"),
    [("allow", 502, 502), ("deny", 403, None), ("allow", None, None)],
    ids=["allowed-but-failed", "not-forwarded", "client-gone"],
)
def test_an_allowed_request_without_an_app_answer_logs_our_status_as_the_upstream_one(
    decision: str, status: int | None, upstream_status: int | None
) -> None:
    """When an allowed request got no answer from the app, its upstream status is the one we
    sent (502 and the like); a refused request never shows an upstream status."""
    flowlog = _FlowLog()
    flow = _flow()
    flow.record(decision=decision, reason="allowed")
    relay.finish(flow, Transfer(), status, flowlog=flowlog, metrics=Metrics(), now=T0)  # type: ignore[arg-type]
    assert flow.upstream_status == upstream_status and len(flowlog.records) == 1


# ------------------------------------------------------------------ the body relay


class _App:
    """The read side of an upstream connection: chunks, then the end or an error."""

    def __init__(self, chunks: list[bytes], *, ready: bool = True, fail: Exception | None = None) -> None:
        self._chunks = list(chunks)
        self._ready = ready
        self._fail = fail

    def ready(self) -> bool:
        return self._ready

    def drained(self) -> bool:
        return not self._chunks and self._fail is None

    async def read(self) -> bytes:
        if self._chunks:
            return self._chunks.pop(0)
        if self._fail is not None:
            raise self._fail
        return b""


class _Client:
    """A relay.Sink that records the writes; ``slow`` makes every write wait for a drain."""

    def __init__(self, *, slow: bool = False) -> None:
        self.log: list[tuple[str, bytes]] = []
        self.waits = 0
        self._slow = slow

    async def _drain(self) -> None:
        self.waits += 1

    def send_head(self) -> None:
        self.log.append(("head", b""))

    def write(self, chunk: bytes) -> Awaitable[None] | None:
        self.log.append(("write", chunk))
        return self._drain() if self._slow else None

    def write_last(self, chunk: bytes) -> Awaitable[None] | None:
        self.log.append(("last", chunk))
        return None

    def abort(self) -> None:
        self.log.append(("abort", b""))


@pytest.mark.parametrize(
    ("chunks", "ready", "log"),
    [
        ([b"abc"], True, [("last", b"abc")]),
        ([b"a", b"b", b"c"], True, [("write", b"a"), ("write", b"b"), ("last", b"c")]),
        ([b"abc"], False, [("head", b""), ("last", b"abc")]),
        ([], True, [("last", b"")]),
    ],
    ids=["one-chunk", "three-chunks", "slow-app", "empty"],
)
def test_the_body_goes_out_with_its_last_chunk_ending_the_answer(
    chunks: list[bytes], ready: bool, log: list[tuple[str, bytes]]
) -> None:
    """Each chunk is written in order, the last one with the end of the answer; when the app
    has sent nothing yet the head goes out first; the bytes are counted."""
    client, transfer = _Client(), Transfer(status=200)
    asyncio.run(relay.body(_App(chunks, ready=ready), client, transfer))  # type: ignore[arg-type]
    assert client.log == log and transfer.bytes_out == sum(map(len, chunks))


def test_a_client_that_is_not_reading_is_waited_for() -> None:
    """A write that answers an awaitable (the client's window is shut) is awaited before the
    next chunk is read."""
    client = _Client(slow=True)
    asyncio.run(relay.body(_App([b"a", b"b", b"c"]), client, Transfer()))  # type: ignore[arg-type]
    assert client.waits == 2


@pytest.mark.parametrize(
    "fail", [upstream_client.Closed(True), upstream_client.ReadTimeout(), upstream_client.ProtocolError()],
    ids=["closed", "timeout", "bad-framing"],
)
def test_a_body_the_app_cuts_short_aborts_the_client_connection(fail: Exception) -> None:
    """A body that ends early never looks complete: the client connection is cut, not ended,
    and the failure is an upstream reset (502)."""
    client, transfer = _Client(), Transfer(status=200)
    with pytest.raises(errors.UpstreamError) as caught:
        asyncio.run(relay.body(_App([b"a"], fail=fail), client, transfer))  # type: ignore[arg-type]
    assert (caught.value.kind, caught.value.status, transfer.status) == ("reset", 502, 502)
    assert client.log == [("write", b"a"), ("abort", b"")]


def test_page_bytes_frame_a_page_by_length_and_say_when_the_connection_closes() -> None:
    """An enforcer page becomes one HTTP/1.1 answer with its length, Date and Server; a page that closes says so."""
    page = pages.error_page(404, errors.Reason.UNKNOWN_HOST, "0123456789abcdef")
    data, close = relay.page_bytes(page, close=False)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ") and f"Content-Length: {len(body)}".encode() in head
    assert b"\r\nDate: " in head and b"\r\nServer: " in head and not close and b"Connection: close" not in head
    data, close = relay.page_bytes(page, close=True)
    assert close and b"\r\nConnection: close\r\n" in data
