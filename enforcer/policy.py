"""Decide allow / deny / login for one request from its canonical path, method and tags.

This module is pure, synchronous and total: no I/O, no clock, no logging, and no exception
escapes it except :class:`PathError` from :func:`canonical_path` (a request the enforcer must
refuse with 400/414) and ``ValueError`` from :meth:`Endpoint.parse` / :class:`EndpointTable`
for a pattern that :func:`validate_pattern` rejects (the config loader validates first, so
that is a programming error, never a request-time event).

Canonical path (:func:`canonical_path`)
---------------------------------------
The enforcer matches, logs and forwards ONE value computed once per request (advisories.md
§0 item 1: normalise once, reject ambiguous encodings outright). From a raw origin-form
request-target:

1. More than :data:`MAX_TARGET_BYTES` bytes -> ``too_long`` (414).
2. Empty, or not starting with ``/`` -> ``bad_target``. Absolute-form (``https://h/p``),
   authority-form (``h:443``) and asterisk-form (``*``) are the handler's business: it checks
   the authority and passes only the path part here.
3. A raw ``#`` anywhere -> ``fragment`` (clients never send fragments; a proxy that cut at
   ``#`` would match a different path than the app serves).
4. In the path, any raw byte outside printable ASCII (controls, space, DEL, non-ASCII) or a raw
   backslash -> ``bad_char``; a raw ``;`` -> ``semicolon``. Matrix parameters are resolved
   differently by different upstreams (Tomcat drops ``;...`` per segment, so
   ``/public/..;/admin`` means ``/admin`` there), so no ``;`` can reach the matcher.
5. The query is everything after the first ``?``. It is returned raw (without the ``?``), is
   checked only for ``bad_char`` (no controls, whitespace or non-ASCII) and is never used for
   matching, so it can never widen a rule.
6. Percent-escapes in the path: malformed ones (``%G1``, ``%4``) -> ``bad_encoding``.
   Unreserved characters (ALPHA DIGIT ``- . _ ~``) are decoded (``%2e`` -> ``.``, ``%41`` ->
   ``A``). Escapes whose decoding would change the structure of the path are rejected:
   ``%2F %5C`` -> ``encoded_separator``; ``%00``-``%1F``, ``%7F`` -> ``encoded_control``;
   ``%23 %25 %3F`` -> ``encoded_delimiter`` (this also stops double encoding such as
   ``%252e``); ``%3B`` -> ``semicolon``. A run of escapes >= ``%80`` must be valid UTF-8
   (no overlong forms such as ``%C0%AE``, no surrogates) else ``bad_encoding``; valid ones stay
   encoded. Every escape that stays is written with upper-case hex. No Unicode normalisation
   is done (``%EF%BC%8F``, fullwidth solidus, stays a literal character).
7. Empty segments are merged (``//a`` -> ``/a``), then ``.`` and ``..`` are removed as in
   RFC 3986 §5.2.4; ``..`` above the root stays at ``/``. A trailing slash is kept, and a final
   ``.`` or ``..`` segment leaves one (``/admin/.`` -> ``/admin/``).
8. Case is preserved: matching is case-sensitive, as in most upstreams (``/ADMIN`` is not
   ``/admin``; use ``/*`` as a catch-all so no spelling is left unprotected).

The result is idempotent: ``canonical_path(p)[0] == p`` for every output ``p``.

:class:`PathError` codes (members of :class:`enforcer.errors.Reason`): ``too_long`` (414),
``bad_target``, ``bad_char``, ``fragment``, ``semicolon``, ``encoded_separator``,
``encoded_control``, ``encoded_delimiter``, ``bad_encoding`` (all 400).

Endpoint patterns
-----------------
A pattern is itself a canonical path (:func:`validate_pattern`) in which ``*`` may only be a
whole segment:

- ``/x`` matches exactly ``/x`` (not ``/x/``: trailing slashes are significant).
- ``/x/*`` matches ``/x``, ``/x/`` and everything below ``/x/``, so ``/admin`` cannot slip
  past an ``/admin/*`` rule into a broader ``/*`` one. ``/*`` matches every path.
- ``*`` as a middle segment matches exactly one non-empty segment (``/api/*/status``).

Methods are part of the match: an endpoint matches a request only if its ``methods`` contain
the request method, or ``*``, or ``GET`` when the method is ``HEAD``. The request method is
compared upper-cased, so ``get`` cannot dodge a ``GET`` rule on an upstream that upper-cases.

Specificity: among the endpoints that match path and method the most specific wins:
(1) a pattern without ``*`` beats any wildcard pattern; (2) then more literal (non-``*``)
segments; (3) then the longer literal prefix (characters before the first ``*``); (4) then
declaration order, first wins. The order is computed once when the table is built.

Decision (:func:`decide`)
-------------------------
- No endpoint matches the path: anonymous -> LOGIN/login_required (the policy is not revealed
  to anonymous users); signed in -> DENY/no_matching_endpoint.
- Endpoints match the path but none the method: anonymous -> LOGIN/login_required; signed
  in -> DENY/method_not_allowed.
- The best endpoint is public -> ALLOW/public, signed in or not.
- Not public, anonymous -> LOGIN/login_required.
- Signed in: ALLOW/allowed iff some inner set of ``allowed_scopes`` is a subset of the tags
  (OR of ANDs). Otherwise DENY/missing_tags with ``would_allow`` = the endpoint's
  ``allowed_scopes`` and ``missing`` = the smallest set of tags still lacking for one of them
  (the first declared on a tie). An empty ``allowed_scopes`` on a non-public endpoint allows
  nobody (``would_allow=()``, ``missing`` empty).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from enforcer.errors import EnforcerError, Reason

__all__ = [
    "MAX_TARGET_BYTES",
    "Decision",
    "Endpoint",
    "EndpointTable",
    "PathError",
    "Reason",
    "Verdict",
    "canonical_path",
    "decide",
    "explain",
    "validate_pattern",
]

MAX_TARGET_BYTES = 8192
"""Longest request-target accepted (bytes); longer ones get 414. Same order as the common
8 KiB request-line limit of nginx/h11, far above any real app URL."""

class PathError(EnforcerError, ValueError):
    """The request-target is refused; ``reason`` (also ``code``) is stable (logs, metrics,
    error page)."""

    def __init__(self, code: Reason, message: str, status: int = 400) -> None:
        super().__init__(code, status, message)

    @property
    def code(self) -> Reason:
        """The reason (the name ``http.gate`` and ``cli`` still use)."""
        return self.reason


# --- canonical_path ---------------------------------------------------------------------

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEXVAL = {c: int(c, 16) for c in "0123456789abcdefABCDEF"}
# Raw characters refused in the path / in the query ('#' is checked before both).
_BAD_PATH_CHAR = re.compile(r"[^!-~]|[\\;]")
_BAD_QUERY_CHAR = re.compile(r"[^!-~]")


def _byte_len(target: str) -> int:
    if target.isascii():
        return len(target)
    return len(target.encode("utf-8", "surrogatepass"))


def canonical_path(target: str) -> tuple[str, str]:
    """Raw origin-form request-target (``/a/./b//c?x=1``) -> (canonical path, raw query)."""
    if _byte_len(target) > MAX_TARGET_BYTES:
        raise PathError(
            Reason.TOO_LONG, f"request-target longer than {MAX_TARGET_BYTES} bytes", status=414
        )
    if not target.startswith("/"):
        raise PathError(Reason.BAD_TARGET, "request-target must be a path starting with '/'")
    if "#" in target:
        raise PathError(Reason.FRAGMENT, "raw '#' (fragment) in request-target")
    path, sep, query = target.partition("?")
    if sep:
        bad = _BAD_QUERY_CHAR.search(query)
        if bad is not None:
            raise PathError(Reason.BAD_CHAR, f"character {bad.group()!r} not allowed in query")
    bad = _BAD_PATH_CHAR.search(path)
    if bad is not None:
        if bad.group() == ";":
            raise PathError(Reason.SEMICOLON, "';' (matrix parameter) not allowed in path")
        raise PathError(Reason.BAD_CHAR, f"character {bad.group()!r} not allowed in path")
    if "%" not in path and "//" not in path and "/." not in path:
        return path, query  # fast path: nothing to decode, no empty or dot segments
    if "%" in path:
        path = _decode(path)
    return _remove_dot_segments(path), query


def _decode(path: str) -> str:
    """Decode unreserved escapes, upper-case kept ones, reject ambiguous ones."""
    out: list[str] = []
    n = len(path)
    i = 0
    while i < n:
        j = path.find("%", i)
        if j < 0:
            out.append(path[i:])
            break
        out.append(path[i:j])
        high = bytearray()  # pending run of escapes >= 0x80 (one or more UTF-8 sequences)
        while j < n and path[j] == "%":
            hi = _HEXVAL.get(path[j + 1 : j + 2], -1)
            lo = _HEXVAL.get(path[j + 2 : j + 3], -1)
            if hi < 0 or lo < 0:
                raise PathError(Reason.BAD_ENCODING, f"malformed percent-escape {path[j : j + 3]!r}")
            b = hi * 16 + lo
            j += 3
            if b >= 0x80:
                high.append(b)
                continue
            if high:
                out.append(_utf8_escapes(high))
                high = bytearray()
            _decode_ascii(b, out)
        if high:
            out.append(_utf8_escapes(high))
        i = j
    return "".join(out)


def _decode_ascii(b: int, out: list[str]) -> None:
    c = chr(b)
    if c in _UNRESERVED:
        out.append(c)
    elif c in "/\\":
        raise PathError(Reason.ENCODED_SEPARATOR, f"encoded separator %{b:02X} in path")
    elif b < 0x20 or b == 0x7F:
        raise PathError(Reason.ENCODED_CONTROL, f"encoded control character %{b:02X} in path")
    elif c in "#%?":
        raise PathError(Reason.ENCODED_DELIMITER, f"encoded delimiter %{b:02X} in path")
    elif c == ";":
        raise PathError(Reason.SEMICOLON, "encoded ';' (%3B) not allowed in path")
    else:
        out.append(f"%{b:02X}")


def _utf8_escapes(run: bytearray) -> str:
    try:
        bytes(run).decode("utf-8")
    except UnicodeDecodeError:
        raise PathError(Reason.BAD_ENCODING, "percent-escapes are not valid UTF-8") from None
    return "".join(f"%{b:02X}" for b in run)


def _remove_dot_segments(path: str) -> str:
    """Merge empty segments, then RFC 3986 §5.2.4 on an absolute path (clamped at root)."""
    segments = path.split("/")
    out: list[str] = []
    for seg in segments:
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
        else:
            out.append(seg)
    if not out:
        return "/"
    trailing = "/" if segments[-1] in ("", ".", "..") else ""
    return "/" + "/".join(out) + trailing


# --- endpoints and patterns --------------------------------------------------------------


class Verdict(enum.Enum):
    """What the handler does with the request."""

    ALLOW = "allow"
    DENY = "deny"
    LOGIN = "login"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of an httpresourcespec, as configured."""

    uri: str
    """Pattern (see the module docstring); must pass :func:`validate_pattern`."""
    methods: frozenset[str]
    """Upper-case method names; ``*`` means any method. ``GET`` also covers ``HEAD``."""
    public: bool = False
    """No login needed."""
    allowed_scopes: tuple[frozenset[str], ...] = ()
    """OR over the sets, AND within one set; empty on a non-public endpoint allows nobody."""
    rule: str = ""
    """Human label for logs and ``explain``, e.g. ``private-app#2``."""

    @classmethod
    def parse(
        cls,
        uri: str,
        methods: Iterable[str],
        *,
        public: bool = False,
        allowed_scopes: Iterable[Iterable[str]] = (),
        rule: str = "",
    ) -> Endpoint:
        """Build a normalised endpoint (methods upper-cased); ValueError names the fix."""
        problem = validate_pattern(uri)
        if problem is not None:
            raise ValueError(problem)
        meths = frozenset(m.strip().upper() for m in methods)
        if not meths or "" in meths:
            raise ValueError(f"endpoint {uri!r}: methods must be non-empty names, or ['*']")
        if "*" in meths and len(meths) > 1:
            raise ValueError(f"endpoint {uri!r}: '*' already means any method; use just ['*']")
        return cls(
            uri=uri,
            methods=meths,
            public=public,
            allowed_scopes=tuple(frozenset(scope) for scope in allowed_scopes),
            rule=rule,
        )


def validate_pattern(uri: object) -> str | None:
    """None if ``uri`` is a usable pattern, else a one-line explanation with a fix (``uri``
    comes from an operator's YAML: any type)."""
    if not isinstance(uri, str) or not uri:
        return "endpoint URI must be a non-empty path such as '/api/*'"
    if not uri.startswith("/"):
        return f"endpoint URI {uri!r} must start with '/': use {'/' + uri.lstrip('^/')!r}"
    if "?" in uri:
        return (
            f"endpoint URI {uri!r} contains '?': patterns match the path only, never the "
            f"query; use {uri.partition('?')[0] or '/'!r}"
        )
    try:
        canon, _ = canonical_path(uri)
    except PathError as exc:
        return (
            f"endpoint URI {uri!r} can never match a request: {exc} ({exc.code}); "
            "such requests are refused before policy"
        )
    segments = uri.split("/")[1:]
    for seg in segments:
        if "*" in seg and seg != "*":
            fixed = "/" + "/".join("*" if "*" in s else s for s in segments)
            return (
                f"endpoint URI {uri!r}: '*' must be a whole segment (no globs or regexes); "
                f"use {fixed!r}"
            )
    if canon != uri:
        return (
            f"endpoint URI {uri!r} is not canonical (requests are matched on canonical "
            f"paths); write {canon!r}"
        )
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :func:`decide`."""

    verdict: Verdict
    reason: Reason
    endpoint: Endpoint | None
    """The endpoint that decided (None when no endpoint matched path and method)."""
    would_allow: tuple[frozenset[str], ...] = ()
    """On a tag deny: the tag sets that would have allowed the request."""
    missing: frozenset[str] = field(default_factory=frozenset)
    """On a tag deny: the smallest set of tags the user lacks to satisfy one alternative."""


_NO_TAGS: frozenset[str] = frozenset()
_LOGIN = Decision(Verdict.LOGIN, Reason.LOGIN_REQUIRED, None)
_NO_ENDPOINT = Decision(Verdict.DENY, Reason.NO_MATCHING_ENDPOINT, None)
_NO_METHOD = Decision(Verdict.DENY, Reason.METHOD_NOT_ALLOWED, None)


class _Compiled:
    """An endpoint plus everything the hot path needs, precomputed."""

    __slots__ = ("allow", "any_method", "endpoint", "login", "methods", "no_scope", "rank")

    def __init__(self, endpoint: Endpoint) -> None:
        methods = frozenset(m.upper() for m in endpoint.methods)
        self.endpoint = endpoint
        self.any_method = "*" in methods
        self.methods = methods | {"HEAD"} if "GET" in methods else methods
        self.rank = 0  # position in specificity order, 0 = most specific; set by the table
        self.allow = Decision(
            Verdict.ALLOW, Reason.PUBLIC if endpoint.public else Reason.ALLOWED, endpoint
        )
        self.login = Decision(Verdict.LOGIN, Reason.LOGIN_REQUIRED, endpoint)
        self.no_scope = Decision(Verdict.DENY, Reason.MISSING_TAGS, endpoint)


class _Node:
    """Trie node over path segments for wildcard patterns."""

    __slots__ = ("children", "prefix", "star", "terminal")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.star: _Node | None = None
        self.prefix: list[_Compiled] = []  # patterns '<segments so far>/*'
        self.terminal: list[_Compiled] = []  # fixed-length patterns with a middle '*'


def _specificity(index: int, uri: str) -> tuple[int, int, int, int]:
    segments = uri.split("/")[1:]
    wildcard = "*" in segments
    literal = sum(1 for s in segments if s != "*")
    prefix = len(uri.partition("*")[0])
    return (1 if wildcard else 0, -literal, -prefix, index)


class EndpointTable:
    """Endpoints compiled once per definitions set for fast matching; immutable."""

    __slots__ = ("_endpoints", "_exact", "_root", "_wild")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        """Compile; ValueError for a pattern :func:`validate_pattern` rejects."""
        self._endpoints = tuple(endpoints)
        compiled = [_Compiled(e) for e in self._endpoints]
        for problem in (validate_pattern(e.uri) for e in self._endpoints):
            if problem is not None:
                raise ValueError(problem)
        order = sorted(
            range(len(compiled)), key=lambda i: _specificity(i, compiled[i].endpoint.uri)
        )
        for rank, i in enumerate(order):
            compiled[i].rank = rank
        self._exact: dict[str, list[_Compiled]] = {}
        self._root = _Node()
        self._wild = False
        for c in compiled:  # declaration order, so equal-rank lists stay in it
            uri = c.endpoint.uri
            segments = uri.split("/")[1:]
            if "*" not in segments:
                self._exact.setdefault(uri, []).append(c)
                continue
            self._wild = True
            prefix = segments[-1] == "*"
            node = self._root
            for seg in segments[:-1] if prefix else segments:
                if seg == "*":
                    if node.star is None:
                        node.star = _Node()
                    node = node.star
                else:
                    node = node.children.setdefault(seg, _Node())
            (node.prefix if prefix else node.terminal).append(c)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints in declaration order."""
        return self._endpoints

    def match(self, method: str, path: str) -> tuple[Endpoint | None, bool]:
        """(most specific endpoint matching path and method, whether any matched the path)."""
        best, path_matched = self._match(method, path)
        return (None if best is None else best.endpoint), path_matched

    def _match(self, method: str, path: str) -> tuple[_Compiled | None, bool]:
        if not path.startswith("/"):
            return None, False
        if not method.isupper():
            method = method.upper()
        path_matched = False
        exact = self._exact.get(path)
        if exact is not None:
            path_matched = True
            for c in exact:
                if c.any_method or method in c.methods:
                    return c, True  # a pattern without '*' beats every wildcard pattern
        if not self._wild:
            return None, path_matched
        best: _Compiled | None = None
        segments = path.split("/")
        n = len(segments)
        stack = [(self._root, 1)]
        while stack:
            node, i = stack.pop()
            for c in node.prefix:
                path_matched = True
                if (best is None or c.rank < best.rank) and (c.any_method or method in c.methods):
                    best = c
            if i == n:
                for c in node.terminal:
                    path_matched = True
                    if (best is None or c.rank < best.rank) and (
                        c.any_method or method in c.methods
                    ):
                        best = c
            else:
                seg = segments[i]
                child = node.children.get(seg)
                if child is not None:
                    stack.append((child, i + 1))
                if node.star is not None and seg:
                    stack.append((node.star, i + 1))
        return best, path_matched


def decide(method: str, path: str, tags: frozenset[str] | None, table: EndpointTable) -> Decision:
    """Decide one request; ``tags=None`` is anonymous; ``path`` comes from canonical_path."""
    best, path_matched = table._match(method, path)
    if best is None:
        if tags is None:
            return _LOGIN
        return _NO_METHOD if path_matched else _NO_ENDPOINT
    endpoint = best.endpoint
    if endpoint.public:
        return best.allow
    if tags is None:
        return best.login
    scopes = endpoint.allowed_scopes
    for scope in scopes:
        if scope <= tags:
            return best.allow
    if not scopes:
        return best.no_scope
    missing = min((scope - tags for scope in scopes), key=len)
    return Decision(Verdict.DENY, Reason.MISSING_TAGS, endpoint, scopes, missing)


def _tags_text(tags: Iterable[str]) -> str:
    return ", ".join(sorted(tags)) or "(none)"


def explain(decision: Decision, method: str, path: str, tags: frozenset[str] | None) -> str:
    """Multi-line human explanation of a decision, for ``enforcer explain``."""
    who = "anonymous (no session)" if tags is None else f"signed in, tags: {_tags_text(tags)}"
    lines = [
        f"request:  {method} {path}",
        f"identity: {who}",
        f"verdict:  {decision.verdict.name} ({decision.reason.value})",
    ]
    ep = decision.endpoint
    if ep is None:
        lines.append("endpoint: none matches this path and method")
    else:
        label = f" [{ep.rule}]" if ep.rule else ""
        methods = ", ".join(sorted(ep.methods)) or "(none)"
        lines.append(f"endpoint: {ep.uri} methods {methods}{label}")
    reason = decision.reason
    if reason is Reason.PUBLIC:
        lines.append("why:      the endpoint is public; no login is needed")
    elif reason is Reason.ALLOWED:
        lines.append("why:      the tags satisfy one of the endpoint's allowed tag sets")
    elif reason is Reason.LOGIN_REQUIRED:
        if ep is None:
            lines.append(
                "why:      anonymous users are sent to login; no endpoint would serve this "
                "request (the policy is not revealed before login)"
            )
        else:
            lines.append("why:      the endpoint is not public; the user must log in first")
    elif reason is Reason.NO_MATCHING_ENDPOINT:
        lines.append("why:      no endpoint pattern matches this path; add one to allow it")
    elif reason is Reason.METHOD_NOT_ALLOWED:
        lines.append(f"why:      endpoints match this path, but none allows method {method}")
    elif not decision.would_allow:
        lines.append("why:      the endpoint has no allowedScopes, so it allows nobody")
    else:
        lines.append("why:      the tags satisfy none of the allowed tag sets:")
        lines.extend(f"            - [{_tags_text(s)}]" for s in decision.would_allow)
        lines.append(f"missing:  {_tags_text(decision.missing)}")
    return "\n".join(lines) + "\n"
