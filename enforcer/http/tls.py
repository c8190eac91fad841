"""Build the server side of TLS: one SSLContext that picks a service's certificate by SNI.

The listener's job ends at a completed handshake; the HTTP server (aiohttp) is wired elsewhere
with ``server_ssl_context(...)`` and a socket from ``make_listen_socket(...)``.  What a finished
handshake tells about a connection (with its peer and original destination) is one
:class:`ConnectionInfo`, built once per connection.

What the context guarantees (conformance §4.3 X-HOST-05/06, §4.6 X-TLS-01..09), and why:

- TLS 1.2 minimum; TLS 1.2 suites are ECDHE + AEAD only (AES-GCM, ChaCha20-Poly1305); TLS 1.3
  suites are all AEAD anyway. No compression (CRIME), no renegotiation (RFC 7457).
- ALPN: we offer ``http/1.1`` only. A client offering only ``h2`` (or an unknown protocol) gets
  *no* ALPN extension back: CPython's select callback calls ``SSL_select_next_proto`` and answers
  ``SSL_TLSEXT_ERR_NOACK`` when nothing overlaps, so OpenSSL continues the handshake without
  ALPN, and the client must speak HTTP/1.1 (RFC 7301 §3.2 allows either this or an alert).
  ``h2`` is never selected, so no h2 frames reach the HTTP/1 parser as a negotiated protocol.
- TLS 1.3 0-RTT: OpenSSL servers accept early data only after ``SSL_CTX_set_max_early_data``
  (default 0) and CPython has no API for it, so our tickets say ``max_early_data = 0`` (checked
  with ``openssl s_client -early_data`` in the tests): clients never send 0-RTT, and OpenSSL
  would skip any that arrived (X-TLS-05). Heartbeat support is gone from OpenSSL 3.
- Session resumption on: TLS 1.2 session IDs and tickets, TLS 1.3 tickets (``num_tickets``).
  Ticket keys and the session cache belong to the *first* context of a connection (OpenSSL's
  ``session_ctx``), i.e. the dispatch context returned here, so keep that object for the life
  of the listener: a new context per connection would make every resumption fail.
- No client certificates are requested (``CERT_NONE``; no post-handshake auth).
- SNI (``sni_callback``): the name is lower-cased and one trailing dot dropped; a configured
  name (or a ``*.`` wildcard host covering it) switches the connection to that leaf's context;
  an unknown name fails the handshake with ``unrecognized_name`` -- nothing is minted on demand.
  An IP-literal SNI (forbidden by RFC 6066 §3) counts as no SNI. Without SNI the ``default``
  host's leaf is presented, or the handshake fails with ``handshake_failure`` if there is none;
  the HTTP layer must then check Host against ``sni_of()`` / the default (X-HOST-05).
- An unknown name is noted on the connection's :class:`HandshakeNote` (the context variable
  :data:`HANDSHAKE`, set by the accepting task: the transport runs the handshake, and so this
  callback, in a copy of that task's context), so the listener can write its flow record.
- Handshake failures pick a precise alert, but asyncio's SSL transport in Python 3.11 (and
  uvloop) closes the socket without flushing it (CPython gh-98078), so peers see a bare close.
- Resumption is not bound to the SNI (OpenSSL 3.0, one ticket key per listener): a session
  from a.example offered with SNI b.example is resumed. In TLS 1.2 OpenSSL then reports the
  *session's* name (a.example) to the callback, so routing stays with the certificate the
  client verified (RFC 6066 §3 wants a full handshake instead); in TLS 1.3 the new name
  (RFC 8446 §4.6.1 leaves that check to the client). SNI authenticates nothing either way: the
  HTTP layer must insist that Host matches ``sni_of()``.
- The normalised SNI is remembered per ``ssl.SSLObject`` in a WeakKeyDictionary: the callback's
  first argument is the very ``SSLObject`` that asyncio's (and uvloop's) SSL transport returns
  from ``get_extra_info("ssl_object")``, so ``sni_of`` needs no attribute smuggling.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import ipaddress
import socket
import ssl
import sys
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from enforcer.http.certs import CertError, LeafPaths

if TYPE_CHECKING:
    from enforcer.http.scope import Scope

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
"""OpenSSL cipher string for TLS 1.2: forward secrecy and AEAD only (no CBC, RC4, 3DES, NULL)."""

ALPN_PROTOCOLS = ("http/1.1",)
"""We speak HTTP/1.1 only; offering h2 would let a client send frames our parser cannot read."""

NUM_TICKETS = 2
"""TLS 1.3 session tickets sent after a full handshake (OpenSSL default; one per parallel conn)."""

# Linux values; older Pythons do not export them (socket.IP_FREEBIND arrived in 3.12).
_IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15 if sys.platform == "linux" else None)
_IPV6_FREEBIND = getattr(socket, "IPV6_FREEBIND", 78 if sys.platform == "linux" else None)

class HandshakeNote:
    """What the SNI callback saw of one connection's handshake that the accepting task needs."""

    __slots__ = ("unknown_sni",)

    def __init__(self) -> None:
        self.unknown_sni: str | None = None
        """The (normalised) server name refused as unknown, if it was."""


HANDSHAKE: contextvars.ContextVar[HandshakeNote | None] = contextvars.ContextVar("enforcer_handshake", default=None)
"""The note of the handshake in progress, set by whoever starts it (``http.accept``)."""

_sni_by_object: weakref.WeakKeyDictionary[ssl.SSLObject | ssl.SSLSocket, str] = weakref.WeakKeyDictionary()


def normalise_sni(name: str | None) -> str | None:
    """The SNI as we compare it: lower case, one trailing dot removed; None for none or an IP."""
    if not name:
        return None
    name = name.lower().removesuffix(".")
    if ":" not in name and name.strip("0123456789."):
        return name  # no IPv6 colon and not only digits and dots: cannot be an IP literal (fast path)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name or None
    return None


def sni_of(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The normalised SNI the client sent on this connection, or None if it sent none (or an IP).

    Pass ``transport.get_extra_info("ssl_object")``. None means the default certificate was
    presented, so the caller must check the Host header itself (X-HOST-05). On a resumed TLS
    1.2 session this is the name the session was first established for.
    """
    if ssl_object is None:
        return None
    return _sni_by_object.get(ssl_object)


class ConnectionInfo(NamedTuple):
    """What one client connection is, fixed once its TLS handshake is done: built once per
    connection (:func:`connection_info`) and handed to whichever protocol serves it."""

    client_ip: str  # an IPv4 client of the dual-stack listener as a.b.c.d, not ::ffff:a.b.c.d
    client: str  # "ip:port", for the flow record
    destination: tuple[str, int] | None  # where a redirected connection was going
    destination_text: str | None  # the same as "host:port", for the flow record
    sni: str | None
    tls_version: str | None
    scope: Scope | None = None  # what the listener that accepted it serves (a pod's); None: the host's


def connection_info(
    peer: Any, destination: tuple[str, int] | None, ssl_object: Any, scope: Scope | None = None
) -> ConnectionInfo:
    """The :class:`ConnectionInfo` of a connection from its transport's ``peername`` and
    ``ssl_object``, its original destination (read at the accept, before the handshake) and
    the scope of the listener that accepted it."""
    # the dual-stack [::] listener the redirect needs reports IPv4 clients as ::ffff:a.b.c.d
    client_ip = str(peer[0]) if peer else "-"
    if client_ip.startswith("::ffff:") and "." in client_ip:
        client_ip = client_ip[7:]
    return ConnectionInfo(
        client_ip,
        f"{client_ip}:{peer[1]}" if peer else "-",
        destination,
        f"{destination[0]}:{destination[1]}" if destination else None,
        sni_of(ssl_object),
        ssl_object.version() if ssl_object is not None else None,
        scope,
    )


def _leaf_context(leaf: LeafPaths) -> ssl.SSLContext:
    ctx = _base_context()
    try:
        ctx.load_cert_chain(leaf.cert, leaf.key)
    except (OSError, ssl.SSLError) as e:
        raise CertError(
            f"{leaf.cert} / {leaf.key}: cannot load the certificate chain and key ({e}); "
            f"check that both files exist, are PEM and belong together"
        ) from e
    return ctx


def _base_context() -> ssl.SSLContext:
    """A server context with our protocol settings and no certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= (
        ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    )
    ctx.options &= ~ssl.OP_NO_TICKET
    ctx.verify_mode = ssl.CERT_NONE
    ctx.post_handshake_auth = False
    ctx.num_tickets = NUM_TICKETS
    ctx.set_alpn_protocols(list(ALPN_PROTOCOLS))
    return ctx


def _lookup(contexts: Mapping[str, ssl.SSLContext], name: str) -> ssl.SSLContext | None:
    """The context for ``name``: an exact host first, then a ``*.`` host one label up."""
    ctx = contexts.get(name)
    if ctx is None and "." in name:
        ctx = contexts.get("*." + name.split(".", 1)[1])
    return ctx


class TLSDispatch:
    """The listener's one SSLContext, whose SNI table can be replaced on reload.

    ``leaves`` maps a host name (compared case-insensitively, without trailing dot; ``*.x``
    covers one label under ``x``) to its leaf; hosts sharing a ``LeafPaths`` share one context.
    The dispatch context itself never changes, so session resumption survives reloads.
    """

    def __init__(
        self, leaves: Mapping[str, LeafPaths], default: str | None, *, context: ssl.SSLContext | None = None
    ) -> None:
        # No certificate of its own: OpenSSL runs the servername callback on every ClientHello
        # (CPython passes None without SNI), and the callback always switches or aborts.
        # ``context``: one made by :func:`dispatch_context` before the worker processes were
        # forked, so that they all hold the same session-ticket keys (a ticket from one worker
        # resumes on another).
        self.context = context if context is not None else _base_context()
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._default: ssl.SSLContext | None = None
        self._by_leaf: dict[LeafPaths, ssl.SSLContext] = {}
        self.update(leaves, default)
        self.context.sni_callback = self._on_sni

    def update(self, leaves: Mapping[str, LeafPaths], default: str | None) -> None:
        """Swap in a new host -> certificate table (atomically: one attribute assignment each).

        Raises CertError if a certificate/key pair cannot be loaded, ValueError if ``default``
        is not one of ``leaves``; the previous table then stays in force.
        """
        by_leaf: dict[LeafPaths, ssl.SSLContext] = {}
        contexts: dict[str, ssl.SSLContext] = {}
        for host, leaf in leaves.items():
            name = normalise_sni(host)
            if name is None:
                raise ValueError(f"leaves: {host!r} is not a host name (IP literals never arrive as SNI)")
            if leaf not in by_leaf:
                by_leaf[leaf] = self._by_leaf.get(leaf) or _leaf_context(leaf)
            contexts[name] = by_leaf[leaf]
        default_ctx: ssl.SSLContext | None = None
        if default is not None:
            default_name = normalise_sni(default)
            if default_name is None or default_name not in contexts:
                raise ValueError(f"default host {default!r} is not one of the configured hosts")
            default_ctx = contexts[default_name]
        self._by_leaf, self._contexts, self._default = by_leaf, contexts, default_ctx

    def _on_sni(
        self, ssl_obj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _ctx: ssl.SSLContext
    ) -> int | None:
        # Must never raise: CPython would print the exception and abort with internal_error.
        try:
            name = normalise_sni(server_name)
            if name is None:
                if self._default is None:
                    return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
                ssl_obj.context = self._default
                return None
            ctx = _lookup(self._contexts, name)
            if ctx is None:
                note = HANDSHAKE.get()
                if note is not None:
                    note.unknown_sni = name
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            ssl_obj.context = ctx
            _sni_by_object[ssl_obj] = name
        except Exception:  # pragma: no cover - defensive
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None


def dispatch_context() -> ssl.SSLContext:
    """A bare dispatch context for :class:`TLSDispatch` (``context=``); OpenSSL draws its
    session-ticket keys now, so processes forked afterwards share them."""
    return _base_context()


def server_ssl_context(leaves: Mapping[str, LeafPaths], default: str | None) -> ssl.SSLContext:
    """The listener's SSLContext: presents ``leaves[SNI]``, or ``leaves[default]`` without SNI.

    Raises CertError if a certificate/key pair cannot be loaded, ValueError if ``default`` is
    not one of ``leaves``. Use :class:`TLSDispatch` to be able to change the table later.
    """
    return TLSDispatch(leaves, default).context


class PortInUseError(OSError):
    """The address and port to listen on are taken (``EADDRINUSE``); says which setting to change."""

    def __init__(self, setting: str, host: str, port: int) -> None:
        super().__init__(
            errno.EADDRINUSE, f"port {port} on {host} is in use: choose another {setting} (or stop what listens there)"
        )
        self.setting, self.host, self.port = setting, host, port


def make_listen_socket(
    host: str, port: int, *, reuse_port: bool = False, backlog: int = 1024, setting: str = "listen.port"
) -> socket.socket:
    """A bound, listening, non-blocking TCP socket for ``host``:``port``.

    ``"::"`` is dual-stack (IPV6_V6ONLY=0, IPv4 arrives as ``::ffff:a.b.c.d``); any other IPv6
    address is IPv6-only. SO_REUSEADDR always; SO_REUSEPORT on request (several workers);
    freebind where available, so we can bind an address before it is configured (the redirect
    target may appear later, e.g. in a pod's network namespace).
    """
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        addr: tuple[str, int] = (host, port)
    except ValueError:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        family, addr = info[0], (str(info[4][0]), port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            dual = ipaddress.ip_address(addr[0]) == ipaddress.IPv6Address("::")
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
            if _IPV6_FREEBIND is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_FREEBIND, 1)
        elif _IP_FREEBIND is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(setting, host, port) from None
        raise
    except BaseException:
        sock.close()
        raise
    return sock
