"""Redirect the exposed ports to the enforcer's listener: the only module touching netfilter.

Users keep their DNS, ports and app: nftables (programmed over netlink with pyroute2, no ``nft``
or ``iptables`` binary at run time) redirects ``tcp dport <exposedPort>`` to the TLS listener and
rejects non-loopback connections to the app's internal port. Everything lives in one table the
enforcer owns (``table inet enforcer``: IPv4 and IPv6 together), so deleting it never touches
kube-proxy, Docker or the host firewall.

* :func:`build_ruleset` turns services + settings into a :class:`Ruleset`: pure, frozen data that
  holds both the nft text (:meth:`Ruleset.render_nft`, for operators) and the netlink bytecode
  (:meth:`Ruleset.render_bytecode`, for golden tests). Chains:

  - ``prerouting`` (nat, priority -101 = dstnat - 1, so it wins against kube-proxy/iptables-nft
    NAT chains at -100 whatever order they were registered in):
    ``fib daddr type local tcp dport P counter redirect to :L``. ``fib daddr type local`` keeps
    forwarded traffic (containers, pods behind this host) out of the redirect.
  - ``output`` (nat, -101): first ``meta mark M counter return`` (the enforcer's own sockets carry
    ``SO_MARK`` M, see :func:`mark_socket`), then the same redirect, for connections to *local*
    addresses only, so the enforcer's calls to an IdP on 443 elsewhere never loop back.
  - ``input`` (filter, priority 0): ``iifname != "lo" tcp dport A counter reject with tcp reset``
    per app port (v4 and v6: the table is ``inet``).

* :func:`apply` sends ``add table; delete table; add table; chains; rules`` as **one** nfnetlink
  batch: the kernel swaps the whole table atomically, or, if any message fails, changes nothing
  (previous rules and counters stay). Every message carries ``NLM_F_ACK``; the answers are read
  back per sequence number, so :class:`RedirectError` says which table/chain/rule failed and why.
  NAT is decided per connection, so established connections keep flowing across a replace.
* Fail closed: the table is not owner-bound (no ``NFT_TABLE_F_OWNER``), so a crashed daemon leaves
  it in place: the exposed port then redirects to a closed listener (connection refused) and the
  app port stays blocked. :func:`remove` deletes it on a clean stop; :meth:`Ruleset.block_only`
  is the "keep the port block" variant.
* :func:`read_live` dumps the table back over netlink (with counters); :func:`diff` compares it
  with what :func:`build_ruleset` intended, bytecode against bytecode.
* :func:`original_destination` reads ``SO_ORIGINAL_DST`` (v4, v6, v4-mapped on a dual-stack
  socket); :func:`redirected_destination` also tells a redirected connection from a direct one.
* :func:`run_in_netns` runs a callable in another network namespace (a throw-away thread that
  ``setns()``-es; the caller never changes namespace): how pod mode and the tests reach a
  namespace. Sockets keep the namespace they were created in.

Why not pyroute2's ``NFTables.rule(...)``/``begin()``/``commit()``: each call is its own
transaction and ``commit()`` never reads the acks. pyroute2 encodes and decodes the messages here
(``nft_*_msg``); the batch goes out in one ``send()`` on a plain netlink socket. The kernel runs
the whole batch inside that ``send()``, so every answer is queued when it returns: reading until
``EAGAIN`` collects all of them without timeouts.

Needs CAP_NET_ADMIN (nftables, ``SO_MARK``), CAP_SYS_ADMIN too for another namespace, Linux >= 5.2
(NAT in ``inet`` tables; Debian 12's 6.1 is fine). On module-built kernels the nf_tables modules
autoload for root in the initial user namespace only; preload them for user-namespaced containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import ipaddress
import logging
import os
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

# pyroute2 warns at import about /proc/net/psched when ProcSubset=pid hides it (systemd
# hardening); we use no tc, so its warnings are noise in the journal.
logging.getLogger("pyroute2").setLevel(logging.ERROR)

from pyroute2.netlink import (  # noqa: E402
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_REQUEST,
)
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg  # noqa: E402
from pyroute2.netlink.nfnetlink import nftsocket as nft  # noqa: E402

__all__ = [
    "DEFAULT_MARK",
    "DEFAULT_TABLE",
    "FILTER_PRIORITY",
    "NAT_PRIORITY",
    "Chain",
    "Expr",
    "LiveChain",
    "LiveRule",
    "LiveRuleset",
    "MessageFailure",
    "RedirectError",
    "RedirectSettings",
    "RedirectTarget",
    "Rule",
    "Ruleset",
    "apply",
    "build_ruleset",
    "diff",
    "mark_socket",
    "original_destination",
    "parse_original_dst",
    "read_live",
    "redirected_destination",
    "remove",
    "run_in_netns",
]

T = TypeVar("T")


DEFAULT_TABLE = "enforcer"
DEFAULT_MARK = 0x454E
"""``SO_MARK`` of the enforcer's own outgoing sockets ("EN"); pick one your CNI does not use."""
NAT_PRIORITY = -101
"""dstnat - 1: iptables-nft / kube-proxy NAT chains sit at -100; at equal priority the most
recently registered chain runs first, and every atomic replace re-registers ours."""
FILTER_PRIORITY = 0

FAMILY_INET = 1  # NFPROTO_INET
_HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
_HOOK_NAMES = {v: k for k, v in _HOOKS.items()}
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")

# netlink / nfnetlink constants not exported by pyroute2
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_ACK_TLVS = 0x200
_NLMSGERR_ATTR_MSG = 1
_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10
_NETLINK_EXT_ACK = 11
_NFNL_MSG_BATCH_BEGIN = 0x10
_NFNL_MSG_BATCH_END = 0x11
_CLONE_NEWNET = 0x40000000
_NETLINK_NETFILTER = 12

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST is the same number
SO_MARK = getattr(socket, "SO_MARK", 36)


# ---------------------------------------------------------------------------------------------
# data model


Value = int | bytes | tuple[tuple[str, Any], ...]
"""A netlink attribute value: an integer, raw bytes, or nested ``(name, value)`` attributes."""


@dataclass(frozen=True)
class Expr:
    """One nftables expression as netlink sends it: its name and its ``NFTA_*`` attributes.

    Integers are the raw numbers the kernel uses (registers, keys, flags as bit masks); bytes
    are sent as they are (ports in network order, marks in host order, like nft does).
    """

    name: str
    attrs: tuple[tuple[str, Value], ...] = ()


@dataclass(frozen=True)
class Rule:
    """One rule: its chain, its nft text, its bytecode and the services it serves."""

    chain: str
    text: str
    exprs: tuple[Expr, ...]
    services: tuple[str, ...] = ()

    def bytecode(self) -> tuple[str, ...]:
        """The rule's expressions in canonical text form (as :func:`read_live` reports them)."""
        return tuple(_render_expr(e.name, _attr_dict(e.attrs)) for e in self.exprs)


@dataclass(frozen=True)
class Chain:
    """A base chain of the table."""

    name: str
    type: Literal["nat", "filter"]
    hook: Literal["prerouting", "input", "output"]
    priority: int
    policy: Literal["accept"] = "accept"


@dataclass(frozen=True)
class Ruleset:
    """The whole enforcer table, ready for :func:`apply` or :meth:`render_nft`."""

    table: str
    chains: tuple[Chain, ...]
    rules: tuple[Rule, ...]
    family: Literal["inet"] = "inet"

    def rules_of(self, chain: str) -> tuple[Rule, ...]:
        """The rules of ``chain`` in order."""
        return tuple(r for r in self.rules if r.chain == chain)

    def block_only(self) -> Ruleset:
        """Only the app-port block, without redirects (for a clean stop that keeps the block)."""
        return replace(
            self,
            chains=tuple(c for c in self.chains if c.type == "filter"),
            rules=tuple(r for r in self.rules if r.chain == "input"),
        )

    def render_nft(self) -> str:
        """The ruleset in nft syntax (what ``nft list table inet <table>`` would print)."""
        lines = [f"table {self.family} {self.table} {{"]
        for i, chain in enumerate(self.chains):
            if i:
                lines.append("")
            lines.append(f"\tchain {chain.name} {{")
            lines.append(
                f"\t\ttype {chain.type} hook {chain.hook} priority {chain.priority}; "
                f"policy {chain.policy};"
            )
            for rule in self.rules_of(chain.name):
                note = f"  # {', '.join(rule.services)}" if rule.services else ""
                lines.append(f"\t\t{rule.text}{note}")
            lines.append("\t}")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def render_bytecode(self) -> str:
        """Each rule with its netlink expressions (like ``nft --debug=netlink``); golden tests."""
        out: list[str] = []
        for rule in self.rules:
            out.append(f"{self.family} {self.table} {rule.chain}: {rule.text}")
            out.extend(f"  [ {line} ]" for line in rule.bytecode())
        return "\n".join(out) + "\n"


@dataclass(frozen=True)
class RedirectTarget:
    """One service as the redirect sees it.

    ``exposed_port``: what clients connect to (443). ``app_port``: the app's internal port, blocked
    for non-loopback clients; None when the upstream is not on this host (nothing to block).
    ``addresses``: redirect only connections to these local addresses (empty: any local address).
    """

    name: str
    exposed_port: int
    app_port: int | None
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class RedirectSettings:
    """Where redirected traffic goes and how the table is set up."""

    listen_port: int
    table: str = DEFAULT_TABLE
    mark: int = DEFAULT_MARK
    block_app_port: bool = True
    nat_priority: int = NAT_PRIORITY
    filter_priority: int = FILTER_PRIORITY


# ---------------------------------------------------------------------------------------------
# expression builders (bytecode checked against `nft --debug=netlink`, see the notes)

_META_L4PROTO = 16
_META_NFPROTO = 15
_META_MARK = 3
_META_IIFNAME = 6
_CMP_EQ, _CMP_NEQ = 0, 1
_PAYLOAD_NETWORK, _PAYLOAD_TRANSPORT = 1, 2
_NF_NAT_RANGE_PROTO_SPECIFIED = 0x2
_FIB_RESULT_ADDRTYPE = 3
_FIB_F_DADDR = 0x2
_RTN_LOCAL = 2
_REJECT_TCP_RST = 1
_VERDICT_RETURN = -5


def _meta(key: int) -> Expr:
    return Expr("meta", (("NFTA_META_DREG", 1), ("NFTA_META_KEY", key)))


def _cmp(op: int, data: bytes) -> Expr:
    return Expr(
        "cmp",
        (
            ("NFTA_CMP_SREG", 1),
            ("NFTA_CMP_OP", op),
            ("NFTA_CMP_DATA", (("NFTA_DATA_VALUE", data),)),
        ),
    )


def _payload(base: int, offset: int, length: int) -> Expr:
    return Expr(
        "payload",
        (
            ("NFTA_PAYLOAD_DREG", 1),
            ("NFTA_PAYLOAD_BASE", base),
            ("NFTA_PAYLOAD_OFFSET", offset),
            ("NFTA_PAYLOAD_LEN", length),
        ),
    )


def _tcp_dport(port: int) -> tuple[Expr, ...]:
    return (
        _meta(_META_L4PROTO),
        _cmp(_CMP_EQ, bytes([socket.IPPROTO_TCP])),
        _payload(_PAYLOAD_TRANSPORT, 2, 2),
        _cmp(_CMP_EQ, struct.pack(">H", port)),
    )


def _fib_daddr_local() -> tuple[Expr, ...]:
    return (
        Expr(
            "fib",
            (
                ("NFTA_FIB_DREG", 1),
                ("NFTA_FIB_RESULT", _FIB_RESULT_ADDRTYPE),
                ("NFTA_FIB_FLAGS", _FIB_F_DADDR),
            ),
        ),
        _cmp(_CMP_EQ, struct.pack("=I", _RTN_LOCAL)),
    )


def _daddr(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[Expr, ...]:
    if address.version == 4:
        return (
            _meta(_META_NFPROTO),
            _cmp(_CMP_EQ, bytes([socket.AF_INET])),
            _payload(_PAYLOAD_NETWORK, 16, 4),
            _cmp(_CMP_EQ, address.packed),
        )
    return (
        _meta(_META_NFPROTO),
        _cmp(_CMP_EQ, bytes([socket.AF_INET6])),
        _payload(_PAYLOAD_NETWORK, 24, 16),
        _cmp(_CMP_EQ, address.packed),
    )


def _counter() -> Expr:
    return Expr("counter")


def _redirect(port: int) -> tuple[Expr, ...]:
    return (
        Expr(
            "immediate",
            (
                ("NFTA_IMMEDIATE_DREG", 1),
                ("NFTA_IMMEDIATE_DATA", (("NFTA_DATA_VALUE", struct.pack(">H", port)),)),
            ),
        ),
        Expr(
            "redir",
            (
                ("NFTA_REDIR_REG_PROTO_MIN", 1),
                ("NFTA_REDIR_FLAGS", _NF_NAT_RANGE_PROTO_SPECIFIED),
            ),
        ),
    )


def _return() -> Expr:
    return Expr(
        "immediate",
        (
            ("NFTA_IMMEDIATE_DREG", 0),
            (
                "NFTA_IMMEDIATE_DATA",
                (("NFTA_DATA_VERDICT", (("NFTA_VERDICT_CODE", _VERDICT_RETURN),)),),
            ),
        ),
    )


def _reject_tcp_reset() -> Expr:
    return Expr("reject", (("NFTA_REJECT_TYPE", _REJECT_TCP_RST), ("NFTA_REJECT_ICMP_CODE", 0)))


# ---------------------------------------------------------------------------------------------
# the builder


def _check_port(what: str, port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{what}: {port!r} is not a TCP port (1-65535)")
    return port


def build_ruleset(services: Sequence[RedirectTarget], settings: RedirectSettings) -> Ruleset:
    """The table that redirects every service's exposed port to ``settings.listen_port``.

    Pure: no system access. Services sharing an exposed port (and addresses) share a rule; the
    rule remembers their names. Raises ValueError for a port out of range, a mark of 0, a table
    name nft cannot hold, an address that is not an IP, or an exposed/app port equal to the
    listener's port (the redirect or the block would then hit the listener itself).
    """
    listen = _check_port("listen_port", settings.listen_port)
    if not _NAME_RE.match(settings.table):
        raise ValueError(
            f"table: {settings.table!r} is not a valid nftables name "
            "(a letter or '_', then letters, digits, '_', '.', '-'; at most 64)"
        )
    if isinstance(settings.mark, bool) or not 0 < settings.mark <= 0xFFFFFFFF:
        raise ValueError(
            f"mark: {settings.mark!r} must be a non-zero 32-bit value "
            "(0 is the mark of every unmarked socket)"
        )

    # (exposed_port, address or None) -> service names, in first-seen order
    redirects: dict[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address | None], list[str]]
    redirects = {}
    blocks: dict[int, list[str]] = {}
    for target in services:
        exposed = _check_port(f"service {target.name}: exposed_port", target.exposed_port)
        if exposed == listen:
            raise ValueError(
                f"service {target.name}: exposed_port {exposed} is the listener's own port; "
                "choose another listen_port"
            )
        keys: list[ipaddress.IPv4Address | ipaddress.IPv6Address | None] = []
        for text in target.addresses:
            try:
                address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
                    text.strip("[]")
                )
            except ValueError:
                raise ValueError(
                    f"service {target.name}: address {text!r} is not an IPv4 or IPv6 address"
                ) from None
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            keys.append(address)
        for key in keys or [None]:
            names = redirects.setdefault((exposed, key), [])
            if target.name not in names:
                names.append(target.name)
        if settings.block_app_port and target.app_port is not None:
            app = _check_port(f"service {target.name}: app_port", target.app_port)
            if app == listen:
                raise ValueError(
                    f"service {target.name}: app_port {app} is the listener's own port; "
                    "blocking it would block the enforcer"
                )
            names = blocks.setdefault(app, [])
            if target.name not in names:
                names.append(target.name)

    redirect_rules: list[tuple[str, tuple[Expr, ...], tuple[str, ...]]] = []
    for (port, dest), names in redirects.items():
        exprs = _fib_daddr_local()
        text = "fib daddr type local "
        if dest is not None:
            exprs += _daddr(dest)
            text += f"{'ip' if dest.version == 4 else 'ip6'} daddr {dest} "
        exprs += (*_tcp_dport(port), _counter(), *_redirect(listen))
        text += f"tcp dport {port} counter redirect to :{listen}"
        redirect_rules.append((text, exprs, tuple(names)))

    chains = [
        Chain("prerouting", "nat", "prerouting", settings.nat_priority),
        Chain("output", "nat", "output", settings.nat_priority),
    ]
    rules = [Rule("prerouting", t, e, n) for t, e, n in redirect_rules]
    rules.append(
        Rule(
            "output",
            f"meta mark 0x{settings.mark:08x} counter return",
            (_meta(_META_MARK), _cmp(_CMP_EQ, struct.pack("=I", settings.mark)), _counter(),
             _return()),
            ("enforcer's own sockets",),
        )
    )
    rules.extend(Rule("output", t, e, n) for t, e, n in redirect_rules)
    if blocks:
        chains.append(Chain("input", "filter", "input", settings.filter_priority))
        for port, names in blocks.items():
            rules.append(
                Rule(
                    "input",
                    f'iifname != "lo" tcp dport {port} counter reject with tcp reset',
                    (
                        _meta(_META_IIFNAME),
                        _cmp(_CMP_NEQ, b"lo".ljust(16, b"\0")),
                        *_tcp_dport(port),
                        _counter(),
                        _reject_tcp_reset(),
                    ),
                    tuple(names),
                )
            )
    return Ruleset(table=settings.table, chains=tuple(chains), rules=tuple(rules))


# ---------------------------------------------------------------------------------------------
# canonical rendering of expressions (shared by what we build and what the kernel reports)

_META_KEYS = {3: "mark", 6: "iifname", 7: "oifname", 10: "skuid", 15: "nfproto", 16: "l4proto"}
_CMP_OPS = {0: "eq", 1: "neq", 2: "lt", 3: "lte", 4: "gt", 5: "gte"}
_PAYLOAD_BASES = {0: "link", 1: "network", 2: "transport"}
_VERDICTS = {0: "drop", 1: "accept", -1: "continue", -2: "break", -3: "jump", -4: "goto",
             -5: "return"}
_FIB_RESULTS = {1: "oif", 2: "oifname", 3: "type"}
_FIB_FLAGS = ((0x1, "saddr"), (0x2, "daddr"), (0x4, "mark"), (0x8, "iif"), (0x10, "oif"))


def _named(names: Mapping[int, str], value: object) -> str:
    return names.get(value, str(value)) if isinstance(value, int) else str(value)


def _attr_dict(attrs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in attrs:
        short = name.split("_", 2)[-1] if name.startswith("NFTA_") else name
        out[short] = _attr_dict(value) if isinstance(value, tuple) else value
    return out


def _data_text(data: Mapping[str, Any] | None) -> str:
    if not data:
        return "?"
    if "VALUE" in data:
        return "0x" + bytes(data["VALUE"]).hex()
    verdict = data.get("VERDICT") or {}
    text = _named(_VERDICTS, verdict.get("CODE"))
    if "CHAIN" in verdict:
        text += f" {verdict['CHAIN']}"
    return text


def _render_expr(name: str, a: Mapping[str, Any]) -> str:
    """One expression as text; kernel defaults are filled in so built and dumped forms agree."""
    if name == "meta" and "DREG" in a:
        return f"meta load {_named(_META_KEYS, a.get('KEY'))} => reg {a['DREG']}"
    if name == "cmp":
        op = _named(_CMP_OPS, a.get("OP"))
        return f"cmp {op} reg {a.get('SREG')} {_data_text(a.get('DATA'))}"
    if name == "payload" and "DREG" in a:
        return (
            f"payload load {a.get('LEN')}b @ {_named(_PAYLOAD_BASES, a.get('BASE'))} header "
            f"+ {a.get('OFFSET')} => reg {a['DREG']}"
        )
    if name == "immediate":
        return f"immediate reg {a.get('DREG')} {_data_text(a.get('DATA'))}"
    if name == "counter":
        return "counter"
    if name == "redir":
        low = a.get("REG_PROTO_MIN")
        high = a.get("REG_PROTO_MAX", low)  # the kernel reports max = min when only min was sent
        return f"redir proto_min reg {low} proto_max reg {high} flags 0x{a.get('FLAGS', 0):x}"
    if name == "reject":
        return f"reject type {a.get('TYPE')} code {a.get('ICMP_CODE', 0)}"
    if name == "fib":
        flags = int(a.get("FLAGS", 0))
        which = " ".join(n for bit, n in _FIB_FLAGS if flags & bit) or "-"
        return f"fib {which} {_named(_FIB_RESULTS, a.get('RESULT'))} => reg {a.get('DREG')}"
    shown = " ".join(
        f"{k.lower()}={v.hex() if isinstance(v, bytes) else v}" for k, v in sorted(a.items())
    )
    return f"{name} {shown}".rstrip()


# ---------------------------------------------------------------------------------------------
# netlink encoding (pyroute2 message classes) and the batch


def _expr_class(expr_name: str) -> Any:
    return getattr(nft.nft_contains_expr.nft_expr, f"nft_{expr_name}", None)


def _encode_attrs(cls: Any, attrs: Iterable[tuple[str, Value]]) -> list[tuple[str, Any]]:
    """Our raw values -> what pyroute2's classes want (flag sets for its flag-typed attributes)."""
    out: list[tuple[str, Any]] = []
    for name, value in attrs:
        kind = next((k for n, k in _nla_map(cls) if n == name), None)
        sub = getattr(cls, kind, None) if kind else None
        if isinstance(value, tuple):
            out.append((name, {"attrs": _encode_attrs(sub, value)}))
        elif isinstance(value, int) and sub is not None and issubclass(sub, nft.nft_flags_be32):
            ops = list(sub.ops)
            out.append((name, frozenset(ops[i] for i in range(len(ops)) if value >> i & 1)))
        else:
            out.append((name, value))
    return out


def _nla_map(cls: Any) -> list[tuple[str, str]]:
    # entries are (name, type) or (id, name, type)
    return [(str(item[-2]), str(item[-1])) for item in getattr(cls, "nla_map", ())]


def _expr_attrs(expr: Expr) -> dict[str, Any]:
    data = _encode_attrs(_expr_class(expr.name), expr.attrs)
    attrs: list[tuple[str, Any]] = [("NFTA_EXPR_NAME", expr.name)]
    if data:
        attrs.append(("NFTA_EXPR_DATA", {"attrs": data}))
    return {"attrs": attrs}


@dataclass(frozen=True)
class _Message:
    what: str  # "table enforcer", "chain enforcer/output", "rule #3 in enforcer/output: ..."
    cls: Any
    type: int
    flags: int
    attrs: tuple[tuple[str, Any], ...]


def _batch_messages(ruleset: Ruleset) -> list[_Message]:
    table = ruleset.table
    msgs = [
        _Message(f"table {table} (create)", nft.nft_table_msg, nft.NFT_MSG_NEWTABLE,
                 NLM_F_CREATE, (("NFTA_TABLE_NAME", table), ("NFTA_TABLE_FLAGS", 0))),
        _Message(f"table {table} (delete the previous one)", nft.nft_table_msg,
                 nft.NFT_MSG_DELTABLE, 0, (("NFTA_TABLE_NAME", table),)),
        _Message(f"table {table}", nft.nft_table_msg, nft.NFT_MSG_NEWTABLE, NLM_F_CREATE,
                 (("NFTA_TABLE_NAME", table), ("NFTA_TABLE_FLAGS", 0))),
    ]
    for chain in ruleset.chains:
        msgs.append(
            _Message(
                f"chain {table}/{chain.name} (type {chain.type} hook {chain.hook} "
                f"priority {chain.priority})",
                nft.nft_chain_msg,
                nft.NFT_MSG_NEWCHAIN,
                NLM_F_CREATE,
                (
                    ("NFTA_CHAIN_TABLE", table),
                    ("NFTA_CHAIN_NAME", chain.name),
                    (
                        "NFTA_CHAIN_HOOK",
                        {
                            "attrs": [
                                ("NFTA_HOOK_HOOKNUM", _HOOKS[chain.hook]),
                                ("NFTA_HOOK_PRIORITY", chain.priority),
                            ]
                        },
                    ),
                    ("NFTA_CHAIN_POLICY", 1),  # NF_ACCEPT
                    ("NFTA_CHAIN_TYPE", chain.type),
                ),
            )
        )
    for index, rule in enumerate(ruleset.rules, 1):
        msgs.append(
            _Message(
                f"rule #{index} in {table}/{rule.chain} ({rule.text})",
                nft.nft_rule_msg,
                nft.NFT_MSG_NEWRULE,
                NLM_F_CREATE | NLM_F_APPEND,
                (
                    ("NFTA_RULE_TABLE", table),
                    ("NFTA_RULE_CHAIN", rule.chain),
                    ("NFTA_RULE_EXPRESSIONS", [_expr_attrs(e) for e in rule.exprs]),
                ),
            )
        )
    return msgs


def _encode(msg_cls: Any, msg_type: int, flags: int, seq: int, attrs: Any) -> bytes:
    m = msg_cls()
    m["attrs"] = list(attrs)
    m["nfgen_family"] = FAMILY_INET
    m["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | msg_type
    m["header"]["flags"] = NLM_F_REQUEST | flags
    m["header"]["sequence_number"] = seq
    m.encode()
    return bytes(m.data)


def _batch_marker(msg_type: int, seq: int) -> bytes:
    m = nfgen_msg()
    m["res_id"] = NFNL_SUBSYS_NFTABLES
    m["nfgen_family"] = 0
    m["header"]["type"] = msg_type
    m["header"]["flags"] = NLM_F_REQUEST
    m["header"]["sequence_number"] = seq
    m.encode()
    return bytes(m.data)


@dataclass(frozen=True)
class MessageFailure:
    """One message of a batch that the kernel refused."""

    what: str
    errno: int
    detail: str = ""

    def __str__(self) -> str:
        reason = os.strerror(self.errno) if self.errno > 0 else "error"
        text = f"{self.what}: {reason} ({errno.errorcode.get(self.errno, self.errno)})"
        if self.detail:
            text += f": {self.detail}"
        hint = _HINTS.get(self.errno)
        return f"{text}; {hint}" if hint else text


_HINTS = {
    errno.EPERM: "the enforcer needs CAP_NET_ADMIN (and CAP_SYS_ADMIN for another namespace)",
    errno.ENOENT: "it names a table or chain that does not exist",
    errno.EOPNOTSUPP: "this kernel or chain type does not support the expression "
    "(nf_tables/nft_nat/nft_redir/nft_fib/nft_reject missing, or NAT in a filter chain)",
    errno.EINVAL: "the kernel rejected an attribute (malformed message)",
    errno.EEXIST: "the object exists already",
    errno.EBUSY: "the object is in use",
}


class RedirectError(Exception):
    """Programming netfilter failed; ``failures`` names each refused message and why."""

    def __init__(self, message: str, failures: Sequence[MessageFailure] = ()) -> None:
        self.failures = tuple(failures)
        if self.failures:
            message += "\n" + "\n".join(f"  - {f}" for f in self.failures)
        super().__init__(message)


def _netns_path(netns: str) -> str:
    return netns if "/" in netns else f"/run/netns/{netns}"


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python >= 3.12
    if setns is not None:
        setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def run_in_netns(netns: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` inside network namespace ``netns`` and return its result.

    ``netns`` is a name under /run/netns (``ip netns add``) or a path such as
    ``/proc/<pid>/ns/net``; None runs ``fn`` right here. A fresh thread enters the namespace and
    ends with ``fn``, so no thread of the caller ever changes namespace. Sockets created by ``fn``
    stay in that namespace and can be used from anywhere. A missing namespace raises
    FileNotFoundError (it is never created). Needs CAP_SYS_ADMIN.
    """
    if netns is None:
        return fn(*args, **kwargs)
    fd = os.open(_netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            _setns(fd)
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    try:
        thread = threading.Thread(target=target, name=f"netns:{netns}", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(fd)
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result


def _nft_socket(netns: str | None) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            for opt in (_NETLINK_CAP_ACK, _NETLINK_EXT_ACK):
                with contextlib.suppress(OSError):  # very old kernels lack these options
                    sock.setsockopt(_SOL_NETLINK, opt, 1)
        except BaseException:
            sock.close()
            raise
        return sock

    try:
        return run_in_netns(netns, make)
    except FileNotFoundError as e:
        raise RedirectError(f"network namespace {netns!r} does not exist ({e})") from e
    except OSError as e:
        raise RedirectError(
            f"cannot open a netfilter netlink socket{f' in {netns!r}' if netns else ''}: {e}"
        ) from e


def _iter_messages(data: bytes) -> Iterable[tuple[int, int, int, bytes]]:
    """(type, flags, seq, whole message) for each netlink message in a datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, mtype, flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if length < 16:
            break
        yield mtype, flags, seq, data[offset : offset + length]
        offset += (length + 3) & ~3


def _parse_error(msg: bytes, flags: int) -> tuple[int, str]:
    """errno (positive) and the extended-ack text of an NLMSG_ERROR message."""
    (code,) = struct.unpack_from("=i", msg, 16)
    text = ""
    if flags & _NLM_F_ACK_TLVS:
        (inner_len,) = struct.unpack_from("=I", msg, 20)
        # NLM_F_CAPPED (0x100, NETLINK_CAP_ACK): only the request's header is echoed
        offset = 20 + (16 if flags & 0x100 else (inner_len + 3) & ~3)
        while offset + 4 <= len(msg):
            alen, atype = struct.unpack_from("=HH", msg, offset)
            if alen < 4:
                break
            if atype & 0x3FFF == _NLMSGERR_ATTR_MSG:
                text = msg[offset + 4 : offset + alen].rstrip(b"\0").decode(errors="replace")
            offset += (alen + 3) & ~3
    return -code, text


def _encode_messages(messages: Iterable[_Message]) -> tuple[tuple[str, bytes], ...]:
    """Each message's description and its bytes (sequence number 0, patched in when sent)."""
    return tuple(
        (m.what, _encode(m.cls, m.type, m.flags | NLM_F_ACK, 0, m.attrs)) for m in messages
    )


@functools.lru_cache(maxsize=16)
def _encoded_ruleset(ruleset: Ruleset) -> tuple[tuple[str, bytes], ...]:
    # pyroute2's pure-Python encoding is most of an apply's CPU time; reloads mostly resend
    # the same ruleset, and a Ruleset is immutable.
    return _encode_messages(_batch_messages(ruleset))


def _close_later(sock: socket.socket) -> None:
    # close() of a netlink socket that committed a table replacement waits for the kernel to
    # free the old table (an RCU grace period, ~10 ms); the new rules are live already.
    threading.Thread(target=sock.close, name="nft-close", daemon=True).start()


def _transact(netns: str | None, messages: Sequence[tuple[str, bytes]]) -> None:
    """Send encoded ``messages`` as one nfnetlink batch; raise RedirectError naming failures."""
    sock = _nft_socket(netns)
    try:
        base = int.from_bytes(os.urandom(2), "big") << 8 | 1
        data = bytearray(_batch_marker(_NFNL_MSG_BATCH_BEGIN, base))
        by_seq: dict[int, str] = {base: "the batch"}
        for i, (what, encoded) in enumerate(messages, 1):
            seq = base + i
            by_seq[seq] = what
            start = len(data)
            data += encoded
            struct.pack_into("=I", data, start + 8, seq)
        data += _batch_marker(_NFNL_MSG_BATCH_END, base + len(messages) + 1)
        try:
            sock.send(bytes(data))
        except OSError as e:
            raise RedirectError(f"sending the nftables batch failed: {e}") from e
        # The kernel ran the batch inside send(): every answer is queued already.
        sock.setblocking(False)
        acked: set[int] = set()
        failures: list[MessageFailure] = []
        while True:
            try:
                datagram = sock.recv(1 << 20)
            except BlockingIOError:
                break
            for mtype, flags, seq, msg in _iter_messages(datagram):
                if mtype != _NLMSG_ERROR or seq not in by_seq:
                    continue
                code, detail = _parse_error(msg, flags)
                acked.add(seq)
                if code:
                    failures.append(MessageFailure(by_seq[seq], code, detail))
        if failures:
            raise RedirectError(
                "nftables refused the batch; nothing was changed "
                "(the previous ruleset and its counters are still in place)",
                failures,
            )
        missing = [by_seq[base + i] for i in range(1, len(messages) + 1) if base + i not in acked]
        if missing:
            raise RedirectError(
                "the kernel did not acknowledge the nftables batch (is nf_tables available?); "
                f"unacknowledged: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
            )
    finally:
        _close_later(sock)


def _apply_blocking(ruleset: Ruleset, netns: str | None) -> None:
    _transact(netns, _encoded_ruleset(ruleset))


async def apply(ruleset: Ruleset, *, netns: str | None = None) -> None:
    """Install ``ruleset``, replacing any table of that name, in one atomic netlink batch.

    Works for a first start, for adopting a table a previous run left behind, and for reloads.
    On failure nothing changes (the previous table, rules and counters stay) and RedirectError
    lists each refused message: which table/chain/rule and the kernel's reason.
    """
    await asyncio.to_thread(_apply_blocking, ruleset, netns)


def _remove_blocking(table: str, netns: str | None) -> bool:
    msg = _Message(f"table {table}", nft.nft_table_msg, nft.NFT_MSG_DELTABLE, 0,
                   (("NFTA_TABLE_NAME", table),))
    try:
        _transact(netns, _encode_messages([msg]))
    except RedirectError as e:
        if e.failures and all(f.errno == errno.ENOENT for f in e.failures):
            return False
        raise
    return True


async def remove(table: str = DEFAULT_TABLE, *, netns: str | None = None) -> bool:
    """Delete the table with all its chains and rules; False if there was none."""
    return await asyncio.to_thread(_remove_blocking, table, netns)


# ---------------------------------------------------------------------------------------------
# reading the live table back


@dataclass(frozen=True)
class LiveChain:
    """A chain as the kernel holds it."""

    name: str
    type: str | None
    hook: str | None
    priority: int | None
    policy: str | None


@dataclass(frozen=True)
class LiveRule:
    """A rule as the kernel holds it: canonical bytecode and its counter."""

    chain: str
    handle: int
    bytecode: tuple[str, ...]
    packets: int | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class LiveRuleset:
    """The enforcer's table as read back over netlink (``exists`` False if there is none)."""

    table: str
    exists: bool
    chains: tuple[LiveChain, ...] = ()
    rules: tuple[LiveRule, ...] = field(default=())

    def rules_of(self, chain: str) -> tuple[LiveRule, ...]:
        """The rules of ``chain`` in order."""
        return tuple(r for r in self.rules if r.chain == chain)

    def render(self) -> str:
        """Chains, rules (bytecode) and counters, for ``enforcer doctor``."""
        if not self.exists:
            return f"table inet {self.table}: not present\n"
        lines = [f"table inet {self.table}"]
        for chain in self.chains:
            lines.append(
                f"  chain {chain.name} (type {chain.type} hook {chain.hook} "
                f"priority {chain.priority}; policy {chain.policy})"
            )
            for rule in self.rules_of(chain.name):
                lines.append(
                    f"    rule handle {rule.handle}: packets {rule.packets} bytes {rule.bytes}"
                )
                lines.extend(f"      [ {b} ]" for b in rule.bytecode)
        return "\n".join(lines) + "\n"


def _raw_attrs(msg: Any) -> list[tuple[str, Any]]:
    """pyroute2's decoded attributes with the raw numbers (not its enum names)."""
    out: list[tuple[str, Any]] = []
    for slot in msg["attrs"]:
        obj = slot.nla
        if getattr(obj, "nla_map", None) and obj.get("attrs") is not None:
            out.append((slot[0], tuple(_raw_attrs(obj))))
        elif "value" in obj and not (isinstance(obj["value"], bytes) and isinstance(slot[1], str)):
            out.append((slot[0], obj["value"]))  # the number, not pyroute2's name for it
        else:
            out.append((slot[0], slot[1]))  # strings (asciiz) decoded
    return out


def _dump(sock: socket.socket, msg_cls: Any, msg_type: int, attrs: Sequence[tuple[str, Any]],
          dump: bool = True) -> list[Any]:
    seq = int.from_bytes(os.urandom(2), "big") | 1
    flags = NLM_F_DUMP if dump else NLM_F_ACK
    sock.send(_encode(msg_cls, msg_type, flags, seq, attrs))
    out: list[Any] = []
    while True:
        datagram = sock.recv(1 << 20)
        for mtype, mflags, mseq, msg in _iter_messages(datagram):
            if mseq != seq:
                continue
            if mtype == _NLMSG_DONE:
                return out
            if mtype == _NLMSG_ERROR:
                code, detail = _parse_error(msg, mflags)
                if code:
                    raise OSError(code, f"{os.strerror(code)}{': ' + detail if detail else ''}")
                return out
            decoded = msg_cls(msg)
            decoded.decode()
            out.append(decoded)  # a plain get answers with one message, then its ack


def _read_blocking(table: str, netns: str | None) -> LiveRuleset:
    sock = _nft_socket(netns)
    try:
        try:
            _dump(sock, nft.nft_table_msg, nft.NFT_MSG_GETTABLE, [("NFTA_TABLE_NAME", table)],
                  dump=False)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return LiveRuleset(table, exists=False)
            raise RedirectError(f"reading table inet {table} failed: {e}") from e
        chains: list[LiveChain] = []
        for c in _dump(sock, nft.nft_chain_msg, nft.NFT_MSG_GETCHAIN, []):
            attrs = _attr_dict(_raw_attrs(c))
            if attrs.get("TABLE") != table:  # the kernel does not filter chain dumps by table
                continue
            hook = attrs.get("HOOK") or {}
            policy = attrs.get("POLICY")
            chains.append(
                LiveChain(
                    name=str(attrs.get("NAME")),
                    type=attrs.get("TYPE"),
                    hook=_HOOK_NAMES.get(hook.get("HOOKNUM", -1)) if hook else None,
                    priority=hook.get("PRIORITY") if hook else None,
                    policy={0: "drop", 1: "accept"}.get(policy) if policy is not None else None,
                )
            )
        rules: list[LiveRule] = []
        for r in _dump(sock, nft.nft_rule_msg, nft.NFT_MSG_GETRULE, [("NFTA_RULE_TABLE", table)]):
            bytecode: list[str] = []
            packets = nbytes = None
            for ex in r.get_attr("NFTA_RULE_EXPRESSIONS") or ():
                name = ex.get_attr("NFTA_EXPR_NAME")
                data = ex.get_attr("NFTA_EXPR_DATA")
                a = _attr_dict(_raw_attrs(data)) if data is not None else {}
                if name == "counter":
                    packets, nbytes = a.get("PACKETS"), a.get("BYTES")
                bytecode.append(_render_expr(str(name), a))
            rules.append(
                LiveRule(
                    chain=str(r.get_attr("NFTA_RULE_CHAIN")),
                    handle=int(r.get_attr("NFTA_RULE_HANDLE") or 0),
                    bytecode=tuple(bytecode),
                    packets=packets,
                    bytes=nbytes,
                )
            )
        return LiveRuleset(table, exists=True, chains=tuple(chains), rules=tuple(rules))
    except OSError as e:
        raise RedirectError(f"reading table inet {table} failed: {e}") from e
    finally:
        sock.close()


async def read_live(table: str = DEFAULT_TABLE, *, netns: str | None = None) -> LiveRuleset:
    """Dump table ``inet <table>`` over netlink: chains, rules as bytecode, counters."""
    return await asyncio.to_thread(_read_blocking, table, netns)


def diff(expected: Ruleset, live: LiveRuleset) -> list[str]:
    """What differs between the intended ruleset and the live table (empty: identical)."""
    if not live.exists:
        return [f"table inet {expected.table} is missing (the redirect is not installed)"]
    out: list[str] = []
    live_chains = {c.name: c for c in live.chains}
    for chain in expected.chains:
        have = live_chains.pop(chain.name, None)
        if have is None:
            out.append(f"chain {chain.name} is missing")
            continue
        want = (chain.type, chain.hook, chain.priority, chain.policy)
        got = (have.type, have.hook, have.priority, have.policy)
        if want != got:
            out.append(
                f"chain {chain.name}: expected type {want[0]} hook {want[1]} priority {want[2]} "
                f"policy {want[3]}, live type {got[0]} hook {got[1]} priority {got[2]} "
                f"policy {got[3]}"
            )
        want_rules = expected.rules_of(chain.name)
        got_rules = live.rules_of(chain.name)
        for i, (w, g) in enumerate(zip(want_rules, got_rules, strict=False), 1):
            if w.bytecode() != g.bytecode:
                out.append(
                    f"chain {chain.name} rule {i} (handle {g.handle}) differs from `{w.text}`: "
                    f"expected [{'; '.join(w.bytecode())}], live [{'; '.join(g.bytecode)}]"
                )
        for i, w in enumerate(want_rules[len(got_rules) :], len(got_rules) + 1):
            out.append(f"chain {chain.name} rule {i} is missing: `{w.text}`")
        for g in got_rules[len(want_rules) :]:
            out.append(
                f"chain {chain.name} has an extra rule (handle {g.handle}): "
                f"[{'; '.join(g.bytecode)}]"
            )
    for name in live_chains:
        out.append(f"chain {name} is not part of the intended ruleset")
    return out


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
