"""Act on a plan the same way on both HTTP paths: the flow record and the app's body.

Both the aiohttp path (:meth:`enforcer.http.gate.Gate.handle`) and the lean path
(:class:`enforcer.http.fastpath.Connection`) begin a request's flow record with :func:`begin`,
note an allowed plan with :func:`allowed`, turn a failure into its flow reason, metric and page
with :func:`failure`, and write the record with :func:`finish` -- exactly once per request.
Both stream the app's body to the client with :func:`body`, through a :class:`Sink` each path
implements over its own connection.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from enforcer import errors
from enforcer.errors import Outcome, Reason, UpstreamKind
from enforcer.flow import FlowRecord
from enforcer.http import headers as headers_mod
from enforcer.http import pages
from enforcer.http import upstream as upstream_client

if TYPE_CHECKING:
    from enforcer.flowlog import FlowLog
    from enforcer.http.plan import Forward
    from enforcer.http.proxy import Transfer
    from enforcer.http.tls import ConnectionInfo
    from enforcer.metrics import Metrics

log = logging.getLogger("enforcer.handler")

UPSTREAM_MESSAGE = "The application did not answer properly."
STORE_MESSAGE = "Sign-in is unavailable right now; try again shortly."


def begin(
    info: ConnectionInfo, *, host: str | None, method: str, path: str, user_agent: str | None, now: float,
    flow_id: str,
) -> FlowRecord:
    """The flow record of a request arriving on the connection ``info`` describes."""
    return FlowRecord.begin(
        flow_id=flow_id,
        client=info.client,
        destination=info.destination_text,
        sni=info.sni,
        host=host,
        method=method,
        path=path,
        now=now,
        tls_version=info.tls_version,
        user_agent=user_agent,
    )


def allowed(flow: FlowRecord, plan: Forward) -> None:
    """Note an allowed request: its service, path, user and the rule that allowed it."""
    flow.service = plan.service.name
    flow.path = plan.path
    identity = plan.identity
    if identity is not None:
        flow.user, flow.email = identity.sub, identity.email
    flow.record(decision=Outcome.ALLOW, reason=plan.reason, endpoint=plan.endpoint)


def failure(flow: FlowRecord, exc: BaseException, metrics: Metrics) -> tuple[int | None, web.Response | None]:
    """Record why answering failed: (status for the flow record, page for the client or None).

    * the app failed (:class:`errors.UpstreamError`): its error page, counted per service;
    * the client's body was cut (:class:`errors.ClientBodyError`: too slow, too many uploads
      from its address): its page (408, 429), and the connection closes;
    * the client went away (``ConnectionResetError``, also while its body was being read):
      client status 499, nothing to send;
    * another refusal with its own code (:class:`errors.EnforcerError`, e.g. the session store
      is unavailable: 503): its page;
    * anything else is our bug: logged, a 500 page that closes the connection."""
    if isinstance(exc, errors.UpstreamError):
        flow.record(decision=Outcome.ERROR, reason=exc.reason, endpoint=flow.endpoint, user=flow.user)
        if flow.service:
            metrics.upstream_errors.labels(flow.service, exc.kind).inc()
        page = pages.error_page(
            exc.status, exc.reason, flow.flow_id, message=UPSTREAM_MESSAGE,
            close=exc.status == 413,  # the rest of the request body is not read
        )
        return exc.status, page
    if isinstance(exc, errors.ClientBodyError):
        flow.record(decision=flow.decision, reason=exc.reason, endpoint=flow.endpoint, user=flow.user)
        return exc.status, pages.error_page(exc.status, exc.reason, flow.flow_id, close=True)
    if isinstance(exc, ConnectionResetError):
        # the client went away while we were answering: not our error, nothing to send
        flow.record(decision=flow.decision, reason=Reason.CLIENT_ABORTED, endpoint=flow.endpoint)
        flow.status = 499
        return None, None
    if isinstance(exc, errors.EnforcerError):
        log.warning("flow %s: %s (%s)", flow.flow_id, exc.reason, exc)
        flow.record(decision=Outcome.ERROR, reason=exc.reason, endpoint=flow.endpoint, user=flow.user)
        return exc.status, pages.error_page(exc.status, exc.reason, flow.flow_id,
                                            message=STORE_MESSAGE if exc.status == 503 else "")
    log.error("internal error in flow %s", flow.flow_id, exc_info=exc)
    flow.record(decision=Outcome.ERROR, reason=Reason.INTERNAL_ERROR)
    return 500, pages.error_page(500, Reason.INTERNAL_ERROR, flow.flow_id, close=True)


def finish(
    flow: FlowRecord, transfer: Transfer | None, status: int | None, *, flowlog: FlowLog, metrics: Metrics,
    now: float,
) -> None:
    """Write the request's one flow record (with what was moved, when it was forwarded)."""
    if transfer is not None:
        flow.upstream_status = transfer.status
        flow.upstream_ms = transfer.upstream_ms
        flow.bytes_in, flow.bytes_out = transfer.bytes_in, transfer.bytes_out
    if flow.upstream_status is None and flow.decision is Outcome.ALLOW:
        flow.upstream_status = status
    flowlog.write(flow.finish(now=now, status=status))
    metrics.observe_flow(flow)


class Sink(Protocol):
    """The client side of one answer, as :func:`body` writes to it.  The response head is held
    back to go out with the first body bytes (one write instead of two); a method answers an
    awaitable only when the caller must wait (the client is not taking bytes), else None."""

    def send_head(self) -> None:
        """Write the held head now: no body bytes have come from the app yet."""

    def write(self, chunk: bytes) -> Awaitable[None] | None:
        """Write body bytes (after the head, if it is still held)."""

    def write_last(self, chunk: bytes) -> Awaitable[None] | None:
        """Write the last body bytes (maybe none) and end the answer."""

    def abort(self) -> None:
        """Cut the client connection: a truncated answer must never look complete."""


async def body(conn: upstream_client.Connection, sink: Sink, transfer: Transfer) -> None:
    """Stream the app's response body from ``conn`` to ``sink``, counting it in ``transfer``.

    The last chunk goes out with the end of the answer; a body the app cuts short aborts the
    client connection and raises UpstreamError(UpstreamKind.RESET, 502)."""
    try:
        if not conn.ready():
            # nothing of the body has come yet (a slow app, a stream, a long poll): the client
            # gets the head now, not when the first byte comes
            sink.send_head()
        chunk = await conn.read()
        while chunk:
            transfer.bytes_out += len(chunk)
            if conn.drained():
                break  # the last chunk: written with the end of the answer below
            wait = sink.write(chunk)
            if wait is not None:
                await wait
            chunk = await conn.read()
    except (upstream_client.Closed, upstream_client.ReadTimeout, upstream_client.ProtocolError):
        transfer.status = 502
        sink.abort()
        raise errors.UpstreamError(UpstreamKind.RESET, 502) from None
    wait = sink.write_last(chunk)
    if wait is not None:
        await wait


def page_bytes(response: web.Response, *, close: bool) -> tuple[bytes, bool]:
    """One of the enforcer's own pages as HTTP/1.1 bytes, for a path that writes its own
    answers (aiohttp writes them on the full path); and whether the connection then closes
    (``close`` asked already, or the page says so)."""
    body = response.body
    assert isinstance(body, bytes)
    headers = response.headers
    lines = [f"HTTP/1.1 {response.status} {response.reason}", *map(": ".join, headers.items())]
    lines.append(f"Content-Length: {len(body)}")
    if "Date" not in headers:
        lines.append(f"Date: {headers_mod.http_date()}")
    if "Server" not in headers:
        lines.append(f"Server: {headers_mod.SERVER}")
    close = close or response.keep_alive is False
    if close:
        lines.append("Connection: close")
    return "\r\n".join([*lines, "", ""]).encode() + body, close
