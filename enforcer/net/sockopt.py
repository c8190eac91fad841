"""Socket options of redirected connections: the original destination and the enforcer's mark.

:func:`original_destination` reads ``SO_ORIGINAL_DST`` (v4, v6, v4-mapped on a dual-stack
socket); :func:`redirected_destination` also tells a redirected connection from a direct one;
:func:`mark_socket` sets ``SO_MARK`` so the output chain lets the enforcer's own sockets through.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

from enforcer.net.ruleset import DEFAULT_MARK

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST is the same number
SO_MARK = getattr(socket, "SO_MARK", 36)


# ---------------------------------------------------------------------------------------------
# sockets: original destination and the enforcer's mark


def parse_original_dst(raw: bytes) -> tuple[str, int]:
    """Decode the ``sockaddr_in``/``sockaddr_in6`` that ``SO_ORIGINAL_DST`` returns."""
    (family,) = struct.unpack_from("=H", raw, 0)
    (port,) = struct.unpack_from(">H", raw, 2)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raise ValueError(f"SO_ORIGINAL_DST returned address family {family}")


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """Where the client meant to connect, from conntrack: ``(address, port)``, or None.

    IPv4 connections arriving on a dual-stack ``[::]`` socket (``::ffff:a.b.c.d``) are asked
    with ``SOL_IP`` (IPv6's option answers ENOENT for them) and come back as plain IPv4 text.
    None when conntrack knows nothing (no NAT/conntrack in this namespace, e.g. after the table
    was removed). Not a "was redirected" flag: a direct connection reports its own address; see
    :func:`redirected_destination`.
    """
    try:
        if sock.family == socket.AF_INET:
            return parse_original_dst(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16))
        if sock.family == socket.AF_INET6:
            local = ipaddress.IPv6Address(sock.getsockname()[0].split("%", 1)[0])
            if local.ipv4_mapped is not None:
                return parse_original_dst(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16))
            return parse_original_dst(sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28))
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTCONN, errno.ENOPROTOOPT):
            return None
        raise
    return None


def redirected_destination(sock: socket.socket) -> tuple[str, int] | None:
    """The original destination if this connection was redirected to us, else None.

    A connection made straight to the listener port has an original destination equal to the
    socket's own address; only a NAT-rewritten one differs.
    """
    orig = original_destination(sock)
    if orig is None:
        return None
    host, port = sock.getsockname()[:2]
    local = ipaddress.ip_address(str(host).split("%", 1)[0])
    if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped is not None:
        local = local.ipv4_mapped
    if (ipaddress.ip_address(orig[0]), orig[1]) == (local, port):
        return None
    return orig


def mark_socket(sock: socket.socket, mark: int = DEFAULT_MARK) -> None:
    """Set ``SO_MARK`` so the output chain lets this (enforcer-owned) socket through unredirected.

    Call before ``connect()``. Needs CAP_NET_ADMIN; raises PermissionError otherwise.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except PermissionError as e:
        raise PermissionError(
            e.errno, f"SO_MARK needs CAP_NET_ADMIN (marking the enforcer's own socket): {e}"
        ) from e
