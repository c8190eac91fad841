"""The running daemon: hot reload under load, services added and removed, clean stop, a failed task."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from enforcer.config import definitions as definitions_mod
from enforcer.config import settings as config_mod
from enforcer.errors import Outcome, Reason
from enforcer.flow import FlowRecord
from enforcer.flowlog import FlowLog
from enforcer.http.tls import PortInUseError, make_listen_socket
from enforcer.identity import sessions, sqlite
from enforcer.metrics import Metrics
from enforcer.run.daemon import Daemon, build_providers
from enforcer.run.stores import session_store
from enforcer.run.systemd import sd_notify, watchdog_interval
from tests.harness.browser import StaticResolver
from tests.harness.e2e_stack import HOST, Stack
from tests.harness.seed import SERVICE, SPEC


async def _reload(stack: Stack) -> tuple[str, float]:
    started = time.monotonic()
    async with aiohttp.ClientSession() as http, http.post(f"http://127.0.0.1:{stack.admin_port}/reload") as r:
        body = await r.json()
    return body["outcome"], time.monotonic() - started


@pytest.mark.e2e
async def test_ten_reloads_under_load_lose_nothing(stack: Stack) -> None:
    """Authenticated requests and an open WebSocket run across 10 reloads with zero failures and sessions intact."""
    defs = stack.state / "definitions.yaml"
    original = defs.read_text()
    async with stack.browser() as b:
        assert (await stack.login(b, "bob", "/")).status == 200
        cookie = b.cookies.header_for(stack.base + "/", same_site=True, method="GET")
    conn = aiohttp.TCPConnector(ssl=stack.client_ssl(), resolver=StaticResolver({HOST: "127.0.0.1"}))
    failures: list[str] = []
    done = asyncio.Event()
    count = 0
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=conn) as http:
        ws = await http.ws_connect(stack.base + "/ws", headers={"Cookie": cookie})

        async def load() -> None:
            nonlocal count
            while not done.is_set():
                async with http.get(stack.base + f"/load/{count}", headers={"Cookie": cookie}) as r:
                    if r.status != 200:
                        failures.append(f"{r.status} {await r.text()}"[:200])
                    count += 1

        workers = [asyncio.ensure_future(load()) for _ in range(4)]
        try:
            for i in range(10):
                defs.write_text(original + f"  - {{URI: /reload-{i}, methods: [GET], public: true}}\n")
                outcome, seconds = await _reload(stack)
                assert outcome == "success", outcome
                latencies.append(seconds)
                await ws.send_str(f"ping{i}")
                msg = await asyncio.wait_for(ws.receive(), 10)
                assert msg.data == f"echo:ping{i}"
                await asyncio.sleep(0.05)
        finally:
            done.set()
            await asyncio.gather(*workers, return_exceptions=True)
            defs.write_text(original)
            await _reload(stack)
        assert not ws.closed
        await ws.close()
    assert failures == []
    assert count > 20
    print(f"reload latency median {statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")
    for _ in range(50):
        if sum(f["reason"] == "reload_success" for f in stack.flows()) >= 10:
            break
        await asyncio.sleep(0.1)
    assert sum(f["reason"] == "reload_success" for f in stack.flows()) >= 10


@pytest.mark.e2e
async def test_invalid_reload_keeps_serving_the_old_set(stack: Stack) -> None:
    """A broken definitions file is rejected on reload and requests keep being decided by the old set."""
    defs = stack.state / "definitions.yaml"
    original = defs.read_text()
    try:
        broken = "\n".join("port: eighty" if line.startswith("port:") else line for line in original.splitlines())
        defs.write_text(broken)
        outcome, _ = await _reload(stack)
        assert outcome == "rejected"
        async with stack.browser() as b:
            r = await b.get(stack.base + "/public/still-here")
            assert r.status == 200
    finally:
        defs.write_text(original)
        await _reload(stack)
    await stack.wait_flow(lambda f: f["reason"] == "reload_rejected")


@pytest.mark.e2e
async def test_added_service_gets_a_certificate_and_removed_one_stops(stack: Stack) -> None:
    """A service added by reload is served on its new host with a minted certificate; removing it stops that."""
    defs = stack.state / "definitions.yaml"
    original = defs.read_text()
    extra = (
        original.split("---")[0]
        .replace("name: app\n", "name: app-two\n")
        .replace(f"hosts: [{HOST}]", "hosts: [two.test]")
    )
    extra = extra.replace(f"https://{HOST}:", "https://two.test:")
    try:
        defs.write_text(original + "\n---\n" + extra)
        outcome, _ = await _reload(stack)
        assert outcome == "success"
        ctx = stack.client_ssl()
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.port, ssl=ctx, server_hostname="two.test")
        writer.write(f"GET /public/x HTTP/1.1\r\nHost: two.test:{stack.port}\r\nConnection: close\r\n\r\n".encode())
        head = await reader.read(100)
        writer.close()
        assert head.startswith(b"HTTP/1.1 200"), head
    finally:
        defs.write_text(original)
        assert (await _reload(stack))[0] == "success"
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.open_connection("127.0.0.1", stack.port, ssl=stack.client_ssl(), server_hostname="two.test")


def test_sd_notify_sends_datagrams_to_the_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sd_notify writes the message to $NOTIFY_SOCKET and is a no-op without it."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1")
        assert server.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog is fed at half of WatchdogSec, and only for our own PID."""
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval() is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "worker state unknown"),
        ("not json", "worker state unknown"),
        ('{"workers": 2, "ready": [0], "listening": [0, 1], "pids": {}}', "1 of 2 workers ready"),
        ('{"workers": 2, "ready": [0, 1], "listening": [0, 1], "pids": {}}', None),
    ],
)
def test_primary_readiness_reads_the_masters_worker_state(tmp_path: Path, content: str | None,
                                                          expected: str | None) -> None:
    """Worker 0's /readyz counts a worker that is not ready (or an unreadable workers.json) as a problem."""
    from enforcer.config import settings as config  # noqa: PLC0415
    from enforcer.run.daemon import WORKERS_STATE, Daemon  # noqa: PLC0415

    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(f"stateDir: {tmp_path}\ndefinitions: [{{file: d.yaml}}]\n")
    if content is not None:
        (tmp_path / WORKERS_STATE).write_text(content)
    problem = Daemon(config.load_settings(cfg), role="primary")._workers_not_ready()
    assert problem == expected if expected is None else (problem or "").startswith(expected)


async def test_session_store_follows_the_sessions_settings(tmp_path: Path) -> None:
    """sessions.cacheSize, maxSessions and the store kind reach the session store the daemon makes."""
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(f"definitions: [{{file: d.yaml}}]\nstateDir: {tmp_path}\n"
                   "sessions: {cacheSize: 7, maxSessions: 50}\n")
    s = config_mod.load_settings(cfg).model
    store = session_store(s, shared=False)
    try:
        assert isinstance(store, sqlite.SQLiteSessionStore)
        assert store._cache._size == 7 and store._max == 50
    finally:
        await store.close()
    cfg.write_text("definitions: [{file: d.yaml}]\nsessions: {store: memory}\n")
    assert isinstance(session_store(config_mod.load_settings(cfg).model, shared=False), sessions.MemorySessionStore)


class FailingFlowLog(FlowLog):
    """A flow log whose writer task fails shortly after the daemon starts."""

    async def run(self) -> None:
        await asyncio.sleep(0.05)
        raise OSError("flow log disk vanished")


class UnsignalledDaemon(Daemon):
    """The real daemon, minus the signal handlers (they belong to pytest here)."""

    def _install_signals(self, loop: asyncio.AbstractEventLoop, flowlog: FlowLog) -> None:
        return None


def _small_daemon(tmp_path: Path, flowlog: FlowLog) -> Daemon:
    """A daemon on loopback with one service (its IdP unreachable) and the given flow log."""
    (tmp_path / "d.yaml").write_text(
        "kind: service\nname: app\nOIDCClientID: c\nOIDCClientSecret: s\n"
        "OIDCProviderURL: https://127.0.0.1:9/\nOIDCCallbackURL: https://app.test\n"
        "hosts: [app.test]\nport: 9\nexposedAPIs: [[api=x]]\n"
    )
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(f"stateDir: {tmp_path}/state\nadmin: {{address: 127.0.0.1, port: 0}}\n"
                   "definitions: [{file: d.yaml}]\nsessions: {store: memory}\n")
    return UnsignalledDaemon(
        config_mod.load_settings(cfg), listen_socket=make_listen_socket("127.0.0.1", 0), flowlog=flowlog
    )


async def _start(daemon: Daemon) -> asyncio.Task[int]:
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.get_running_loop().create_task(daemon.run(on_ready=ready))
    await asyncio.wait({ready, task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises why it did not start
    assert ready.done(), "the daemon did not start"
    return task


async def test_a_failed_background_task_stops_the_daemon_with_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A flow-log writer that raises stops the daemon within a second, logged by task name, with exit code 1."""
    daemon = _small_daemon(tmp_path, FailingFlowLog(None, stream=io.StringIO()))
    task = await _start(daemon)
    port = daemon.listen_port
    started = time.monotonic()
    code = await asyncio.wait_for(task, 5)
    assert code == 1
    assert time.monotonic() - started < 1.0
    failed = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert any("'flowlog'" in r.getMessage() and r.exc_info for r in failed), [r.getMessage() for r in failed]
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_a_clean_stop_exits_zero_and_flushes_the_flow_log(tmp_path: Path) -> None:
    """stop() drains, cancels the background tasks, writes the buffered flow records and returns 0."""
    out = io.StringIO()
    daemon = _small_daemon(tmp_path, FlowLog(None, stream=out, flush_interval=60))
    task = await _start(daemon)
    daemon._reload_outcome("success", "test")
    daemon.stop()
    assert await asyncio.wait_for(task, 5) == 0
    assert "reload_success" in out.getvalue()
    assert daemon._tasks == set()


async def test_jwks_events_of_a_provider_are_counted_under_its_issuer(tmp_path: Path) -> None:
    """The providers the daemon builds count their JWKS fetches, throttled kids and expiries per issuer."""
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(f"tags: [app=frontend]\ndefinitions: [{{file: d.yaml}}]\nstateDir: {tmp_path}\n")
    settings = config_mod.load_settings(cfg)
    docs = definitions_mod.parse_documents(yaml.safe_dump_all([SERVICE, SPEC]), "d.yaml")
    assert isinstance(docs, list)
    definitions = definitions_mod.resolve_definitions(docs, settings.tags)
    metrics = Metrics()
    async with aiohttp.ClientSession() as http:
        providers = build_providers(definitions, settings, http, metrics=metrics)
        provider = next(iter(providers.values()))
        assert provider.on_jwks_event is not None
        provider.on_jwks_event("throttled")
        provider.on_jwks_event("throttled")
    sample = metrics.registry.get_sample_value(
        "enforcer_jwks_refreshes_total", {"issuer": provider.issuer, "outcome": "throttled"}
    )
    assert sample == 2


@pytest.mark.parametrize("allowed", [False, True])
async def test_no_service_for_this_enforcer_is_loud_unless_allowed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, allowed: bool
) -> None:
    """With no service for its tags the daemon logs an error, shows enforcer_services 0 and /readyz is
    not ready, naming why; allowNoServices: true makes it ready and quiet."""
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({**SERVICE, "selectors": [["app=backend"]]}))
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(f"tags: [app=fronted]\nstateDir: {tmp_path}/state\nadmin: {{address: 127.0.0.1, port: 0}}\n"
                   f"definitions: [{{file: d.yaml}}]\nsessions: {{store: memory}}\nallowNoServices: {allowed}\n")
    daemon = UnsignalledDaemon(
        config_mod.load_settings(cfg), listen_socket=make_listen_socket("127.0.0.1", 0),
        flowlog=FlowLog(None, stream=io.StringIO()),
    )
    task = await _start(daemon)
    try:
        await asyncio.sleep(0.1)  # discovery of no provider: ready at once
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{daemon.admin_port}/readyz") as r:
                status, body = r.status, await r.json()
            async with http.get(f"http://127.0.0.1:{daemon.admin_port}/metrics") as r:
                metrics = await r.text()
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 5)
    assert "enforcer_services 0.0" in metrics
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    if allowed:
        assert (status, body["problems"]) == (200, {})
        assert not any("no service applies" in m for m in errors)
    else:
        assert status == 503
        assert "no service applies" in body["problems"]["services"]
        assert any("no service applies" in m and "allowNoServices" in m for m in errors)


UNREACHABLE = {**SERVICE, "selectors": [["app=x"]], "OIDCProviderURL": "https://127.0.0.1:9/idp"}
"""A service whose IdP never answers (the discard port on loopback: refused at once)."""


def _unreachable_idp_daemon(tmp_path: Path, admin: str = "") -> Daemon:
    """A daemon serving :data:`UNREACHABLE` from ``tmp_path/d.yaml`` (``admin``: more keys of ``admin:``)."""
    (tmp_path / "d.yaml").write_text(yaml.safe_dump_all([UNREACHABLE, SPEC]))
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(f"tags: [app=x]\nstateDir: {tmp_path}/state\n"
                   f"admin: {{address: 127.0.0.1, port: 0{', ' + admin if admin else ''}}}\n"
                   "definitions: [{file: d.yaml}]\nsessions: {store: memory}\n")
    return UnsignalledDaemon(
        config_mod.load_settings(cfg), listen_socket=make_listen_socket("127.0.0.1", 0),
        flowlog=FlowLog(None, stream=io.StringIO()),
    )


@pytest.mark.parametrize("mode", ["required", "reported"])
async def test_an_unreachable_idp_holds_readiness_only_when_required(tmp_path: Path, mode: str) -> None:
    """A service whose IdP cannot be reached makes /readyz 503 naming it by default (admin.identityProviders: required); with `reported` it is named under `degraded` in a 200, so one custom resource's broken IdP cannot hold back a node's readiness."""
    daemon = _unreachable_idp_daemon(tmp_path, f"identityProviders: {mode}")
    task = await _start(daemon)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(50):  # until the first discovery attempt failed
                async with http.get(f"http://127.0.0.1:{daemon.admin_port}/readyz") as r:
                    status, body = r.status, await r.json()
                if "discovery pending" not in json.dumps(body):
                    break
                await asyncio.sleep(0.1)
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 5)
    name = UNREACHABLE["name"]
    if mode == "required":
        assert status == 503 and not body["ready"] and "127.0.0.1:9" in body["problems"][name]
    else:
        assert (status, body["ready"], body["problems"]) == (200, True, {})
        assert "127.0.0.1:9" in body["degraded"][name]


async def test_reloads_with_an_unreachable_idp_keep_one_discovery_loop(tmp_path: Path) -> None:
    """Each reload replaces the discovery loop of the set it replaced: with an IdP that never answers, five reloads leave one loop retrying it, not six."""
    daemon = _unreachable_idp_daemon(tmp_path)
    defs = tmp_path / "d.yaml"
    task = await _start(daemon)
    try:
        for n in range(5):
            endpoint = {"URI": f"/v{n}/*", "methods": ["GET"], "allowedScopes": [["groups=staff"]]}
            defs.write_text(yaml.safe_dump_all([UNREACHABLE, {**SPEC, "endpoints": [endpoint, *SPEC["endpoints"]]}]))
            assert await daemon.manager.refresh(reason="test") == "success"
        await asyncio.sleep(0)
        loops = [t for t in asyncio.all_tasks() if t.get_name() == "discovery" and not t.done()]
        assert len(loops) == 1, loops
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 5)


# -- flows in the container log, metrics a Prometheus can scrape --------------------------------

_DEFINITION = (
    "kind: service\nname: app\nOIDCClientID: c\nOIDCClientSecret: s\n"
    "OIDCProviderURL: https://127.0.0.1:9/\nOIDCCallbackURL: https://app.test\n"
    "hosts: [app.test]\nport: 9\nexposedAPIs: [[api=x]]\n"
)


def _metrics_daemon(tmp_path: Path, metrics_yaml: str) -> Daemon:
    """A daemon on loopback (its IdP unreachable) whose enforcer.yaml has ``metrics_yaml``."""
    (tmp_path / "d.yaml").write_text(_DEFINITION)
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(f"stateDir: {tmp_path}/state\nadmin: {{address: 127.0.0.1, port: 0}}\n{metrics_yaml}"
                   "definitions: [{file: d.yaml}]\nsessions: {store: memory}\n")
    return UnsignalledDaemon(
        config_mod.load_settings(cfg), listen_socket=make_listen_socket("127.0.0.1", 0),
        flowlog=FlowLog(None, stream=io.StringIO()),
    )


async def test_the_metrics_listener_answers_only_get_metrics(tmp_path: Path) -> None:
    """metrics: opens a second listener where GET /metrics answers (no user, e-mail or sub in it) and every
    other path or method, /reload above all, is 404; admin still reloads; the listener closes with the daemon."""
    daemon = _metrics_daemon(tmp_path, "metrics: {address: 127.0.0.1, port: 0}\n")
    task = await _start(daemon)
    rec = FlowRecord.begin(flow_id="f" * 16, client="192.0.2.1:5", sni="app.test", host="app.test",
                           method="GET", path="/private/alice", now=time.time(), service="app")
    rec.record(decision=Outcome.ALLOW, reason=Reason.ALLOWED, user="sub-alice-123", email="alice@example.com")
    daemon.metrics.observe_flow(rec.finish(now=time.time(), status=200))
    base = f"http://127.0.0.1:{daemon.metrics_port}"
    try:
        assert daemon.metrics_port not in (0, daemon.admin_port)
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/metrics") as r:
                status, body = r.status, await r.text()
            refused = {}
            for method, path in (("POST", "/reload"), ("GET", "/reload"), ("GET", "/healthz"), ("GET", "/readyz"),
                                 ("POST", "/metrics"), ("DELETE", "/metrics"), ("GET", "/"), ("GET", "/metrics/x")):
                async with http.request(method, base + path) as r:
                    refused[f"{method} {path}"] = r.status
            async with http.post(f"http://127.0.0.1:{daemon.admin_port}/reload") as r:
                admin_reload = r.status
    finally:
        daemon.stop()
        assert await asyncio.wait_for(task, 5) == 0
    assert status == 200 and 'enforcer_requests_total{decision="allow",reason="allowed",service="app"} 1.0' in body
    for identity in ("sub-alice-123", "alice@example.com", "alice", "192.0.2.1", "/private"):
        assert identity not in body
    assert set(refused.values()) == {404}, refused
    assert admin_reload == 200
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", daemon.metrics_port)


async def test_without_metrics_there_is_no_second_listener(tmp_path: Path) -> None:
    """Without metrics: only the loopback admin listener serves /metrics."""
    daemon = _metrics_daemon(tmp_path, "")
    task = await _start(daemon)
    try:
        assert daemon.metrics_port == 0
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{daemon.admin_port}/metrics") as r:
            assert r.status == 200
    finally:
        daemon.stop()
        assert await asyncio.wait_for(task, 5) == 0


async def test_a_metrics_port_in_use_stops_the_start_naming_it_and_closes_admin(tmp_path: Path) -> None:
    """A taken metrics port fails the start with an error naming metrics.port, and the admin listener is closed again."""
    taken = make_listen_socket("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        daemon = _metrics_daemon(tmp_path, f"metrics: {{address: 127.0.0.1, port: {port}}}\n")
        try:
            with pytest.raises(PortInUseError, match=r"metrics\.port"):
                await asyncio.wait_for(daemon.run(), 10)
        finally:
            assert daemon.listen_socket is not None
            daemon.listen_socket.close()  # never handed to a listener: the start stopped before
    finally:
        taken.close()
    assert daemon.admin_port != 0
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", daemon.admin_port)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_daemon_started_with_flow_log_stdout_writes_flow_json_to_stdout(tmp_path: Path) -> None:
    """`enforcer run` with flowLogStdout: true writes each flow record, the file's line, as one JSON line with
    flow_id to its stdout; its own log lines go to stderr; SIGTERM still exits 0."""
    (tmp_path / "d.yaml").write_text(_DEFINITION)
    listen, admin = _free_port(), _free_port()
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(f"listen: {{address: 127.0.0.1, port: {listen}}}\nadmin: {{address: 127.0.0.1, port: {admin}}}\n"
                   f"stateDir: {tmp_path}/state\nlogsDir: {tmp_path}/logs\ndefinitions: [{{file: d.yaml}}]\n"
                   "sessions: {store: memory}\nflowLogStdout: true\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "enforcer", "run", "-c", str(cfg), "--log-level", "info"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, b"")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while True:  # until the listener accepts
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            try:
                raw = socket.create_connection(("127.0.0.1", listen), timeout=5)
                break
            except ConnectionRefusedError:
                time.sleep(0.1)
        client = ssl.create_default_context()
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        with raw, contextlib.suppress(ssl.SSLError, OSError):
            client.wrap_socket(raw, server_hostname="unknown.test")  # refused: a flow record unknown_sni
        while not any(b'"unknown_sni"' in line for line in out):
            assert time.monotonic() < deadline, out
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
        reader.join(10)
        err = proc.stderr.read().decode()  # type: ignore[union-attr]
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    assert code == 0, err[-2000:]
    records = [json.loads(line) for line in out]  # stdout: flow records only, one JSON object a line
    assert records and all(set(r) >= {"time", "flow_id", "decision", "reason"} for r in records)
    [flow] = [r for r in records if r["reason"] == "unknown_sni"]
    assert flow["sni"] == "unknown.test"
    file_lines = (tmp_path / "logs" / "flows.jsonl").read_bytes().splitlines()
    assert [line.rstrip(b"\n") for line in out] == file_lines  # the same lines as the file, in the same order
    assert " INFO enforcer.run.daemon: stopped" in err, err[-2000:]
    assert not any(line.startswith("{") for line in err.splitlines())  # the daemon's own log: stderr, never JSON
