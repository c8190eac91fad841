"""The nftables redirect: golden rulesets without root; real traffic in namespaces with root.

Root tests build a "client host" and an "app host" (two network namespaces joined by a veth, test
addresses 10.99.0.0/24 and fd00:99::/64 only inside them), apply the ruleset in the app namespace
through the real netlink code path and send real TCP traffic. Without root they skip locally and
fail with CI=true.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import itertools
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enforcer.http.tls import make_listen_socket
from enforcer.net import netns as netns_mod
from enforcer.net import nftables, ruleset, sockopt
from enforcer.net.nftables import LiveRule, LiveRuleset, diff
from enforcer.net.ruleset import (
    ProbeTarget,
    RedirectError,
    RedirectSettings,
    RedirectTarget,
    Rule,
    build_ruleset,
)
from enforcer.net.sockopt import parse_original_dst
from tests.harness.netns import Hosts, connect, require_root, veth_hosts

REPO = Path(__file__).resolve().parents[1]
APP4, CLI4 = "10.99.0.1", "10.99.0.2"
APP6, CLI6 = "fd00:99::1", "fd00:99::2"
LISTEN = 15443
APP_PORT = 8080
SETTINGS = RedirectSettings(listen_port=LISTEN)
TARGETS = (RedirectTarget("private-app", 443, APP_PORT),)

# ---------------------------------------------------------------------------------------------
# golden tests (no root)

SAMPLE_NFT = """\
table inet enforcer {
	chain prerouting {
		type nat hook prerouting priority -101; policy accept;
		fib daddr type local tcp dport 443 counter redirect to :15443  # private-app, grafana
		fib daddr type local ip daddr 10.99.0.1 tcp dport 8443 counter redirect to :15443  # wiki
		fib daddr type local ip6 daddr fd00:99::1 tcp dport 8443 counter redirect to :15443  # wiki
	}

	chain output {
		type nat hook output priority -101; policy accept;
		meta mark 0x0000204e counter return  # enforcer's own sockets
		fib daddr type local tcp dport 443 counter redirect to :15443  # private-app, grafana
		fib daddr type local ip daddr 10.99.0.1 tcp dport 8443 counter redirect to :15443  # wiki
		fib daddr type local ip6 daddr fd00:99::1 tcp dport 8443 counter redirect to :15443  # wiki
	}

	chain input {
		type filter hook input priority 0; policy accept;
		iifname != "lo" tcp dport 8080 counter reject with tcp reset  # private-app
		iifname != "lo" tcp dport 3000 counter reject with tcp reset  # grafana
	}
}
"""

SAMPLE_TARGETS = (
    RedirectTarget("private-app", 443, 8080),
    RedirectTarget("grafana", 443, 3000),
    RedirectTarget("wiki", 8443, None, ("10.99.0.1", "[fd00:99::1]")),
)

ONE_SERVICE_BYTECODE = """\
inet enforcer prerouting: fib daddr type local tcp dport 443 counter redirect to :15443
  [ fib daddr type => reg 1 ]
  [ cmp eq reg 1 0x02000000 ]
  [ meta load l4proto => reg 1 ]
  [ cmp eq reg 1 0x06 ]
  [ payload load 2b @ transport header + 2 => reg 1 ]
  [ cmp eq reg 1 0x01bb ]
  [ counter ]
  [ immediate reg 1 0x3c53 ]
  [ redir proto_min reg 1 proto_max reg 1 flags 0x2 ]
inet enforcer output: meta mark 0x0000204e counter return
  [ meta load mark => reg 1 ]
  [ cmp eq reg 1 0x4e200000 ]
  [ counter ]
  [ immediate reg 0 return ]
inet enforcer output: fib daddr type local tcp dport 443 counter redirect to :15443
  [ fib daddr type => reg 1 ]
  [ cmp eq reg 1 0x02000000 ]
  [ meta load l4proto => reg 1 ]
  [ cmp eq reg 1 0x06 ]
  [ payload load 2b @ transport header + 2 => reg 1 ]
  [ cmp eq reg 1 0x01bb ]
  [ counter ]
  [ immediate reg 1 0x3c53 ]
  [ redir proto_min reg 1 proto_max reg 1 flags 0x2 ]
inet enforcer input: iifname != "lo" tcp dport 8080 counter reject with tcp reset
  [ meta load iifname => reg 1 ]
  [ cmp neq reg 1 0x6c6f0000000000000000000000000000 ]
  [ meta load l4proto => reg 1 ]
  [ cmp eq reg 1 0x06 ]
  [ payload load 2b @ transport header + 2 => reg 1 ]
  [ cmp eq reg 1 0x1f90 ]
  [ counter ]
  [ reject type 1 code 0 ]
"""


def test_render_nft_golden() -> None:
    """Two services sharing 443 plus one bound to addresses render to the expected nft text."""
    assert build_ruleset(SAMPLE_TARGETS, SETTINGS).render_nft() == SAMPLE_NFT


def test_render_bytecode_golden() -> None:
    """A one-service ruleset's netlink expressions match nft's own bytecode for those rules."""
    assert build_ruleset(TARGETS, SETTINGS).render_bytecode() == ONE_SERVICE_BYTECODE


def test_build_is_pure_and_deterministic() -> None:
    """Building twice gives equal, hashable frozen data."""
    a = build_ruleset(SAMPLE_TARGETS, SETTINGS)
    b = build_ruleset(SAMPLE_TARGETS, SETTINGS)
    assert a == b
    assert hash(a) == hash(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.table = "x"  # type: ignore[misc]


def test_block_can_be_disabled() -> None:
    """block_app_port=False (or app_port=None) leaves out the input chain entirely."""
    rs = build_ruleset(TARGETS, dataclasses.replace(SETTINGS, block_app_port=False))
    assert [c.name for c in rs.chains] == ["prerouting", "output"]
    rs = build_ruleset([RedirectTarget("remote", 443, None)], SETTINGS)
    assert "input" not in rs.render_nft()


def test_block_only_keeps_just_the_port_block() -> None:
    """block_only() is the input chain alone, for a stop that keeps the app port blocked."""
    rs = build_ruleset(SAMPLE_TARGETS, SETTINGS).block_only()
    assert [c.name for c in rs.chains] == ["input"]
    assert all(r.chain == "input" for r in rs.rules)
    assert len(rs.rules) == 2


def test_custom_table_mark_and_priorities() -> None:
    """Table name, mark and priorities come from the settings."""
    rs = build_ruleset(
        TARGETS,
        RedirectSettings(listen_port=9443, table="enf_test", mark=0x1234, nat_priority=-150),
    )
    text = rs.render_nft()
    assert text.startswith("table inet enf_test {")
    assert "meta mark 0x00001234 counter return" in text
    assert "type nat hook prerouting priority -150;" in text
    assert "redirect to :9443" in text


@pytest.mark.parametrize(
    ("targets", "settings", "message"),
    [
        ([RedirectTarget("a", 0, 8080)], SETTINGS, "exposed_port: 0 is not a TCP port"),
        ([RedirectTarget("a", 443, 70000)], SETTINGS, "app_port: 70000 is not a TCP port"),
        ([RedirectTarget("a", 443, 8080)], RedirectSettings(listen_port=0), "listen_port"),
        ([RedirectTarget("a", LISTEN, 8080)], SETTINGS, "listener's own port"),
        ([RedirectTarget("a", 443, LISTEN)], SETTINGS, "would block the enforcer"),
        ([RedirectTarget("a", 443, 8080, ("app.example",))], SETTINGS, "not an IPv4 or IPv6"),
        ([], RedirectSettings(listen_port=1, mark=0), "non-zero 32-bit"),
        ([], RedirectSettings(listen_port=1, table="bad name"), "not a valid nftables name"),
    ],
)
def test_build_rejects_bad_input(
    targets: list[RedirectTarget], settings: RedirectSettings, message: str
) -> None:
    """Invalid ports, marks, names and addresses raise ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=re.escape(message)):
        build_ruleset(targets, settings)


def test_v4_mapped_address_becomes_ipv4() -> None:
    """An address given as ::ffff:a.b.c.d is matched as plain IPv4."""
    rs = build_ruleset([RedirectTarget("a", 443, None, ("::ffff:10.99.0.1",))], SETTINGS)
    assert "ip daddr 10.99.0.1 tcp dport 443" in rs.render_nft()


def test_batch_replaces_the_table_in_one_transaction() -> None:
    """The batch is add table, delete table, add table, then every chain and rule, named."""
    rs = build_ruleset(TARGETS, SETTINGS)
    msgs = nftables._batch_messages(rs)
    assert [m.what.split(" (")[0] for m in msgs[:3]] == ["table enforcer"] * 3
    assert len(msgs) == 3 + len(rs.chains) + len(rs.rules)
    assert msgs[-1].what.startswith("rule #4 in enforcer/input (iifname")


def test_parse_original_dst_v4_and_v6() -> None:
    """sockaddr_in and sockaddr_in6 from SO_ORIGINAL_DST decode to (address, port)."""
    v4 = socket.AF_INET.to_bytes(2, sys.byteorder) + (443).to_bytes(2, "big")
    v4 += socket.inet_aton("10.99.0.1") + bytes(8)
    assert parse_original_dst(v4) == ("10.99.0.1", 443)
    v6 = socket.AF_INET6.to_bytes(2, sys.byteorder) + (8443).to_bytes(2, "big") + bytes(4)
    v6 += socket.inet_pton(socket.AF_INET6, "fd00:99::1") + bytes(4)
    assert parse_original_dst(v6) == ("fd00:99::1", 8443)


def _as_live(rs: ruleset.Ruleset) -> LiveRuleset:
    return LiveRuleset(
        rs.table,
        True,
        tuple(nftables.LiveChain(c.name, c.type, c.hook, c.priority, c.policy) for c in rs.chains),
        tuple(LiveRule(r.chain, i, r.bytecode(), 0, 0) for i, r in enumerate(rs.rules, 1)),
    )


def test_diff_reports_what_differs() -> None:
    """diff is empty for an identical table and names missing tables, chains and rules."""
    rs = build_ruleset(TARGETS, SETTINGS)
    live = _as_live(rs)
    assert diff(rs, live) == []
    assert diff(rs, LiveRuleset("enforcer", False)) == [
        "table inet enforcer is missing (the redirect is not installed)"
    ]
    fewer = dataclasses.replace(live, rules=live.rules[:-1])
    assert diff(rs, fewer) == [
        'chain input rule 1 is missing: `iifname != "lo" tcp dport 8080 counter reject with '
        "tcp reset`"
    ]
    other = build_ruleset([RedirectTarget("x", 444, APP_PORT)], SETTINGS)
    problems = diff(rs, _as_live(other))
    assert len(problems) == 2
    assert problems[0].startswith("chain prerouting rule 1 (handle 1) differs")


def test_run_in_netns_never_creates_a_namespace() -> None:
    """A missing namespace name raises FileNotFoundError instead of being created."""
    name = f"enforcer-missing-{os.getpid()}"
    with pytest.raises(FileNotFoundError):
        netns_mod.run_in_netns(name, lambda: None)
    assert not Path("/run/netns", name).exists()


# ---------------------------------------------------------------------------------------------
# namespaces (root)


_ns_counter = itertools.count()


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Two fresh namespaces with v4 and v6 addresses, deleted afterwards even on failure."""
    require_root()
    n = next(_ns_counter)
    with veth_hosts(
        f"enfc-{os.getpid()}-{n}", f"enfa-{os.getpid()}-{n}", app4=APP4, cli4=CLI4, app6=APP6, cli6=CLI6
    ) as h:
        yield h


def _fmt(addr: tuple[str, int] | None) -> str:
    if addr is None:
        return "-"
    host = addr[0].removeprefix("::ffff:") if "." in addr[0] else addr[0]
    return f"{host}:{addr[1]}"


class Server:
    """A TCP server in a namespace: greets with '<tag> <original dst> <local addr>', then echoes."""

    def __init__(self, netns: str, port: int, tag: str) -> None:
        self.tag = tag
        self.accepted = 0
        self.redirected: list[tuple[str, int] | None] = []
        self.sock = netns_mod.run_in_netns(netns, make_listen_socket, "::", port)
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            self.accepted += 1
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(5)
            self.redirected.append(sockopt.redirected_destination(conn))
            orig = sockopt.original_destination(conn)
            conn.sendall(f"{self.tag} {_fmt(orig)} {_fmt(conn.getsockname()[:2])}\n".encode())
            while not self._stop.is_set() and (data := conn.recv(1024)):
                conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for t in self._threads:
            t.join(5)
        self.sock.close()


@contextlib.contextmanager
def serving(netns: str, port: int, tag: str) -> Iterator[Server]:
    """A Server for the duration of a with block."""
    server = Server(netns, port, tag)
    try:
        yield server
    finally:
        server.close()


def _open(netns: str, host: str, port: int, mark: int | None = None) -> socket.socket:
    return connect(netns, host, port, mark=mark, timeout=3)


def _readline(s: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(1024)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def hello(netns: str, host: str, port: int, mark: int | None = None) -> str:
    """Connect from ``netns`` and return the server's greeting (ConnectionRefusedError if none)."""
    with _open(netns, host, port, mark) as s:
        return _readline(s)


def refused(netns: str, host: str, port: int) -> bool:
    """True if a connection from ``netns`` is refused (TCP RST)."""
    try:
        hello(netns, host, port)
    except ConnectionRefusedError:
        return True
    return False


async def _apply(h: Hosts, targets: tuple[RedirectTarget, ...] = TARGETS) -> ruleset.Ruleset:
    rs = build_ruleset(targets, SETTINGS)
    await nftables.apply(rs, netns=h.app)
    return rs


@pytest.mark.root
async def test_exposed_port_lands_on_listener_v4_v6(hosts: Hosts) -> None:
    """client -> app:443 (v4 and v6) reaches the listener, which reads app:443 as original dst."""
    await _apply(hosts)
    with serving(hosts.app, LISTEN, "enforcer") as listener:
        assert hello(hosts.cli, APP4, 443) == f"enforcer {APP4}:443 {APP4}:{LISTEN}"
        assert hello(hosts.cli, APP6, 443) == f"enforcer {APP6}:443 {APP6}:{LISTEN}"
        assert listener.redirected == [(APP4, 443), (APP6, 443)]
        # a direct connection to the listener port is not a redirected one
        assert hello(hosts.cli, APP4, LISTEN) == f"enforcer {APP4}:{LISTEN} {APP4}:{LISTEN}"
        assert listener.redirected[-1] is None


@pytest.mark.root
async def test_app_port_refused_from_client_open_on_loopback(hosts: Hosts) -> None:
    """The app port is refused from the client (v4, v6) but reachable from inside the app host."""
    with serving(hosts.app, APP_PORT, "app") as app:
        assert hello(hosts.cli, APP4, APP_PORT).startswith("app ")  # reachable before
        await _apply(hosts)
        assert refused(hosts.cli, APP4, APP_PORT)
        assert refused(hosts.cli, APP6, APP_PORT)
        for host in ("127.0.0.1", "::1", APP4, APP6):
            assert hello(hosts.app, host, APP_PORT).startswith("app "), host
        assert app.accepted == 5


@pytest.mark.root
async def test_local_connection_to_exposed_port_is_redirected(hosts: Hosts) -> None:
    """A process on the app host connecting to its own address on 443 lands on the listener."""
    await _apply(hosts)
    with serving(hosts.app, LISTEN, "enforcer"):
        assert hello(hosts.app, APP4, 443) == f"enforcer {APP4}:443 127.0.0.1:{LISTEN}"
        assert hello(hosts.app, APP6, 443) == f"enforcer {APP6}:443 ::1:{LISTEN}"
        assert hello(hosts.app, "127.0.0.1", 443) == f"enforcer 127.0.0.1:443 127.0.0.1:{LISTEN}"


@pytest.mark.root
async def test_enforcer_marked_socket_is_not_redirected(hosts: Hosts) -> None:
    """A socket with the enforcer's mark reaches a real server on 443 (an IdP), others do not."""
    await _apply(hosts)
    with serving(hosts.app, LISTEN, "enforcer"), serving(hosts.app, 443, "idp"):
        assert hello(hosts.app, APP4, 443, mark=SETTINGS.mark).startswith("idp ")
        assert hello(hosts.app, APP6, 443, mark=SETTINGS.mark).startswith("idp ")
        assert hello(hosts.app, APP4, 443).startswith("enforcer ")
        assert hello(hosts.app, APP4, 443, mark=SETTINGS.mark + 1).startswith("enforcer ")


LISTENER_SCRIPT = """
import sys
from enforcer.http.tls import make_listen_socket
from enforcer.net.sockopt import original_destination
s = make_listen_socket("::", int(sys.argv[1]))
s.setblocking(True)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    o = original_destination(c)
    c.sendall(("proc %s:%d\\n" % (o[0].removeprefix("::ffff:"), o[1])).encode())
    c.close()
"""


@pytest.mark.root
async def test_kill_9_fails_closed(hosts: Hosts) -> None:
    """After the listener process dies (-9) the exposed port refuses and the app stays blocked."""
    await _apply(hosts)
    with serving(hosts.app, APP_PORT, "app") as app:
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", hosts.app, sys.executable, "-c", LISTENER_SCRIPT, str(LISTEN),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == b"ready"
            assert hello(hosts.cli, APP4, 443) == f"proc {APP4}:443"
            assert hello(hosts.cli, APP6, 443) == f"proc {APP6}:443"
        finally:
            proc.kill()  # SIGKILL
            await asyncio.wait_for(proc.wait(), 10)
        for host in (APP4, APP6):
            assert refused(hosts.cli, host, 443)
            assert refused(hosts.cli, host, APP_PORT)
        assert app.accepted == 0
        live = await nftables.read_live(netns=hosts.app)
        assert diff(build_ruleset(TARGETS, SETTINGS), live) == []


@pytest.mark.root
async def test_reapply_is_atomic_and_keeps_connections(hosts: Hosts) -> None:
    """Re-applying (same or changed rules) replaces the table; an open connection keeps working."""
    rs = await _apply(hosts)
    with serving(hosts.app, LISTEN, "enforcer"):
        conn = _open(hosts.cli, APP4, 443)
        with conn:
            assert _readline(conn).startswith(f"enforcer {APP4}:443")
            changed = (*TARGETS, RedirectTarget("wiki", 8443, 3000))
            for targets in (TARGETS, changed, TARGETS, changed):
                rs = await _apply(hosts, targets)
                conn.sendall(b"ping\n")
                assert _readline(conn) == "ping"
                assert diff(rs, await nftables.read_live(netns=hosts.app)) == []
        assert hello(hosts.cli, APP6, 8443) == f"enforcer {APP6}:8443 {APP6}:{LISTEN}"


@pytest.mark.root
@pytest.mark.parametrize(
    ("chain", "statement", "reason"),
    [
        ("missing", "redirect", errno.ENOENT),  # a chain that does not exist
        ("input", "redirect", errno.EOPNOTSUPP),  # NAT in a filter chain
    ],
)
async def test_broken_batch_changes_nothing(
    hosts: Hosts, chain: str, statement: str, reason: int
) -> None:
    """One bad rule makes apply raise RedirectError naming it; rules and counters stay unchanged."""
    rs = await _apply(hosts)
    with serving(hosts.app, LISTEN, "enforcer"):
        hello(hosts.cli, APP4, 443)
    before = await nftables.read_live(netns=hosts.app)
    assert before.rules_of("prerouting")[0].packets
    bad_rule = Rule(chain, f"broken {statement}", rs.rules_of("prerouting")[0].exprs)
    broken = dataclasses.replace(rs, rules=(*rs.rules, bad_rule))
    with pytest.raises(RedirectError) as caught:
        await nftables.apply(broken, netns=hosts.app)
    assert [f.errno for f in caught.value.failures] == [reason]
    assert f"rule #5 in enforcer/{chain} (broken {statement})" in str(caught.value)
    assert "nothing was changed" in str(caught.value)
    assert await nftables.read_live(netns=hosts.app) == before


@pytest.mark.root
async def test_remove_deletes_the_table(hosts: Hosts) -> None:
    """remove() deletes the table (the app port opens again); a second remove reports nothing."""
    await _apply(hosts)
    assert await nftables.remove(netns=hosts.app) is True
    assert (await nftables.read_live(netns=hosts.app)).exists is False
    assert await nftables.remove(netns=hosts.app) is False
    with serving(hosts.app, APP_PORT, "app"):
        assert hello(hosts.cli, APP4, APP_PORT).startswith("app ")


@pytest.mark.root
async def test_two_services_told_apart_by_original_destination(hosts: Hosts) -> None:
    """Services on different ports/addresses are redirected only for their own destination."""
    targets = (
        RedirectTarget("a", 443, APP_PORT),
        RedirectTarget("b", 8443, 3000, (APP6,)),
    )
    await _apply(hosts, targets)
    with serving(hosts.app, LISTEN, "enforcer") as listener:
        assert hello(hosts.cli, APP4, 443).startswith(f"enforcer {APP4}:443 ")
        assert hello(hosts.cli, APP6, 8443).startswith(f"enforcer {APP6}:8443 ")
        assert refused(hosts.cli, APP4, 8443)  # b is bound to its v6 address only
        assert listener.redirected == [(APP4, 443), (APP6, 8443)]


@pytest.mark.root
async def test_live_table_matches_nft_and_counts(hosts: Hosts) -> None:
    """read_live shows the rules with counters, and the nft binary agrees with render_nft."""
    rs = await _apply(hosts, SAMPLE_TARGETS)
    with serving(hosts.app, LISTEN, "enforcer"):
        hello(hosts.cli, APP4, 443)
        hello(hosts.cli, APP6, 443)
    live = await nftables.read_live(netns=hosts.app)
    assert diff(rs, live) == []
    first = live.rules_of("prerouting")[0]
    assert first.packets == 2
    assert first.bytes
    assert "packets 2" in live.render()
    if shutil.which("nft") is None:
        if os.environ.get("CI"):
            pytest.fail("nft binary missing in CI (scripts/setup installs nftables)")
        return
    out = subprocess.run(
        ["ip", "netns", "exec", hosts.app, "nft", "list", "table", "inet", "enforcer"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip

    def statements(text: str) -> list[str]:
        lines = [re.sub(r"\s*#.*$", "", line).strip() for line in text.splitlines()]
        lines = [re.sub(r"counter packets \d+ bytes \d+", "counter", line) for line in lines]
        return [line for line in lines if line and not line.startswith(("table", "chain", "type"))]

    assert statements(out) == statements(rs.render_nft())


@pytest.mark.root
async def test_apply_time(hosts: Hosts) -> None:
    """The median of 20 atomic replaces of a realistic ruleset stays well under 250 ms."""
    rs = build_ruleset(SAMPLE_TARGETS, SETTINGS)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        await nftables.apply(rs, netns=hosts.app)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"apply median over 20: {median * 1000:.1f} ms")
    assert median < 0.25


# ---------------------------------------------------------------------------------------------
# more golden tests (no root)


def test_a_service_named_twice_gets_one_rule_and_one_comment() -> None:
    """A repeated address or a repeated service object adds no second rule and no second name."""
    once = build_ruleset((RedirectTarget("wiki", 8443, 3000, ("10.99.0.1",)),), SETTINGS)
    twice = build_ruleset(
        (RedirectTarget("wiki", 8443, 3000, ("10.99.0.1", "10.99.0.1")),
         RedirectTarget("wiki", 8443, 3000, ("10.99.0.1",))),
        SETTINGS,
    )
    assert twice.render_nft() == once.render_nft()
    assert "# wiki, wiki" not in twice.render_nft()


@pytest.mark.parametrize(("name", "attrs", "text"), [
    ("immediate", {"DREG": 0}, "immediate reg 0 ?"),
    ("immediate", {"DREG": 0, "DATA": {"VERDICT": {"CODE": -3, "CHAIN": "other"}}}, "immediate reg 0 jump other"),
    ("lookup", {"SET": "blocked", "SREG": 1, "KEY": b"\x01\x02"}, "lookup key=0102 set=blocked sreg=1"),
    ("notrack", {}, "notrack"),
])
def test_render_of_expressions_read_back_from_the_kernel(name: str, attrs: dict[str, object], text: str) -> None:
    """Expressions enforcer never writes (a jump someone added, an unknown kind) still render readably for diff."""
    assert ruleset._render_expr(name, attrs) == text


def test_pyroute2s_tc_warnings_stay_out_of_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """pyroute2 warns about tc at import when /proc/net/psched is hidden (systemd's ProcSubset=pid); we use no tc, so it is silenced."""
    import logging  # noqa: PLC0415

    from enforcer.net import nftables  # noqa: PLC0415, F401  (the import sets it up)

    tc = logging.getLogger("pyroute2.netlink.rtnl.tcmsg.common")
    with caplog.at_level(logging.DEBUG):
        tc.warning("tcmsg: [Errno 2] No such file or directory: '/proc/net/psched'")
    assert "tcmsg" not in caplog.text


# ---------------------------------------------------------------------------------------------
# kubelet probes of a blocked app port (pod mode)

PROBE_PORT = 15021
PROBE_SETTINGS = dataclasses.replace(SETTINGS, probe_port=PROBE_PORT)

PROBE_NFT = """\
table inet enforcer {
	chain prerouting {
		type nat hook prerouting priority -101; policy accept;
		ip saddr 10.244.0.1 tcp dport 8080 counter redirect to :15021  # kubelet probes of private-app
		ip6 saddr fd00:244::1 tcp dport 8080 counter redirect to :15021  # kubelet probes of private-app
		fib daddr type local tcp dport 443 counter redirect to :15443  # private-app
	}

	chain output {
		type nat hook output priority -101; policy accept;
		meta mark 0x0000204e counter return  # enforcer's own sockets
		fib daddr type local tcp dport 443 counter redirect to :15443  # private-app
	}

	chain input {
		type filter hook input priority 0; policy accept;
		iifname != "lo" tcp dport 8080 counter reject with tcp reset  # private-app
	}
}
"""

PROBE_BYTECODE = """\
inet enforcer prerouting: ip saddr 10.244.0.1 tcp dport 8080 counter redirect to :15021
  [ meta load nfproto => reg 1 ]
  [ cmp eq reg 1 0x02 ]
  [ payload load 4b @ network header + 12 => reg 1 ]
  [ cmp eq reg 1 0x0af40001 ]
  [ meta load l4proto => reg 1 ]
  [ cmp eq reg 1 0x06 ]
  [ payload load 2b @ transport header + 2 => reg 1 ]
  [ cmp eq reg 1 0x1f90 ]
  [ counter ]
  [ immediate reg 1 0x3aad ]
  [ redir proto_min reg 1 proto_max reg 1 flags 0x2 ]
inet enforcer prerouting: ip6 saddr fd00:244::1 tcp dport 8080 counter redirect to :15021
  [ meta load nfproto => reg 1 ]
  [ cmp eq reg 1 0x0a ]
  [ payload load 16b @ network header + 8 => reg 1 ]
  [ cmp eq reg 1 0xfd000244000000000000000000000001 ]
  [ meta load l4proto => reg 1 ]
  [ cmp eq reg 1 0x06 ]
  [ payload load 2b @ transport header + 2 => reg 1 ]
  [ cmp eq reg 1 0x1f90 ]
  [ counter ]
  [ immediate reg 1 0x3aad ]
  [ redir proto_min reg 1 proto_max reg 1 flags 0x2 ]
"""

PROBES = (ProbeTarget(APP_PORT, "10.244.0.1"), ProbeTarget(APP_PORT, "[fd00:244::1]"))


def test_probe_rules_render_as_nft_text_and_bytecode() -> None:
    """A probed, blocked app port gets an ``ip saddr``/``ip6 saddr`` redirect to the probe port, first in
    prerouting, with nft's own bytecode (checked against ``nft --debug=netlink``); the app port is still reset."""
    rs = build_ruleset(TARGETS, PROBE_SETTINGS, PROBES)
    assert rs.render_nft() == PROBE_NFT
    probe_rules = [r for r in rs.rules if r.probe]
    assert [r.chain for r in probe_rules] == ["prerouting", "prerouting"]
    bytecode = "".join(
        f"inet enforcer {r.chain}: {r.text}\n" + "".join(f"  [ {line} ]\n" for line in r.bytecode())
        for r in probe_rules
    )
    assert bytecode == PROBE_BYTECODE
    assert build_ruleset(TARGETS, PROBE_SETTINGS, PROBES).block_only().rules == rs.block_only().rules


@pytest.mark.parametrize(
    ("probes", "settings", "expected"),
    [
        ((), PROBE_SETTINGS, []),
        ((ProbeTarget(APP_PORT, "10.244.0.1"),), PROBE_SETTINGS, ["ip saddr 10.244.0.1 tcp dport 8080"]),
        ((ProbeTarget(APP_PORT, "10.244.0.1"), ProbeTarget(APP_PORT, "::ffff:10.244.0.1")), PROBE_SETTINGS,
         ["ip saddr 10.244.0.1 tcp dport 8080"]),
        ((ProbeTarget(9090, "10.244.0.1"),), PROBE_SETTINGS, []),
        ((ProbeTarget(APP_PORT, "10.244.0.1"),), dataclasses.replace(PROBE_SETTINGS, block_app_port=False), []),
    ],
)
def test_which_probes_get_a_rule(probes: tuple[ProbeTarget, ...], settings: RedirectSettings, expected: list[str]) -> None:
    """Only a probe of a blocked app port gets a rule, once per (port, source); v4-mapped sources are IPv4."""
    rs = build_ruleset(TARGETS, settings, probes)
    assert [r.text.split(" counter")[0] for r in rs.rules if r.probe] == expected


@pytest.mark.parametrize(
    ("probes", "settings", "message"),
    [
        (PROBES, SETTINGS, "probes need a probe_port"),
        (PROBES, dataclasses.replace(SETTINGS, probe_port=70000), "probe_port: 70000 is not a TCP port"),
        (PROBES, dataclasses.replace(SETTINGS, probe_port=LISTEN), "probe_port 15443 is the listener's port"),
        (PROBES, dataclasses.replace(SETTINGS, probe_port=443), "an exposed port"),
        (PROBES, dataclasses.replace(SETTINGS, probe_port=APP_PORT), "an app port"),
        ((ProbeTarget(0, "10.244.0.1"),), PROBE_SETTINGS, "probe app_port: 0 is not a TCP port"),
        ((ProbeTarget(APP_PORT, "node"),), PROBE_SETTINGS, "probe of port 8080: address 'node' is not"),
    ],
)
def test_bad_probe_input_is_refused(probes: tuple[ProbeTarget, ...], settings: RedirectSettings, message: str) -> None:
    """A missing or clashing probe port, a bad probe port or a source that is not an IP raise ValueError."""
    with pytest.raises(ValueError, match=re.escape(message)):
        build_ruleset(TARGETS, settings, probes)


def test_diff_names_a_missing_probe_rule() -> None:
    """diff reports a live table without the probe rule, quoting the rule's nft text."""
    rs = build_ruleset(TARGETS, PROBE_SETTINGS, PROBES[:1])
    without = _as_live(build_ruleset(TARGETS, PROBE_SETTINGS))
    assert diff(rs, _as_live(rs)) == []
    problems = diff(rs, without)
    assert problems[0].startswith("chain prerouting rule 1 (handle 1) differs from `ip saddr 10.244.0.1 tcp dport 8080")
    assert problems[-1] == (
        "chain prerouting rule 2 is missing: `fib daddr type local tcp dport 443 counter redirect to :15443`"
    )


_ports = st.integers(1, 65535)


@given(
    app_ports=st.lists(_ports, min_size=1, max_size=4),
    probed=st.lists(st.tuples(_ports, st.ip_addresses().map(str)), max_size=6),
    gate=_ports,
)
def test_probe_rules_property(app_ports: list[int], probed: list[tuple[int, str]], gate: int) -> None:
    """For any services and probes: either ValueError, or exactly one probe rule per distinct (blocked port,
    source) redirecting to the gate, before every other rule, and every blocked port is still rejected."""
    targets = [RedirectTarget(f"s{i}", 443, port) for i, port in enumerate(app_ports)]
    settings = dataclasses.replace(PROBE_SETTINGS, probe_port=gate)
    probes = [ProbeTarget(port, source) for port, source in probed]
    try:
        rs = build_ruleset(targets, settings, probes)
    except ValueError:
        assert gate in {LISTEN, 443, *app_ports} or any(p == LISTEN for p in app_ports)
        return
    import ipaddress  # noqa: PLC0415

    def norm(text: str) -> str:
        a = ipaddress.ip_address(text)
        return str(a.ipv4_mapped) if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped else str(a)

    wanted = {(port, norm(source)) for port, source in probed if port in app_ports}
    probe_rules = [r for r in rs.rules if r.probe]
    assert len(probe_rules) == len(wanted)
    assert rs.rules[: len(probe_rules)] == tuple(probe_rules)
    assert all(r.text.endswith(f"redirect to :{gate}") for r in probe_rules)
    assert {r.text.split()[2] for r in probe_rules} == {s for _, s in wanted}
    assert {int(r.text.split()[5]) for r in rs.rules_of("input")} == set(app_ports)


@pytest.mark.root
async def test_probe_source_lands_on_the_probe_port_others_are_reset(hosts: Hosts) -> None:
    """With the client's address as the probe source, its connections to the app port (v4, v6) land on the probe
    port with the app port as original destination; with another source they are reset; loopback reaches the app;
    the live table reads back equal to the built one."""
    for sources, lands in (((CLI4, CLI6), True), (("10.99.0.9", "fd00:99::9"), False)):
        rs = build_ruleset(TARGETS, PROBE_SETTINGS, [ProbeTarget(APP_PORT, s) for s in sources])
        await nftables.apply(rs, netns=hosts.app)
        assert diff(rs, await nftables.read_live(netns=hosts.app)) == []
        with serving(hosts.app, PROBE_PORT, "gate") as gate, serving(hosts.app, APP_PORT, "app") as app:
            for host in (APP4, APP6):
                if lands:
                    assert hello(hosts.cli, host, APP_PORT) == f"gate {host}:{APP_PORT} {host}:{PROBE_PORT}"
                else:
                    assert refused(hosts.cli, host, APP_PORT)
            assert hello(hosts.app, "127.0.0.1", APP_PORT).startswith("app ")
            assert app.accepted == 1
            assert gate.accepted == (2 if lands else 0)
