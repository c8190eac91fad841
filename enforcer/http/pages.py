"""Responses the enforcer writes itself: error pages, login redirects, JSON errors.

Every such response carries the same security headers (no caching, no framing, no
referrer, HSTS) and never contains a token, code, secret or internal host name; it
names a stable reason code and the flow id (on the page and in the ``X-Enforcer-Flow``
header, :data:`FLOW_HEADER`) so anyone can find the flow record.  The 403 page
(:func:`deny_page`) shows by default only the rule and the group-like tag sets that would
allow the request, never another person's identifiers, and offers to sign out.
"""

from __future__ import annotations

import html
import json
from collections.abc import Collection, Iterable

from aiohttp import web

from enforcer.errors import Reason

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

FLOW_HEADER = "X-Enforcer-Flow"
"""The response header naming the flow id of every response the enforcer makes itself."""

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

REASON_TITLES: dict[str, str] = {
    Reason.MALFORMED_REQUEST: "Bad request",
    Reason.HEADER_TOO_LARGE: "Headers too large",
    Reason.TARGET_TOO_LONG: "URI too long",
    Reason.TOO_MANY_HEADERS: "Headers too large",
    Reason.BAD_VERSION: "HTTP version not supported",
    Reason.TE_IN_HTTP10: "Bad request",
    Reason.UNSUPPORTED_TRANSFER_CODING: "Not implemented",
    Reason.UNDERSCORE_HEADER: "Bad request",
    Reason.METHOD_NOT_SUPPORTED: "Method not allowed",
    Reason.UPGRADE_NOT_SUPPORTED: "Bad request",
    Reason.ASTERISK_FORM: "Options",
    Reason.BODY_TOO_LARGE: "Request too large",
    Reason.HEADER_TIMEOUT: "Request timeout",
    Reason.BODY_TOO_SLOW: "Request timeout",
    Reason.READ_TOO_SLOW: "Request timeout",
    Reason.TOO_MANY_UPLOADS: "Too many requests",
    Reason.CONNECTION_RATE: "Too many connections",
    Reason.BAD_HOST: "Bad request",
    Reason.UNKNOWN_HOST: "Misdirected request",
    Reason.SNI_HOST_MISMATCH: "Misdirected request",
    Reason.DESTINATION_MISMATCH: "Misdirected request",
    Reason.UNKNOWN_SNI: "Misdirected request",
    Reason.TOO_LONG: "URI too long",
    Reason.BAD_TARGET: "Bad request",
    Reason.BAD_CHAR: "Bad request",
    Reason.FRAGMENT: "Bad request",
    Reason.SEMICOLON: "Bad request",
    Reason.ENCODED_SEPARATOR: "Bad request",
    Reason.ENCODED_CONTROL: "Bad request",
    Reason.ENCODED_DELIMITER: "Bad request",
    Reason.BAD_ENCODING: "Bad request",
    Reason.PUBLIC: "Allowed",
    Reason.ALLOWED: "Allowed",
    Reason.LOGIN_REQUIRED: "Sign-in required",
    Reason.NO_MATCHING_ENDPOINT: "Access denied",
    Reason.METHOD_NOT_ALLOWED: "Access denied",
    Reason.MISSING_TAGS: "Access denied",
    Reason.IDP_UNAVAILABLE: "Sign-in unavailable",
    Reason.SESSION_STORE_ERROR: "Sign-in unavailable",
    Reason.SESSION_STORE_UNAVAILABLE: "Sign-in unavailable",
    Reason.LOGIN_SUCCESS: "Signed in",
    Reason.LOGIN_FAILED: "Sign-in failed",
    Reason.CALLBACK_METHOD: "Sign-in failed",
    Reason.CALLBACK_PATH_NOT_EXACT: "Sign-in failed",
    Reason.CALLBACK_TOO_LARGE: "Sign-in failed",
    Reason.CALLBACK_MALFORMED: "Sign-in failed",
    Reason.CALLBACK_DUPLICATE_PARAMETER: "Sign-in failed",
    Reason.CALLBACK_NO_STATE: "Sign-in failed",
    Reason.CALLBACK_REPLAYED: "Sign-in failed",
    Reason.CALLBACK_UNKNOWN_STATE: "Sign-in failed",
    Reason.CALLBACK_NOT_BOUND: "Sign-in failed",
    Reason.CALLBACK_ISS_MISMATCH: "Sign-in failed",
    Reason.CALLBACK_ISS_MISSING: "Sign-in failed",
    Reason.CALLBACK_NO_CODE: "Sign-in failed",
    Reason.IDP_ERROR: "Sign-in failed",
    Reason.USERINFO_SUB_MISMATCH: "Sign-in failed",
    Reason.REFRESH_SUB_MISMATCH: "Session ended",
    Reason.REFRESH_NO_ID_TOKEN: "Session ended",
    Reason.REFRESH_TOKEN_UNREADABLE: "Session ended",
    Reason.CLAIMS_TOO_LARGE: "Sign-in failed",
    Reason.DISCOVERY_UNREACHABLE: "Sign-in failed",
    Reason.DISCOVERY_HTTP_ERROR: "Sign-in failed",
    Reason.DISCOVERY_TOO_LARGE: "Sign-in failed",
    Reason.DISCOVERY_INVALID_JSON: "Sign-in failed",
    Reason.DISCOVERY_ISSUER_MISMATCH: "Sign-in failed",
    Reason.DISCOVERY_BAD_ENDPOINT: "Sign-in failed",
    Reason.DISCOVERY_NO_CLIENT_AUTH: "Sign-in failed",
    Reason.DISCOVERY_NO_CODE_FLOW: "Sign-in failed",
    Reason.JWKS_UNREACHABLE: "Sign-in failed",
    Reason.JWKS_HTTP_ERROR: "Sign-in failed",
    Reason.JWKS_TOO_LARGE: "Sign-in failed",
    Reason.JWKS_INVALID_JSON: "Sign-in failed",
    Reason.JWKS_INVALID: "Sign-in failed",
    Reason.TOKEN_INVALID_REQUEST: "Sign-in failed",
    Reason.TOKEN_INVALID_CLIENT: "Sign-in failed",
    Reason.TOKEN_INVALID_GRANT: "Sign-in failed",
    Reason.TOKEN_UNAUTHORIZED_CLIENT: "Sign-in failed",
    Reason.TOKEN_UNSUPPORTED_GRANT_TYPE: "Sign-in failed",
    Reason.TOKEN_INVALID_SCOPE: "Sign-in failed",
    Reason.TOKEN_SERVER_ERROR: "Sign-in failed",
    Reason.TOKEN_TEMPORARILY_UNAVAILABLE: "Sign-in failed",
    Reason.TOKEN_UNKNOWN: "Sign-in failed",
    Reason.TOKEN_UNREACHABLE: "Sign-in failed",
    Reason.TOKEN_TOO_LARGE: "Sign-in failed",
    Reason.TOKEN_BAD_CONTENT_TYPE: "Sign-in failed",
    Reason.TOKEN_INVALID_JSON: "Sign-in failed",
    Reason.TOKEN_NO_ID_TOKEN: "Sign-in failed",
    Reason.TOKEN_NO_ACCESS_TOKEN: "Sign-in failed",
    Reason.TOKEN_NO_TOKEN_TYPE: "Sign-in failed",
    Reason.USERINFO_UNREACHABLE: "Sign-in failed",
    Reason.USERINFO_HTTP_ERROR: "Sign-in failed",
    Reason.USERINFO_TOO_LARGE: "Sign-in failed",
    Reason.USERINFO_INVALID_JSON: "Sign-in failed",
    Reason.ID_TOKEN_TOO_LARGE: "Sign-in failed",
    Reason.ID_TOKEN_MALFORMED: "Sign-in failed",
    Reason.ID_TOKEN_ENCRYPTED: "Sign-in failed",
    Reason.ID_TOKEN_BAD_ALG: "Sign-in failed",
    Reason.ID_TOKEN_BAD_HEADER: "Sign-in failed",
    Reason.ID_TOKEN_BAD_TYP: "Sign-in failed",
    Reason.ID_TOKEN_UNKNOWN_KEY: "Sign-in failed",
    Reason.ID_TOKEN_BAD_SIGNATURE: "Sign-in failed",
    Reason.ID_TOKEN_PAYLOAD_INVALID_JSON: "Sign-in failed",
    Reason.ID_TOKEN_BAD_ISS: "Sign-in failed",
    Reason.ID_TOKEN_BAD_AUD: "Sign-in failed",
    Reason.ID_TOKEN_NO_EXP: "Sign-in failed",
    Reason.ID_TOKEN_BAD_EXP: "Sign-in failed",
    Reason.ID_TOKEN_EXPIRED: "Sign-in failed",
    Reason.ID_TOKEN_NO_IAT: "Sign-in failed",
    Reason.ID_TOKEN_BAD_IAT: "Sign-in failed",
    Reason.ID_TOKEN_BAD_AZP: "Sign-in failed",
    Reason.ID_TOKEN_TOO_OLD: "Sign-in failed",
    Reason.ID_TOKEN_BAD_NBF: "Sign-in failed",
    Reason.ID_TOKEN_BAD_NONCE: "Sign-in failed",
    Reason.ID_TOKEN_BAD_SUB: "Sign-in failed",
    Reason.ID_TOKEN_BAD_AT_HASH: "Sign-in failed",
    Reason.LOGOUT_TOKEN_TOO_LARGE: "Logout refused",
    Reason.LOGOUT_TOKEN_MALFORMED: "Logout refused",
    Reason.LOGOUT_TOKEN_ENCRYPTED: "Logout refused",
    Reason.LOGOUT_TOKEN_BAD_ALG: "Logout refused",
    Reason.LOGOUT_TOKEN_BAD_HEADER: "Logout refused",
    Reason.LOGOUT_TOKEN_BAD_TYP: "Logout refused",
    Reason.LOGOUT_TOKEN_UNKNOWN_KEY: "Logout refused",
    Reason.LOGOUT_TOKEN_BAD_SIGNATURE: "Logout refused",
    Reason.LOGOUT_TOKEN_PAYLOAD_INVALID_JSON: "Logout refused",
    Reason.LOGOUT_TOKEN_BAD_ISS: "Logout refused",
    Reason.LOGOUT_TOKEN_BAD_AUD: "Logout refused",
    Reason.LOGOUT_TOKEN_NO_EXP: "Logout refused",
    Reason.LOGOUT_TOKEN_BAD_EXP: "Logout refused",
    Reason.LOGOUT_TOKEN_EXPIRED: "Logout refused",
    Reason.LOGOUT_TOKEN_NO_IAT: "Logout refused",
    Reason.LOGOUT_TOKEN_BAD_IAT: "Logout refused",
    Reason.LOGOUT_TOKEN_NO_JTI: "Logout refused",
    Reason.LOGOUT_TOKEN_BAD_EVENTS: "Logout refused",
    Reason.LOGOUT_TOKEN_HAS_NONCE: "Logout refused",
    Reason.LOGOUT_TOKEN_NO_SUBJECT: "Logout refused",
    Reason.LOGOUT_TOKEN_BAD_SUB: "Logout refused",
    Reason.LOGOUT_TOKEN_BAD_SID: "Logout refused",
    Reason.LOGOUT: "Signed out",
    Reason.LOGOUT_CONFIRM: "Sign out",
    Reason.BACKCHANNEL_LOGOUT: "Signed out",
    Reason.BACKCHANNEL_REPLAYED: "Signed out",
    Reason.BACKCHANNEL_METHOD: "Logout refused",
    Reason.BACKCHANNEL_CONTENT_TYPE: "Logout refused",
    Reason.BACKCHANNEL_TOO_LARGE: "Logout refused",
    Reason.BACKCHANNEL_MALFORMED: "Logout refused",
    Reason.BACKCHANNEL_NO_TOKEN: "Logout refused",
    Reason.BACKCHANNEL_RATE: "Too many requests",
    Reason.UPSTREAM_CONNECT: "Application unavailable",
    Reason.UPSTREAM_TIMEOUT: "Application timed out",
    Reason.UPSTREAM_PROTOCOL: "Application unavailable",
    Reason.UPSTREAM_RESET: "Application unavailable",
    Reason.UPSTREAM_BODY_TOO_LARGE: "Request too large",
    Reason.UPSTREAM_WEBSOCKET_REFUSED: "Application unavailable",
    Reason.CLIENT_ABORTED: "Request aborted",
    Reason.INTERNAL_ERROR: "Internal error",
    Reason.RELOAD_SUCCESS: "Definitions reloaded",
    Reason.RELOAD_LAST_KNOWN_GOOD: "Definitions reloaded",
    Reason.RELOAD_REJECTED: "Definitions reload failed",
    Reason.RELOAD_FAILED: "Definitions reload failed",
    Reason.CERTIFICATE_ERROR: "Certificate error",
    Reason.SOURCE_UNAVAILABLE: "Definitions source unavailable",
    Reason.REDIRECT_ERROR: "Redirect error",
    Reason.CONFIG_INVALID: "Invalid configuration",
    Reason.PORTS_BLOCKED: "Ports blocked",
    Reason.PORTS_UNBLOCKED: "Ports unblocked",
    Reason.UNFINISHED: "Internal error",
}
"""The heading of the page for each reason (by status alone, an IdP failure at the callback
would read "Application unavailable")."""

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
    reason: Reason | str,
    flow_id: str,
    *,
    message: str = "",
    would_allow: Iterable[Iterable[str]] = (),
    missing: Iterable[str] = (),
    retry_url: str | None = None,
    close: bool = False,
    rule: str | None = None,
    hidden_sets: int = 0,
    sign_out_url: str | None = None,
) -> web.Response:
    """An HTML error page naming the reason code (and, for denies, the rule and tag sets); the
    heading is the reason's title; ``hidden_sets`` tag sets were left out of ``would_allow``."""
    title = REASON_TITLES.get(reason) or TITLES.get(status, "Error")
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if message:
        parts.append(f"<p>{html.escape(message)}</p>")
    parts.append(f"<p>Reason: <code>{html.escape(reason)}</code></p>")
    if rule:
        parts.append(f"<p>Rule: <code>{html.escape(rule)}</code></p>")
    sets = [sorted(s) for s in would_allow]
    if sets:
        items = "".join("<li>" + " and ".join(f"<code>{html.escape(t)}</code>" for t in s) + "</li>" for s in sets)
        parts.append(f"<p>Any one of these tag sets would allow this request:</p><ul>{items}</ul>")
    if hidden_sets:
        parts.append(f"<p>{hidden_sets} more rule(s) allow particular people; ask the application's owner.</p>")
    miss = sorted(missing)
    if miss:
        parts.append("<p>You are missing: " + ", ".join(f"<code>{html.escape(t)}</code>" for t in miss) + "</p>")
    if retry_url:
        parts.append(f"<p><a href='{html.escape(retry_url, quote=True)}'>Sign in again</a></p>")
    if sign_out_url:
        parts.append(f"<p><a href='{html.escape(sign_out_url, quote=True)}'>Sign out / use another account</a></p>")
    parts.append(f"<p><small>Flow id {html.escape(flow_id)}</small></p>")
    resp = web.Response(
        status=status,
        text=_page(title, "".join(parts)),
        content_type="text/html",
        charset="utf-8",
        headers=SECURITY_HEADERS,
    )
    resp.headers[FLOW_HEADER] = flow_id
    if close:
        resp.headers["Connection"] = "close"
        resp.force_close()  # a ``Connection: close`` header alone leaves aiohttp's socket open
    return resp


def deny_page(
    reason: Reason | str,
    flow_id: str,
    *,
    rule: str | None,
    would_allow: Iterable[Iterable[str]],
    missing: Iterable[str],
    show: str = "groups",
    group_claims: Collection[str] = ("groups", "roles"),
    sign_out_url: str | None = None,
) -> web.Response:
    """The 403 for a signed-in user the policy denies; ``show`` (``denyPage.show``) says how
    much of the policy it tells: ``all`` every tag set, ``none`` none and no rule, ``groups``
    the rule and only the tag sets whose every tag is a ``group_claims`` claim (so another
    person's ``email=`` or ``sub=`` never appears); ``missing`` only when it is shown."""
    message = "You are signed in, but this request is not allowed for you."
    if show == "all":
        return error_page(403, reason, flow_id, message=message, rule=rule, would_allow=would_allow,
                          missing=missing, sign_out_url=sign_out_url)
    if show == "none":
        return error_page(403, reason, flow_id, message=message, sign_out_url=sign_out_url)
    sets = [frozenset(s) for s in would_allow]
    shown = [s for s in sets if all(t.partition("=")[0] in group_claims for t in s)]
    miss = frozenset(missing)
    return error_page(
        403, reason, flow_id, message=message, rule=rule, would_allow=shown, hidden_sets=len(sets) - len(shown),
        missing=miss if any(miss <= s for s in shown) else (), sign_out_url=sign_out_url,
    )


def json_error(status: int, reason: Reason | str, flow_id: str, *, login_url: str | None = None) -> web.Response:
    """A JSON error for API clients (no redirects for them)."""
    body: dict[str, str] = {"error": reason, "flow_id": flow_id}
    headers = dict(SECURITY_HEADERS)
    headers[FLOW_HEADER] = flow_id
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="enforcer", error="login_required"'
        if login_url:
            body["login"] = login_url
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


def plain_close(status: int, text: str, flow_id: str | None = None) -> web.Response:
    """A minimal response that closes the connection (framing problems, bad hosts); with
    ``flow_id``, the line ends with it and it is sent as :data:`FLOW_HEADER`."""
    if flow_id is not None:
        text = f"{text} (flow id {flow_id})"
    resp = web.Response(status=status, text=text + "\n", content_type="text/plain", headers=SECURITY_HEADERS)
    if flow_id is not None:
        resp.headers[FLOW_HEADER] = flow_id
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
