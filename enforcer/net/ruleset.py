"""The enforcer's nftables table as pure data: built from services, rendered as nft text and bytecode.

:func:`build_ruleset` turns services + settings into a :class:`Ruleset`: frozen data that holds
both the nft text (:meth:`Ruleset.render_nft`, for operators) and the netlink bytecode
(:meth:`Ruleset.render_bytecode`, for golden tests). Everything lives in one table the enforcer
owns (``table inet enforcer``: IPv4 and IPv6 together), so deleting it never touches kube-proxy,
Docker or the host firewall. Chains:

- ``prerouting`` (nat, priority -101 = dstnat - 1, so it wins against kube-proxy/iptables-nft
  NAT chains at -100 whatever order they were registered in):
  ``fib daddr type local tcp dport P counter redirect to :L``. ``fib daddr type local`` keeps
  forwarded traffic (containers, pods behind this host) out of the redirect.
- ``output`` (nat, -101): first ``meta mark M counter return`` (the enforcer's own sockets carry
  ``SO_MARK`` M, see :func:`enforcer.net.sockopt.mark_socket`), then the same redirect, for
  connections to *local* addresses only, so the enforcer's calls to an IdP on 443 elsewhere
  never loop back.
- ``input`` (filter, priority 0): ``iifname != "lo" tcp dport A counter reject with tcp reset``
  per app port (v4 and v6: the table is ``inet``).
- kubelet probes (pod mode, :class:`ProbeTarget`): first in ``prerouting``,
  ``ip saddr S tcp dport A counter redirect to :G`` (``ip6 saddr`` for IPv6) for a blocked app
  port A that has an HTTP probe: the one address S the node uses towards the pod reaches the probe
  gate on ``settings.probe_port`` G instead of the app (the NAT runs before the input chain, so the
  reject of A never sees it); everything else to A is still reset.

No system access here: :mod:`enforcer.net.nftables` sends a ruleset to the kernel.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from enforcer.errors import EnforcerError, Reason

DEFAULT_TABLE = "enforcer"
DEFAULT_MARK = 0x204E
"""``SO_MARK`` of the enforcer's own outgoing sockets: bits that no common node network uses
(Kubernetes' KUBE-MARK-MASQ 0x4000 and KUBE-MARK-DROP 0x8000, Cilium's 0x0F00, Calico's 0xFFFF0000);
pick another one if your CNI uses it."""
NAT_PRIORITY = -101
"""dstnat - 1: iptables-nft / kube-proxy NAT chains sit at -100; at equal priority the most
recently registered chain runs first, and every atomic replace re-registers ours."""
FILTER_PRIORITY = 0

FAMILY_INET = 1  # NFPROTO_INET
_HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
_HOOK_NAMES = {v: k for k, v in _HOOKS.items()}
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
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
    probe: bool = False
    """A kubelet probe's redirect to the probe gate (not an exposed port)."""

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
class ProbeTarget:
    """A blocked app port that the node's kubelet probes over plain HTTP (pod mode).

    ``source``: the one address the node's connections to the pod come from (its route's
    preferred source); connections from it to ``app_port`` go to the probe gate."""

    app_port: int
    source: str


@dataclass(frozen=True)
class RedirectSettings:
    """Where redirected traffic goes and how the table is set up."""

    listen_port: int
    table: str = DEFAULT_TABLE
    mark: int = DEFAULT_MARK
    block_app_port: bool = True
    nat_priority: int = NAT_PRIORITY
    filter_priority: int = FILTER_PRIORITY
    probe_port: int | None = None
    """The probe gate's port (pod mode): where :class:`ProbeTarget` connections are redirected."""


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


def _saddr(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[Expr, ...]:
    if address.version == 4:
        return (
            _meta(_META_NFPROTO),
            _cmp(_CMP_EQ, bytes([socket.AF_INET])),
            _payload(_PAYLOAD_NETWORK, 12, 4),
            _cmp(_CMP_EQ, address.packed),
        )
    return (
        _meta(_META_NFPROTO),
        _cmp(_CMP_EQ, bytes([socket.AF_INET6])),
        _payload(_PAYLOAD_NETWORK, 8, 16),
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


def _address(what: str, text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise ValueError(f"{what}: address {text!r} is not an IPv4 or IPv6 address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def build_ruleset(
    services: Sequence[RedirectTarget], settings: RedirectSettings, probes: Sequence[ProbeTarget] = ()
) -> Ruleset:
    """The table that redirects every service's exposed port to ``settings.listen_port``.

    Pure: no system access. Services sharing an exposed port (and addresses) share a rule; the
    rule remembers their names. Raises ValueError for a port out of range, a mark of 0, a table
    name nft cannot hold, an address that is not an IP, or an exposed/app port equal to the
    listener's port (the redirect or the block would then hit the listener itself).

    ``probes``: kubelet HTTP probes of blocked app ports (pod mode), redirected from their source
    to ``settings.probe_port`` (required with probes; it must differ from the listener's port and
    from every exposed and app port). A probe of a port that is not blocked gets no rule: nothing
    stops the kubelet there.
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
        keys: list[ipaddress.IPv4Address | ipaddress.IPv6Address | None] = [
            _address(f"service {target.name}", text) for text in target.addresses
        ]
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

    probe_rules = _probe_rules(probes, settings, listen, blocks, {port for port, _ in redirects})
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
    rules = [*probe_rules]
    rules.extend(Rule("prerouting", t, e, n) for t, e, n in redirect_rules)
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


def _probe_rules(
    probes: Sequence[ProbeTarget], settings: RedirectSettings, listen: int,
    blocks: Mapping[int, Sequence[str]], exposed: set[int],
) -> list[Rule]:
    """The ``prerouting`` rules that send each probe's source to the probe gate."""
    if not probes:
        return []
    if settings.probe_port is None:
        raise ValueError("probes need a probe_port (the probe gate's port)")
    gate = _check_port("probe_port", settings.probe_port)
    if gate == listen or gate in exposed or gate in blocks:
        raise ValueError(
            f"probe_port {gate} is the listener's port, an exposed port or an app port; "
            "choose another one"
        )
    seen: dict[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address], None] = {}
    for probe in probes:
        port = _check_port("probe app_port", probe.app_port)
        if port in blocks:
            seen.setdefault((port, _address(f"probe of port {port}", probe.source)), None)
    rules = []
    for port, source in seen:
        family = "ip" if source.version == 4 else "ip6"
        rules.append(
            Rule(
                "prerouting",
                f"{family} saddr {source} tcp dport {port} counter redirect to :{gate}",
                (*_saddr(source), *_tcp_dport(port), _counter(), *_redirect(gate)),
                (f"kubelet probes of {', '.join(blocks[port])}",),
                probe=True,
            )
        )
    return rules


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
# failures to install a ruleset (raised by enforcer.net.nftables; here so that catching them
# does not load pyroute2)


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


class RedirectError(EnforcerError):
    """Programming netfilter failed; ``failures`` names each refused message and why."""

    def __init__(self, message: str, failures: Sequence[MessageFailure] = ()) -> None:
        self.failures = tuple(failures)
        if self.failures:
            message += "\n" + "\n".join(f"  - {f}" for f in self.failures)
        super().__init__(Reason.REDIRECT_ERROR, 500, message)
