"""Responses the enforcer writes itself: error pages, login redirects, JSON errors.

Every such response carries the same security headers (no caching, no framing, no
referrer, HSTS) and never contains a token, code, secret or internal host name; it
names a stable reason code and the flow id so an operator can find the flow record.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable

from aiohttp import web

SECURITY_HEADERS = {
    "Server": "enforcer",  # instead of aiohttp's version banner
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
    "Strict-Transport-Security": "max-age=31536000",
}

TITLES = {
    400: "Bad request",
    401: "Sign-in required",
    403: "Access denied",
    404: "Not found",
    405: "Method not allowed",
    408: "Request timeout",
    413: "Request too large",
    414: "URI too long",
    421: "Misdirected request",
    431: "Headers too large",
    500: "Internal error",
    501: "Not implemented",
    502: "Application unavailable",
    503: "Service unavailable",
    504: "Application timed out",
    505: "HTTP version not supported",
}

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;color:#222}"
    "code{background:#f3f3f3;padding:.1rem .3rem;border-radius:3px}"
    "small{color:#777}ul{padding-left:1.2rem}"
)


def _page(title: str, body_html: str) -> str:
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<meta name=viewport content='width=device-width'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{body_html}</body></html>"
    )


def error_page(
    status: int,
    reason: str,
    flow_id: str,
    *,
    message: str = "",
    would_allow: Iterable[Iterable[str]] = (),
    missing: Iterable[str] = (),
    retry_url: str | None = None,
    close: bool = False,
) -> web.Response:
    """An HTML error page naming the reason code (and, for denies, the tag sets)."""
    title = TITLES.get(status, "Error")
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if message:
        parts.append(f"<p>{html.escape(message)}</p>")
    parts.append(f"<p>Reason: <code>{html.escape(reason)}</code></p>")
    sets = [sorted(s) for s in would_allow]
    if sets:
        items = "".join("<li>" + " and ".join(f"<code>{html.escape(t)}</code>" for t in s) + "</li>" for s in sets)
        parts.append(f"<p>Any one of these tag sets would allow this request:</p><ul>{items}</ul>")
    miss = sorted(missing)
    if miss:
        parts.append("<p>You are missing: " + ", ".join(f"<code>{html.escape(t)}</code>" for t in miss) + "</p>")
    if retry_url:
        parts.append(f"<p><a href='{html.escape(retry_url, quote=True)}'>Sign in again</a></p>")
    parts.append(f"<p><small>Flow id {html.escape(flow_id)}</small></p>")
    resp = web.Response(
        status=status,
        text=_page(title, "".join(parts)),
        content_type="text/html",
        charset="utf-8",
        headers=SECURITY_HEADERS,
    )
    if close:
        resp.headers["Connection"] = "close"
        resp.force_close()  # a ``Connection: close`` header alone leaves aiohttp's socket open
    return resp


def json_error(status: int, reason: str, flow_id: str, *, login_url: str | None = None) -> web.Response:
    """A JSON error for API clients (no redirects for them)."""
    body: dict[str, str] = {"error": reason, "flow_id": flow_id}
    headers = dict(SECURITY_HEADERS)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="enforcer", error="login_required"'
        if login_url:
            body["login"] = login_url
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


def plain_close(status: int, text: str) -> web.Response:
    """A minimal response that closes the connection (framing problems, bad hosts)."""
    resp = web.Response(status=status, text=text + "\n", content_type="text/plain", headers=SECURITY_HEADERS)
    resp.headers["Connection"] = "close"  # also on HTTP/1.0 answers (parser errors are answered as 1.0)
    resp.force_close()  # sends ``Connection: close`` *and* closes the socket after the response
    return resp


def redirect(location: str, *, set_cookies: Iterable[str] = ()) -> web.Response:
    """A 302 with security headers and any Set-Cookie values given."""
    headers = dict(SECURITY_HEADERS)
    headers["Location"] = location
    resp = web.Response(status=302, headers=headers)
    for c in set_cookies:
        resp.headers.add("Set-Cookie", c)
    return resp


def info_page(title: str, message_html: str, *, set_cookies: Iterable[str] = (), status: int = 200) -> web.Response:
    """A small page of our own (signed out, confirm logout); message_html is trusted."""
    resp = web.Response(
        status=status,
        text=_page(title, f"<h1>{html.escape(title)}</h1>{message_html}"),
        content_type="text/html",
        charset="utf-8",
        headers=SECURITY_HEADERS,
    )
    for c in set_cookies:
        resp.headers.add("Set-Cookie", c)
    return resp
