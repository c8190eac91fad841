"""Program and read back the enforcer's nftables table over netlink: the only pyroute2 user.

* :func:`apply` sends ``add table; delete table; add table; chains; rules`` as **one** nfnetlink
  batch: the kernel swaps the whole table atomically, or, if any message fails, changes nothing
  (previous rules and counters stay). Every message carries ``NLM_F_ACK``; the answers are read
  back per sequence number, so :class:`RedirectError` says which table/chain/rule failed and why.
  NAT is decided per connection, so established connections keep flowing across a replace.
* Fail closed: the table is not owner-bound (no ``NFT_TABLE_F_OWNER``), so a crashed daemon leaves
  it in place: the exposed port then redirects to a closed listener (connection refused) and the
  app port stays blocked. :func:`remove` deletes it on a clean stop;
  :meth:`enforcer.net.ruleset.Ruleset.block_only` is the "keep the port block" variant.
* :func:`read_live` dumps the table back over netlink (with counters); :func:`diff` compares it
  with what :func:`enforcer.net.ruleset.build_ruleset` intended, bytecode against bytecode.

Why not pyroute2's ``NFTables.rule(...)``/``begin()``/``commit()``: each call is its own
transaction and ``commit()`` never reads the acks. pyroute2 encodes and decodes the messages here
(``nft_*_msg``); the batch goes out in one ``send()`` on a plain netlink socket. The kernel runs
the whole batch inside that ``send()``, so every answer is queued when it returns: reading until
``EAGAIN`` collects all of them without timeouts.

Needs CAP_NET_ADMIN, CAP_SYS_ADMIN too for another namespace, Linux >= 5.2 (NAT in ``inet``
tables; Debian 12's 6.1 is fine). On module-built kernels the nf_tables modules autoload for root
in the initial user namespace only; preload them for user-namespaced containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from enforcer.net.netns import run_in_netns
from enforcer.net.ruleset import (
    _HOOK_NAMES,
    _HOOKS,
    DEFAULT_TABLE,
    FAMILY_INET,
    Expr,
    MessageFailure,
    RedirectError,
    Rule,
    Ruleset,
    Value,
    _attr_dict,
    _render_expr,
)

# pyroute2 warns at import about /proc/net/psched when ProcSubset=pid hides it (systemd
# hardening); we use no tc, so its warnings are noise in the journal. (Its own logging set-up
# resets the "pyroute2" logger's level when imported, so the level goes on the tc module's logger.)
logging.getLogger("pyroute2.netlink.rtnl.tcmsg.common").setLevel(logging.ERROR)

from pyroute2.netlink import (  # noqa: E402
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_REQUEST,
)
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg  # noqa: E402
from pyroute2.netlink.nfnetlink import nftsocket as nft  # noqa: E402

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
_NETLINK_NETFILTER = 12

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

    def render_nft(self, known: Ruleset | None = None) -> str:
        """The live table in nft syntax (as ``nft list table`` prints it), for ``enforcer doctor``.

        A rule whose bytecode is one of ``known``'s rules (the intended ruleset) is written as
        that rule's text, its counter filled in (``counter packets N bytes M``); any other rule
        as a comment with its handle and bytecode (no nft text can be trusted for it)."""
        if not self.exists:
            return f"# table inet {self.table}: not present\n"
        texts: dict[tuple[str, tuple[str, ...]], Rule] = {}
        for rule in known.rules if known is not None else ():
            texts.setdefault((rule.chain, rule.bytecode()), rule)
        lines = [f"table inet {self.table} {{"]
        for i, chain in enumerate(self.chains):
            if i:
                lines.append("")
            lines.append(f"\tchain {chain.name} {{")
            if chain.type is not None:
                lines.append(
                    f"\t\ttype {chain.type} hook {chain.hook} priority {chain.priority}; policy {chain.policy};"
                )
            for live in self.rules_of(chain.name):
                known_rule = texts.get((chain.name, live.bytecode))
                if known_rule is None:
                    lines.append(f"\t\t# handle {live.handle}, not from this configuration: "
                                 f"[ {' ; '.join(live.bytecode)} ] packets {live.packets} bytes {live.bytes}")
                    continue
                text = known_rule.text
                if live.packets is not None and " counter" in f" {text}":
                    text = text.replace("counter", f"counter packets {live.packets} bytes {live.bytes}", 1)
                services = known_rule.services
                note = f" # handle {live.handle}" + (f", {', '.join(services)}" if services else "")
                lines.append(f"\t\t{text}{note}")
            lines.append("\t}")
        lines.append("}")
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


