"""The flow record: one per request, begun on arrival, filled in along the way, finished once.

``FlowRecord`` is begun when a request arrives, filled in along the way (``record``) and
finished once (``finish``); ``to_json`` renders it as one line that no field content can break
(``ensure_ascii`` escapes CR, LF, ANSI escapes, quotes and every non-ASCII character).

The record carries no secrets by construction: no query string (``path`` is the canonical
path), no cookies, no tokens, no codes; ``user`` is the ``sub`` claim.  A deny also keeps what
``enforcer explain --flow`` needs to replay it (:meth:`FlowRecord.note_deny`): the tag sets that
would have allowed it, the tags missing, and a fingerprint of the user's tags
(:func:`tags_fingerprint`), never the tags themselves.  These fields are written only when set,
so every other record's line is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from enforcer.errors import Outcome, Reason

USER_AGENT_MAX = 256
"""User-Agent is attacker-controlled; 256 characters identify any real client."""

SERVED_DECISIONS = frozenset({Outcome.ALLOW, Outcome.LOGOUT, Outcome.CALLBACK})
"""Decisions under which the enforcer served the request (proxied it, or completed its own
logout / login callback). Every other decision — ``deny``, ``error``, ``bad_request`` and any
decision added later — counts as *not served* for ``--denied``; ``login`` (a challenge to sign
in) is not served either, but ``enforcer flows`` counts it on its own, not as a denial."""


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

_OUTCOMES: dict[str, Outcome] = {o.value: o for o in Outcome}
_REASONS: dict[str, Reason] = {r.value: r for r in Reason}

TAGS_FINGERPRINT_CHARS = 12
"""Hex characters of :func:`tags_fingerprint`: 48 bits tell two tag sets apart, too few to
look up a person's tags in a table of guesses of every size."""


def tags_fingerprint(tags: Iterable[str] | None) -> str | None:
    """A short hash of a tag set (order does not matter), or None for no session: lets an
    operator check ``enforcer explain --flow ID --tags ...`` against the denied user's tags
    without the record holding them."""
    if tags is None:
        return None
    text = "\n".join(sorted(tags)).encode("utf-8", "surrogatepass")
    return hashlib.sha256(b"enforcer-tags\n" + text).hexdigest()[:TAGS_FINGERPRINT_CHARS]


def _tag_sets(sets: Iterable[Iterable[str]]) -> list[list[str]]:
    return [sorted(s) for s in sets]


class FlowIds:
    """Fresh flow ids: 16 random hex characters each (8 bytes from ``os.urandom``, like
    ``secrets.token_hex(8)``), drawn from the OS 512 at a time: one ``getrandom`` system call
    for 512 requests, not one per request. Each serving process makes its own after it is
    forked, so no two processes hand out ids from the same stock."""

    __slots__ = ("_stock",)

    def __init__(self) -> None:
        self._stock: list[str] = []

    def __call__(self) -> str:
        try:
            return self._stock.pop()
        except IndexError:
            text = os.urandom(8 * 512).hex()
            self._stock.extend([text[i : i + 16] for i in range(0, len(text), 16)])
            return self._stock.pop()


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
    decision: Outcome = Outcome.ERROR
    """What the enforcer did with the request."""
    reason: Reason = Reason.UNFINISHED
    """Why: the same code as the metric label and the error page's code."""
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
    would_allow: list[list[str]] | None = None
    """On a deny: the tag sets (each sorted) any one of which would have allowed the request."""
    missing: list[str] | None = None
    """On a deny: the fewest tags (sorted) the user lacked for one of ``would_allow``."""
    tags_fp: str | None = None
    """On a deny: :func:`tags_fingerprint` of the user's tags."""

    @classmethod
    def begin(
        cls,
        *,
        flow_id: str,
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
        """Start the record for a request that just arrived (``path`` is the canonical path;
        ``flow_id`` from the process's :class:`FlowIds`, ``now`` from its clock)."""
        return cls(
            flow_id=flow_id,
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
        decision: Outcome | str,
        reason: Reason | str,
        endpoint: str | None = None,
        user: str | None = None,
        email: str | None = None,
    ) -> None:
        """Note the policy (or login/logout) decision and who asked.

        A ``str`` must be the value of a member (``ValueError`` otherwise): callers in
        ``http`` and ``run`` still pass literals until they are converted to members.
        """
        try:  # a dict lookup: a tenth of the cost of calling the enum
            self.decision, self.reason = _OUTCOMES[decision], _REASONS[reason]
        except KeyError:
            raise ValueError(f"not a flow code: decision {decision!r}, reason {reason!r}") from None
        self.endpoint = endpoint
        if user is not None:
            self.user = user
        if email is not None:
            self.email = email

    def note_deny(
        self, *, would_allow: Iterable[Iterable[str]], missing: Iterable[str], tags: Iterable[str] | None
    ) -> None:
        """Keep what replays a deny: the allowing tag sets, the missing tags and a fingerprint
        of the user's tags (``None``: no session)."""
        self.would_allow = _tag_sets(would_allow)
        self.missing = sorted(missing)
        self.tags_fp = tags_fingerprint(tags)

    def finish(self, *, now: float, status: int | None = None) -> FlowRecord:
        """Stamp the duration (and the client status if given); returns ``self`` for chaining."""
        if status is not None:
            self.status = status
        self.duration_ms = round(max(0.0, (now - self.start) * 1000.0), 3)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Fields in the fixed log order, ``time`` first; the deny fields last, only when set."""
        data = {
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
        if self.would_allow is not None:
            data["would_allow"] = self.would_allow
        if self.missing is not None:
            data["missing"] = self.missing
        if self.tags_fp is not None:
            data["tags_fp"] = self.tags_fp
        return data

    def to_json(self) -> str:
        """One log line (without the newline); ASCII-only so no value can split or color it.

        The text of ``_encode_line(self.to_dict())``, written out field by field (keys are
        constants, strings go through the same C escaper), because this runs once per
        request.  Any field of an unexpected type (an int ``start``, a NaN, a bool status...)
        takes the generic path.
        """
        start, dur, up_ms = self.start, self.duration_ms, self.upstream_ms
        b_in, b_out, up_st, st = self.bytes_in, self.bytes_out, self.upstream_status, self.status
        if not (
            type(start) is float and -_INF < start < _INF
            and type(dur) is float and -_INF < dur < _INF
            and (up_ms is None or (type(up_ms) is float and -_INF < up_ms < _INF))
            and type(b_in) is int and type(b_out) is int
            and (up_st is None or type(up_st) is int) and (st is None or type(st) is int)
            and self.would_allow is None and self.missing is None and self.tags_fp is None
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
        """Rebuild a record from ``to_dict`` output (``time`` is derived, so it is ignored);
        ``decision`` and ``reason`` must be codes of this version (``ValueError`` otherwise)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if "decision" in values:
            values["decision"] = Outcome(values["decision"])
        if "reason" in values:
            values["reason"] = Reason(values["reason"])
        return cls(**values)


