"""Our cookies, parsed and written strictly: the one definition of which cookies are the enforcer's.

Strict parsing of the ``Cookie`` request header (:func:`find_cookie`), removal of our cookies
before proxying (:func:`strip_cookies`) and the ``Set-Cookie`` values we emit
(:func:`set_cookie_header`, :func:`clear_cookie_header`). The session cookie carries only an
opaque handle: ``secrets.token_urlsafe(32)``, 256 bits from the CSPRNG.
"""

from __future__ import annotations

import enum
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import Final

# --------------------------------------------------------------------------------------------
# Cookies
# --------------------------------------------------------------------------------------------

COOKIE_PREFIX: Final = "__Host-"
"""Browsers accept a ``__Host-`` cookie only if Secure, Path=/ and without Domain (RFC 6265bis
§4.1.3.2), so a sibling host cannot toss a cookie with this name at us (S-CK-03)."""

ENFORCER_COOKIE_PREFIX: Final = COOKIE_PREFIX + "enforcer-"
"""Every cookie the enforcer sets starts with this; none of them is ever forwarded upstream."""

HANDLE_BYTES: Final = 32
"""Entropy of a session handle: 256 bits (S-ID-01 asks for at least 128)."""

HANDLE_LENGTH: Final = 43
"""``len(secrets.token_urlsafe(32))``: base64url without padding."""

_HANDLE_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}")
"""Exact shape of a handle; checked before hashing so junk is rejected cheaply (S-ID-03)."""

_CTL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")
"""Control characters: a pair containing one is malformed, wherever it appears."""

_OWS: Final = " \t"
"""Optional whitespace around a cookie pair (RFC 6265bis §5.6); nothing else is trimmed."""

_SPACE_RE: Final = re.compile(r"\s")
"""Any character ``str.isspace`` accepts (``\\s`` on str patterns is Py_UNICODE_ISSPACE)."""

_COOKIE_VALUE_RE: Final = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
"""RFC 6265 ``cookie-octet``: what we are willing to put in a value we emit."""

_COOKIE_NAME_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""RFC 9110 ``token``: what we are willing to use as a cookie name we emit."""


def session_cookie_name(service: str) -> str:
    """Name of the session cookie for ``service``: ``__Host-enforcer-<service>``."""
    return f"{ENFORCER_COOKIE_PREFIX}{service}"


def is_enforcer_cookie(name: str) -> bool:
    """True for any case variant of our cookie prefix (what :func:`strip_cookies` drops)."""
    return name[: len(ENFORCER_COOKIE_PREFIX)].lower() == ENFORCER_COOKIE_PREFIX.lower()


def new_handle() -> str:
    """A fresh session handle: 256 bits from the CSPRNG, 43 URL-safe characters."""
    return secrets.token_urlsafe(HANDLE_BYTES)


class CookieLookup(enum.Enum):
    """Outcome of looking up one cookie name in the ``Cookie`` request header(s)."""

    ABSENT = "absent"
    """No well-formed pair with that name, or the header was over our limits."""
    FOUND = "found"
    """Exactly one value."""
    AMBIGUOUS = "ambiguous"
    """Two or more values: the caller treats the request as unauthenticated (S-CK-04)."""


def _pieces(cookie_headers: Iterable[str]) -> Iterable[str]:
    """Non-empty ``;``-separated pieces of every header line, OWS-trimmed, in order."""
    for header in cookie_headers:
        for raw in header.split(";"):
            piece = raw.strip(_OWS)
            if piece:
                yield piece


def _split_pair(piece: str) -> tuple[str, str] | None:
    """``name=value`` from one piece, or None if malformed (no ``=``, empty name, CTL, spaces).

    Malformed pieces are never interpreted: a lenient parser elsewhere must not be able to
    read a name out of something we considered nameless.
    """
    name, eq, value = piece.partition("=")
    name = name.rstrip(_OWS)
    if not eq or not name or _CTL_RE.search(piece) or _SPACE_RE.search(name):
        return None
    return name, value.lstrip(_OWS)


def find_cookie(
    cookie_headers: Sequence[str],
    name: str,
    *,
    max_total: int = 8192,
    max_count: int = 100,
) -> tuple[CookieLookup, str | None]:
    """Find the single value of cookie ``name`` (exact, case-sensitive) across all lines.

    Over ``max_total`` bytes or ``max_count`` pairs the cookies are ignored (ABSENT), so a
    huge header costs nothing more than measuring it. Malformed pairs are skipped. Never raises.
    """
    total = 0
    for header in cookie_headers:
        total += len(header.encode("utf-8", "surrogatepass"))
        if total > max_total:
            return CookieLookup.ABSENT, None
    found: str | None = None
    count = 0
    for piece in _pieces(cookie_headers):
        count += 1
        if count > max_count:
            return CookieLookup.ABSENT, None
        pair = _split_pair(piece)
        if pair is None or pair[0] != name:
            continue
        if found is not None:
            return CookieLookup.AMBIGUOUS, None
        found = pair[1]
    if found is None:
        return CookieLookup.ABSENT, None
    return CookieLookup.FOUND, found


def strip_cookies(cookie_headers: Sequence[str], drop: Callable[[str], bool]) -> str | None:
    """One ``Cookie`` header value without the pairs whose name satisfies ``drop``.

    Kept pairs are copied byte-exact (minus surrounding OWS) and joined with ``"; "``.
    Malformed pieces are dropped too: the app never sees something we did not parse.
    Returns None when nothing is left (the caller then sends no ``Cookie`` header).
    """
    kept = [
        piece
        for piece in _pieces(cookie_headers)
        if (pair := _split_pair(piece)) is not None and not drop(pair[0])
    ]
    return "; ".join(kept) if kept else None


def _cookie_attributes(name: str, value: str) -> str:
    if not name.startswith(COOKIE_PREFIX) or not _COOKIE_NAME_RE.fullmatch(name):
        raise ValueError(f"cookie name must be a token starting with {COOKIE_PREFIX!r}: {name!r}")
    if not _COOKIE_VALUE_RE.fullmatch(value):
        raise ValueError("cookie value contains characters outside RFC 6265 cookie-octet")
    # __Host- requires Secure + Path=/ and forbids Domain; HttpOnly keeps the handle away
    # from scripts; Lax still sends it on the top-level navigation back from the IdP.
    return f"{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax"


def set_cookie_header(name: str, value: str, *, max_age: int | None) -> str:
    """``Set-Cookie`` value for one of our ``__Host-`` cookies (S-CK-01); never a Domain.

    ``max_age=None`` makes a browser-session cookie; otherwise pass at most the remaining
    absolute lifetime of the session.
    """
    header = _cookie_attributes(name, value)
    if max_age is not None:
        if max_age < 0:
            raise ValueError(f"max_age must be >= 0, got {max_age}")
        header += f"; Max-Age={max_age}"
    return header


def clear_cookie_header(name: str) -> str:
    """``Set-Cookie`` value that deletes one of our cookies (same attributes, Max-Age=0)."""
    return _cookie_attributes(name, "") + "; Max-Age=0"

