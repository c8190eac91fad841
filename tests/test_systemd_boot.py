"""The enforcer under a real systemd: `systemd-nspawn -b` of a Debian rootfs in a network namespace.

Layout (all names carry this process's PID; all addresses live only in our namespaces)::

    netns enfcli<pid>  10.251.0.2  -- veth --  10.251.0.1  netns enfsysd<pid>
      the scripted browser                       systemd 252 as PID 1 (systemd-nspawn -b):
      the real OpenID Provider (node)              enforcer-block.service (early, before the network)
      a poller of :8080 and :443                   enforcer.service (scripts/install --root)
                                                   enforcer-test-app.service (0.0.0.0:8080, at boot)

The Debian bookworm rootfs (debootstrap minbase + systemd, python3, nftables) is built once
per machine and cached under /var/cache/enforcer-test/rootfs-<hash of the recipe>; every
session installs the project into an overlay of it with ``scripts/install --root``, so the
cached tree stays pristine.  In CI (``CI=true``) a missing prerequisite fails; elsewhere it skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from tests.harness.op import OPUser, RunningOP, make_tls_material, start_op
from tests.harness.prereq import missing, require_e2e

pytestmark = [pytest.mark.root, pytest.mark.e2e, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("ENFORCER_TEST_CACHE", "/var/cache/enforcer-test"))
SUITE = "bookworm"
# procps: /bin/kill for ExecReload; sudo and curl: the README's host commands are run as printed
# (all three on a typical Debian host, none in a minbase debootstrap)
PACKAGES = ("systemd", "systemd-sysv", "dbus", "iproute2", "nftables", "procps", "python3", "python3-venv", "sudo", "curl")
RECIPE_VERSION = 2  # bump to force a rebuild when the recipe below changes
HOST_PACKAGES = {"systemd-nspawn": "systemd-container", "debootstrap": "debootstrap"}

SYSD_IP, CLI_IP = "10.251.0.1", "10.251.0.2"
HOST = "app.test"
USER, PASSWORD = "alice", "alice-pw"
CLIENT_SECRET = "systemd-boot-" + os.urandom(6).hex()
CAP_NET_ADMIN_BIND_SERVICE = 0x1400  # (1 << 12) | (1 << 10)


def _missing(what: str) -> None:
    missing(f"systemd boot test: {what}")


def _host_tools() -> None:
    """root, node + oidc-provider, and systemd-nspawn/debootstrap (apt-installed if absent)."""
    if os.geteuid() != 0:
        _missing("root")
    require_e2e()
    for tool in ("ip", "nsenter", "mount", "chroot"):
        if shutil.which(tool) is None:
            _missing(tool)
    absent = sorted({pkg for tool, pkg in HOST_PACKAGES.items() if shutil.which(tool) is None})
    if absent:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *absent]):
            done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                _missing(f"{' '.join(absent)} (apt-get failed: {done.stderr[-500:]})")
    for tool, pkg in HOST_PACKAGES.items():
        if shutil.which(tool) is None:
            _missing(f"{tool} (package {pkg})")


def _mirror() -> str:
    """The machine's own Debian mirror (deb822 sources first, then sources.list)."""
    for path, pattern in (
        ("/etc/apt/sources.list.d/debian.sources", r"^URIs:\s*(\S+)"),
        ("/etc/apt/sources.list", r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+\s+main"),
    ):
        with contextlib.suppress(OSError):
            match = re.search(pattern, Path(path).read_text(), re.MULTILINE)
            if match and "security" not in match.group(1):
                return match.group(1)
    return "http://deb.debian.org/debian"


def build_rootfs() -> Path:
    """The cached bookworm rootfs (debootstrap, ~80 s the first time on this machine)."""
    mirror = _mirror()
    recipe = json.dumps({"suite": SUITE, "packages": PACKAGES, "mirror": mirror, "v": RECIPE_VERSION}, sort_keys=True)
    rootfs = CACHE / f"rootfs-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"
    done = rootfs / ".enforcer-test-complete"
    if done.exists():
        return rootfs
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:  # one builder at a time on this machine
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return rootfs
        scratch = CACHE / f"building-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        started = time.monotonic()
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(scratch), mirror],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, timeout=900,
        )
        if proc.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            pytest.fail(f"debootstrap failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
        (scratch / ".enforcer-test-complete").write_text(recipe + "\n")
        shutil.rmtree(rootfs, ignore_errors=True)
        scratch.rename(rootfs)
        print(f"\nrootfs built in {time.monotonic() - started:.1f} s: {rootfs}")
    return rootfs


@pytest.fixture(scope="session")
def rootfs() -> Path:
    _host_tools()
    return build_rootfs()


# ---------------------------------------------------------------- helpers


@dataclass
class Result:
    rc: int
    out: str
    err: str


async def run(*cmd: str, timeout: float = 60.0, check: bool = True, stdin: bytes | None = None) -> Result:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}") from None
    res = Result(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
    if check and res.rc != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {res.rc}\n{res.out[-2000:]}\n{res.err[-2000:]}")
    return res


CLIENT = r"""
import asyncio, json, ssl, sys
from tests.harness.browser import ScriptedBrowser

async def main(mode, url, cafile, ip, user="", password=""):
    ctx = ssl.create_default_context(cafile=cafile)
    async with ScriptedBrowser(ctx, resolve={"app.test": ip}) as b:
        if mode == "login":
            r = await b.login(url, user, password)
        else:
            r = await b.get(url, follow=False)
        print(json.dumps({"status": r.status, "url": r.url, "urls": r.urls,
                          "location": r.location, "text": r.text[:500]}))

asyncio.run(main(*sys.argv[1:]))
"""


POLLER = r"""
import json, signal, socket, ssl, sys, time
ip, cafile, issuer = sys.argv[1:4]
ctx = ssl.create_default_context(cafile=cafile)
stats = {"app_attempts": 0, "app_answers": [], "exposed_attempts": 0, "exposed_login": 0, "exposed_other": []}
running = True

def stop(*_):
    global running
    running = False

signal.signal(signal.SIGTERM, stop)
print("polling", flush=True)
while running:
    stats["app_attempts"] += 1
    try:  # the app's own port: an accepted connection is already too much
        with socket.create_connection((ip, 8080), timeout=1) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            stats["app_answers"].append([time.time(), s.recv(64).decode("latin-1")])
    except OSError:
        pass
    stats["exposed_attempts"] += 1
    try:  # the exposed port: refused, or the enforcer's login, nothing else
        with socket.create_connection((ip, 443), timeout=1) as raw, ctx.wrap_socket(raw, server_hostname="app.test") as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head = data.partition(b"\r\n\r\n")[0].decode("latin-1")
        if head.startswith("HTTP/1.1 302") and ("\r\nlocation: " + issuer).lower() in head.lower():
            stats["exposed_login"] += 1
        elif head:
            stats["exposed_other"].append([time.time(), head[:200]])
    except ssl.SSLCertVerificationError as exc:  # something other than the enforcer answered TLS
        stats["exposed_other"].append([time.time(), str(exc)[:200]])
    except (OSError, ssl.SSLError):
        pass
    time.sleep(0.02)
print(json.dumps(stats), flush=True)
"""


@dataclass
class Boot:
    """One booted container and the client side around it."""

    workdir: Path
    merged: Path
    sysd: str
    cli: str
    op: RunningOP
    ca_bundle: Path
    nspawn: asyncio.subprocess.Process | None = None
    leader: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    started: float = 0.0

    async def sh(self, script: str, *, check: bool = True, timeout: float = 60.0) -> Result:
        """A shell command inside the container (all of its namespaces)."""
        return await run("nsenter", "-t", str(self.leader), "-a", "/bin/sh", "-c", script, check=check, timeout=timeout)

    async def show(self, *props: str) -> dict[str, str]:
        res = await self.sh(f"systemctl show -p {','.join(props)} enforcer.service")
        return dict(line.split("=", 1) for line in res.out.splitlines() if "=" in line)

    async def journal(self) -> str:
        return (await self.sh("journalctl -u enforcer.service -o cat --no-pager", check=False)).out

    async def client(self, mode: str, path: str, *extra: str) -> dict[str, object]:
        """The scripted browser, run in the client namespace, against https://app.test (port 443)."""
        res = await run(
            "nsenter", f"--net=/run/netns/{self.cli}", "--", sys.executable, "-c", CLIENT,
            mode, f"https://{HOST}{path}", str(self.ca_bundle), SYSD_IP, *extra, timeout=60,
        )
        return json.loads(res.out.strip().splitlines()[-1])  # type: ignore[no-any-return]

    async def wait_active(self, timeout: float = 30.0, *, not_pid: str | None = None) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            state = await self.show("ActiveState", "SubState", "MainPID", "NRestarts", "Result", "StatusText")
            if state.get("ActiveState") == "active" and state.get("MainPID", "0") not in ("0", not_pid):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"enforcer not active again: {state}\n{(await self.journal())[-3000:]}")
            await asyncio.sleep(0.2)

    @contextlib.asynccontextmanager
    async def poller(self) -> AsyncIterator[dict[str, object]]:
        """Polls :8080 and :443 from the client namespace every ~20 ms meanwhile; the dict it
        yields holds, at the end, what it saw (``app_answers``, ``exposed_other``: each an
        unauthenticated answer)."""
        proc = await asyncio.create_subprocess_exec(
            "nsenter", f"--net=/run/netns/{self.cli}", "--", sys.executable, "-c", POLLER,
            SYSD_IP, str(self.ca_bundle), self.op.issuer,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        )
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"polling"
        stats: dict[str, object] = {}
        try:
            yield stats
        finally:
            proc.terminate()  # our own poller, by PID
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            stats.update(json.loads(out.decode().strip().splitlines()[-1]))
            assert proc.returncode == 0, err.decode()[-2000:]

    async def flows(self) -> list[dict[str, object]]:
        res = await self.sh("cat /var/log/enforcer/flows.jsonl", check=False)
        return [json.loads(line) for line in res.out.splitlines() if line.strip()]

    async def poweroff(self) -> None:
        proc = self.nspawn
        if proc is None or proc.returncode is not None:
            return
        if self.leader:
            with contextlib.suppress(AssertionError):
                await self.sh("systemctl poweroff --no-block", check=False, timeout=10)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()  # our own systemd-nspawn, by PID
            await proc.wait()


DEFINITIONS = """\
kind: service
name: app
authorizationType: OIDC
OIDCClientID: app-client
OIDCClientSecret: {{file: /etc/enforcer/secrets/app}}
OIDCProviderURL: {issuer}
OIDCCallbackURL: https://{host}
OIDCScopes: [openid, email, profile, groups]
hosts: [{host}]
port: 8080
exposedPort: 443
selectors: [[role=web]]
exposedAPIs: [[httpresourcespec:name=app]]
type: HTTP
associatedTags: [service:name=app]
---
kind: httpresourcespec
name: app
associatedTags: [httpresourcespec:name=app]
endpoints:
{extra}  - {{URI: /*, methods: [GET], allowedScopes: [[groups=staff]]}}
"""

CONFIG = """\
tags: [role=web]
listen: {address: "::", port: 8443}
admin: {address: 127.0.0.1, port: 9090}
stateDir: /var/lib/enforcer
logsDir: /var/log/enforcer
definitions:
  - file: /etc/enforcer/definitions.d
oidc:
  caFile: /etc/enforcer/op-ca.crt
redirect: {enabled: true}
"""

APP_UNIT = """\
[Unit]
Description=the protected test app (plain HTTP on every address, as a typical app binds)
[Service]
ExecStart=/usr/bin/python3 -m http.server 8080 --bind 0.0.0.0 --directory /srv/app
DynamicUser=yes
[Install]
WantedBy=multi-user.target
"""


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


async def _netns(sysd: str, cli: str) -> None:
    await run("ip", "netns", "add", sysd)
    await run("ip", "netns", "add", cli)
    await run("ip", "-n", sysd, "link", "add", "ve-sysd", "type", "veth", "peer", "name", "ve-cli", "netns", cli)
    for ns, dev, ip in ((sysd, "ve-sysd", SYSD_IP), (cli, "ve-cli", CLI_IP)):
        await run("ip", "-n", ns, "link", "set", "lo", "up")
        await run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        await run("ip", "-n", ns, "link", "set", dev, "up")


async def _boot(rootfs: Path, workdir: Path) -> Boot:
    pid = os.getpid()
    sysd, cli = f"enfsysd{pid}", f"enfcli{pid}"
    await _netns(sysd, cli)

    # the OP runs in the client namespace on 10.251.0.2, with a certificate for that address
    node_in_cli = workdir / "node-in-cli"
    _write(node_in_cli, f'#!/bin/sh\nexec nsenter --net=/run/netns/{cli} -- {shutil.which("node")} "$@"\n', 0o755)
    tls = make_tls_material(workdir / "op-tls", name="op", ips=(CLI_IP,), dns_names=())
    op = await start_op(
        workdir / "op",
        clients=[
            {
                "client_id": "app-client",
                "client_secret": CLIENT_SECRET,
                "redirect_uris": [f"https://{HOST}/oauth2/callback"],
                "token_endpoint_auth_method": "client_secret_basic",
            }
        ],
        users={USER: OPUser(PASSWORD, {"email": "alice@example.com", "email_verified": True, "groups": ["staff"]})},
        host=CLI_IP,
        node=str(node_in_cli),
        cert_file=tls.cert_file,
        key_file=tls.key_file,
        ca_file=tls.ca_file,
    )
    merged = workdir / "merged"
    boot = Boot(workdir, merged, sysd, cli, op, workdir / "client-ca.pem")

    # an overlay of the cached rootfs: the cache stays pristine
    for d in ("upper", "work", "merged"):
        (workdir / d).mkdir()
    await run(
        "mount", "-t", "overlay", "overlay", "-o",
        f"lowerdir={rootfs},upperdir={workdir / 'upper'},workdir={workdir / 'work'}", str(merged),
    )
    started = time.monotonic()
    res = await run(str(REPO / "scripts/install"), "--root", str(merged), "--no-start", timeout=300)
    boot.timings["install"] = time.monotonic() - started
    assert "install: done" in res.out, res.out + res.err

    etc = merged / "etc"
    _write(etc / "enforcer/enforcer.yaml", CONFIG)
    _write(etc / "enforcer/op-ca.crt", tls.ca_pem.decode())
    _write(etc / "enforcer/definitions.d/app.yaml", definitions(op.issuer))
    # the client secret as an operator keeps it: root:enforcer-secrets 0640, read by the
    # service's dynamic user through its supplementary group
    secret = etc / "enforcer/secrets/app"
    _write(secret, CLIENT_SECRET + "\n")
    group = next(ln for ln in (etc / "group").read_text().splitlines() if ln.startswith("enforcer-secrets:"))
    os.chown(secret, 0, int(group.split(":")[2]))
    secret.chmod(0o640)
    _write(merged / "srv/app/index.html", "hello from the app behind the enforcer\n")
    _write(merged / "srv/app/open/hello.txt", "public hello\n")
    _write(etc / "systemd/system/enforcer-test-app.service", APP_UNIT)
    wants = etc / "systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "enforcer-test-app.service").symlink_to("../enforcer-test-app.service")
    return boot


def definitions(issuer: str, *, public: bool = False) -> str:
    extra = "  - {URI: /open/*, methods: [GET], public: true}\n" if public else ""
    return DEFINITIONS.format(issuer=issuer, host=HOST, extra=extra)


async def _start_container(boot: Boot) -> None:
    boot.started = time.monotonic()
    with open(boot.workdir / "nspawn.log", "wb") as log:  # noqa: ASYNC230  (the child keeps its copy)
        boot.nspawn = await asyncio.create_subprocess_exec(
            "systemd-nspawn", "-D", str(boot.merged), "-b", "--register=no", "--keep-unit",
            f"--network-namespace-path=/run/netns/{boot.sysd}", "--capability=CAP_NET_ADMIN",
            "--console=passive", f"--machine=enftest{os.getpid()}",
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while not boot.leader:
        if boot.nspawn.returncode is not None or time.monotonic() > deadline:
            raise AssertionError("systemd-nspawn did not boot:\n" + (boot.workdir / "nspawn.log").read_text()[-3000:])
        res = await run("pgrep", "-P", str(boot.nspawn.pid), "-x", "systemd", check=False)
        if res.rc == 0:
            boot.leader = int(res.out.split()[0])
        else:
            await asyncio.sleep(0.05)
    while True:  # the bus is not there for the first ~0.2 s
        res = await boot.sh("systemctl is-system-running --wait", check=False, timeout=60)
        if res.out.strip() in ("running", "degraded"):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"system not running: {res.out} {res.err}")
        await asyncio.sleep(0.1)
    assert res.out.strip() == "running", (await boot.sh("systemctl --failed --no-pager", check=False)).out
    boot.timings["boot"] = time.monotonic() - boot.started


async def _teardown(boot: Boot) -> None:
    with contextlib.suppress(Exception):
        await boot.poweroff()
    with contextlib.suppress(Exception):
        await boot.op.stop()
    with contextlib.suppress(Exception):
        await run("umount", str(boot.merged), check=False)
    for ns in (boot.sysd, boot.cli):
        with contextlib.suppress(Exception):
            await run("ip", "netns", "del", ns, check=False)


@pytest_asyncio.fixture(scope="module")
async def boot(rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Boot]:
    workdir = tmp_path_factory.mktemp("systemd-boot")
    b: Boot | None = None
    try:
        b = await _boot(rootfs, workdir)
        await _start_container(b)
        yield b
    finally:
        if b is not None:
            await _teardown(b)
            if b.started:
                total = b.timings.get("phase", time.monotonic() - b.started)
                print(
                    f"\nsystemd phase (boot to poweroff, without the rootfs build): {total:.1f} s; "
                    + ", ".join(f"{k} {v:.1f} s" for k, v in b.timings.items())
                )
        else:
            for ns in (f"enfsysd{os.getpid()}", f"enfcli{os.getpid()}"):
                await run("ip", "netns", "del", ns, check=False)
        shutil.rmtree(workdir, ignore_errors=True)


README = REPO / "README.md"
HOST_SECTION = "## Run it on a host (systemd)"
# commands of that section that need the checkout: run on the host, here as their documented
# `--root` form (the fixture's install, test_uninstall_keeps_the_config)
FROM_THE_CHECKOUT = ("sudo scripts/install", "sudo scripts/uninstall")


def readme_host_commands() -> list[str]:
    """Every command of the README's systemd section's ```sh blocks, in order, without comments."""
    text = README.read_text(encoding="utf-8")
    section = text.split(f"\n{HOST_SECTION}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", section, re.MULTILINE | re.DOTALL):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()  # a `#` after a space starts a comment
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


# ---------------------------------------------------------------- the tests, in order


async def test_readme_host_commands_work_as_printed(boot: Boot) -> None:
    """Each command the README's systemd section prints (check, start, doctor, operate) succeeds as printed in the booted system."""
    commands = readme_host_commands()
    in_container = [c for c in commands if c not in FROM_THE_CHECKOUT]
    assert commands[0] == "sudo scripts/install", commands  # the fixture ran it as `--root`, into the rootfs
    assert [c.split()[1:3] for c in in_container[:3]] == [["enforcer", "check"], ["systemctl", "start"], ["enforcer", "doctor"]]
    outputs = {}
    for i, command in enumerate(in_container):
        if i == 3:  # started and checked; the Operate commands are for a host that has served requests
            ca = (await boot.sh("cat /var/lib/enforcer/ca/ca.crt")).out
            boot.ca_bundle.write_text(ca + boot.op.ca_pem.decode())
            assert (await boot.client("get", "/"))["status"] == 302
        res = await boot.sh(command, check=False, timeout=120)
        assert res.rc == 0, f"{command} -> {res.rc}\n{res.out[-2000:]}\n{res.err[-2000:]}\n{(await boot.journal())[-2000:]}"
        assert "Traceback" not in res.out + res.err, (command, res.err[-2000:])
        assert " object at 0x" not in res.out + res.err, (command, res.out[-2000:], res.err[-2000:])  # no reprs
        outputs[command] = res.out
    for command, out in outputs.items():
        words = command.split()
        if words[1:3] == ["enforcer", "check"]:
            assert "/etc/enforcer/enforcer.yaml: OK" in out and f"redirect URI https://{HOST}/oauth2/callback" in out, out
        elif words[1:3] == ["enforcer", "doctor"]:
            assert "FAIL" not in out and "nftables" in out, out
    assert (await boot.show("ActiveState"))["ActiveState"] == "active"
    # the unit's Documentation= is installed with it
    docs = (await boot.sh("systemctl show -P Documentation enforcer.service enforcer-block.service")).out.split()
    assert docs and all(uri.startswith("file:/") for uri in docs), docs
    for uri in set(docs):
        assert (boot.merged / uri.removeprefix("file:/")).is_file(), uri



async def test_start_becomes_active_via_ready(boot: Boot) -> None:
    """`systemctl start` returns once READY=1 arrived; the STATUS text names the services."""
    started = time.monotonic()
    res = await boot.sh("systemctl start enforcer.service", check=False, timeout=120)
    boot.timings["start"] = time.monotonic() - started
    journal = await boot.journal()
    assert res.rc == 0, res.err + journal[-3000:]
    state = await boot.show("ActiveState", "SubState", "Type", "StatusText", "WatchdogUSec", "NRestarts")
    assert state["ActiveState"] == "active" and state["SubState"] == "running", state
    assert state["Type"] == "notify"
    assert state["StatusText"] == "serving 1 service(s): app", state
    assert state["WatchdogUSec"] == "30s"
    # READY=1 came after the redirect, the listener and the admin endpoint were live
    lines = journal.splitlines()
    applied = next(i for i, ln in enumerate(lines) if "redirect table inet enforcer applied" in ln)
    listening = next(i for i, ln in enumerate(lines) if "enforcer listening on" in ln)
    started_line = max(i for i, ln in enumerate(lines) if ln.startswith("Started enforcer.service"))
    assert applied < listening < started_line, journal
    verify = await boot.sh("systemd-analyze verify /etc/systemd/system/enforcer.service 2>&1", check=False)
    assert verify.rc == 0 and verify.out == "", verify  # the installed unit, on the real systemd
    assert "tcmsg" not in journal and "tc subsystem" not in journal, journal[-3000:]  # pyroute2's tc noise
    health = await boot.sh("python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:9090/healthz').read().decode())\"")
    assert '"ok"' in health.out


async def test_process_has_exactly_the_two_capabilities(boot: Boot) -> None:
    """CapEff = CapAmb = CapBnd = CAP_NET_ADMIN|CAP_NET_BIND_SERVICE, as a dynamic non-root user."""
    pid = (await boot.show("MainPID"))["MainPID"]
    status = (await boot.sh(f"cat /proc/{pid}/status")).out
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    for cap in ("CapEff", "CapAmb", "CapBnd", "CapPrm"):
        assert int(fields[cap], 16) == CAP_NET_ADMIN_BIND_SERVICE, (cap, fields[cap])
    uids = fields["Uid"].split()
    assert all(int(u) != 0 for u in uids), uids
    assert fields["NoNewPrivs"].strip() == "1"
    # ProtectSystem=strict: the state directory is the dynamic user's, the rest read-only
    owner = (await boot.sh("stat -c %u /var/lib/private/enforcer")).out.strip()
    assert owner == uids[0]
    for path in ("/etc/enforcer-probe", "/opt/enforcer/probe", "/var/probe"):
        ro = await boot.sh(f"nsenter -t {pid} -m touch {path}", check=False)  # even root, in its mount ns
        assert ro.rc != 0 and "Read-only file system" in ro.err, (path, ro)


async def test_redirect_login_and_app_from_the_client_namespace(boot: Boot) -> None:
    """The nft table is there; :443 from the client ns gets the login redirect, then the app after login."""
    table = await boot.sh("nft list table inet enforcer")
    assert "redirect to :8443" in table.out, table.out
    ca = (await boot.sh("cat /var/lib/enforcer/ca/ca.crt")).out
    boot.ca_bundle.write_text(ca + boot.op.ca_pem.decode())
    anon = await boot.client("get", "/")
    assert anon["status"] == 302, anon
    assert str(anon["location"]).startswith(boot.op.issuer), anon
    page = await boot.client("login", "/", USER, PASSWORD)
    assert page["status"] == 200, page
    assert "hello from the app behind the enforcer" in str(page["text"]), page
    assert page["url"] == f"https://{HOST}/", page
    assert any(str(u).startswith(boot.op.issuer) for u in page["urls"]), page  # type: ignore[attr-defined]


async def test_reload_applies_a_changed_definition(boot: Boot) -> None:
    """A new public endpoint + `systemctl reload` (SIGHUP): the path answers 200 without login."""
    before = await boot.client("get", "/open/hello.txt")
    assert before["status"] == 302, before
    pid = (await boot.show("MainPID"))["MainPID"]
    new = definitions(boot.op.issuer, public=True).replace("'", "'\\''")
    started = time.monotonic()
    # write and signal in one go, so the 5 s file poll is (almost) never first
    await boot.sh(
        f"printf '%s' '{new}' > /etc/enforcer/definitions.d/app.yaml.new"
        " && mv /etc/enforcer/definitions.d/app.yaml.new /etc/enforcer/definitions.d/app.yaml"
        " && systemctl reload enforcer.service"
    )
    deadline = time.monotonic() + 10
    while True:
        after = await boot.client("get", "/open/hello.txt")
        if after["status"] == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    boot.timings["reload"] = time.monotonic() - started
    assert after["status"] == 200 and after["text"] == "public hello\n", after
    journal = await boot.journal()
    assert re.search(r"definitions applied \((signal|poll)\)", journal), journal[-2000:]
    if "definitions applied (signal)" not in journal:
        pytest.fail("the change was picked up by the file poll, not by `systemctl reload`:\n" + journal[-2000:])
    state = await boot.show("MainPID", "ActiveState", "StatusText")
    assert state["MainPID"] == pid and state["ActiveState"] == "active", state  # reloaded, not restarted
    assert state["StatusText"] == "serving 1 service(s): app", state
    still = await boot.client("get", "/")
    assert still["status"] == 302, still


async def test_frozen_event_loop_is_killed_by_the_watchdog_and_restarted(boot: Boot) -> None:
    """SIGSTOP the daemon: systemd's watchdog (3 s here) kills it and Restart=on-failure brings it back."""
    await boot.sh(
        "mkdir -p /etc/systemd/system/enforcer.service.d && "
        "printf '[Service]\\nWatchdogSec=3s\\n' > /etc/systemd/system/enforcer.service.d/watchdog.conf && "
        "systemctl daemon-reload && systemctl restart enforcer.service"
    )
    state = await boot.wait_active()
    assert (await boot.show("WatchdogUSec"))["WatchdogUSec"] == "3s"
    await asyncio.sleep(4)  # pings every 1.5 s keep it alive
    alive = await boot.show("MainPID", "NRestarts", "ActiveState")
    assert alive["MainPID"] == state["MainPID"] and alive["ActiveState"] == "active", alive
    restarts = int(alive["NRestarts"])
    started = time.monotonic()
    await boot.sh(f"kill -STOP {state['MainPID']}")
    again = await boot.wait_active(timeout=40, not_pid=state["MainPID"])
    boot.timings["watchdog_restart"] = time.monotonic() - started
    assert int(again["NRestarts"]) >= restarts + 1, again
    journal = await boot.journal()
    assert "Watchdog timeout" in journal, journal[-2000:]
    assert "Failed with result 'watchdog'" in journal, journal[-2000:]
    # the restarted daemon serves again (it replaced the table its frozen predecessor left)
    anon = await boot.client("get", "/")
    assert anon["status"] == 302, anon


async def test_two_workers_under_systemd(boot: Boot) -> None:
    """listen.workers: 2 under the real unit: READY after both listen, logins work, SIGHUP reaches the workers, a killed worker is replaced."""
    await boot.sh(
        "sed -i 's/^listen: {address: \"::\", port: 8443}$/listen: {address: \"::\", port: 8443, workers: 2}/' "
        "/etc/enforcer/enforcer.yaml && grep -q 'workers: 2' /etc/enforcer/enforcer.yaml && "
        "rm -f /etc/systemd/system/enforcer.service.d/watchdog.conf && systemctl daemon-reload && "
        "systemctl restart enforcer.service"
    )
    state = await boot.wait_active()
    assert state["ActiveState"] == "active", state
    master = state["MainPID"]
    assert (await boot.show("StatusText"))["StatusText"] == "2 workers serving"
    workers = (await boot.sh(f"pgrep -P {master}")).out.split()
    assert len(workers) == 2, workers
    page = await boot.client("login", "/", USER, PASSWORD)
    assert page["status"] == 200 and "hello from the app behind the enforcer" in str(page["text"]), page
    await boot.sh("systemctl reload enforcer.service")
    await boot.sh(f"kill -KILL {workers[1]}")
    deadline = time.monotonic() + 15
    while True:
        now = (await boot.sh(f"pgrep -P {master}", check=False)).out.split()
        if len(now) == 2 and workers[1] not in now:
            break
        assert time.monotonic() < deadline, now
        await asyncio.sleep(0.2)
    after = await boot.show("MainPID", "ActiveState")
    assert after == {"MainPID": master, "ActiveState": "active"}, after  # replaced, not restarted
    anon = await boot.client("get", "/")
    assert anon["status"] == 302, anon
    journal = await boot.journal()
    assert "exited unexpectedly" in journal and "all 2 workers are listening" in journal, journal[-2000:]
    await boot.sh("sed -i 's/, workers: 2}$/}/' /etc/enforcer/enforcer.yaml")  # the config as installed again


async def _reset_kernel_tables(boot: Boot) -> None:
    """What a reboot does to nftables: the container's netns is ours and outlives it, so drop its tables."""
    await run("ip", "netns", "exec", boot.sysd, "nft", "flush", "ruleset")


async def test_stop_restart_upgrade_and_reboot_never_open_the_app(boot: Boot) -> None:
    """Polling :8080 and :443 from the client through `systemctl stop`, a restart, an upgrade by `scripts/install` and a reboot: the app never answers and :443 gives only the enforcer's login."""
    await boot.sh("systemctl enable enforcer.service")  # as `scripts/install` does on a live host
    async with boot.poller() as stats:
        # stop: the table stays (exposed port refused, app port blocked) and the journal and flow log say so
        await boot.sh("systemctl stop enforcer.service", timeout=60)
        state = await boot.show("ActiveState", "Result")
        assert state == {"ActiveState": "inactive", "Result": "success"}, state
        table = await boot.sh("nft list table inet enforcer")
        assert "redirect to :8443" in table.out and "tcp dport 8080" in table.out, table.out
        journal = await boot.journal()
        assert "INFO enforcer.run.daemon: stopped" in journal, journal[-2000:]
        assert "redirect table inet enforcer kept" in journal, journal[-2000:]
        stop = [f for f in await boot.flows() if f.get("method") == "STOP"]
        assert stop and stop[-1]["reason"] == "ports_blocked", stop
        await asyncio.sleep(1)  # the poller tries the stopped host ~25 times

        # restart from stopped
        await boot.sh("systemctl start enforcer.service", timeout=120)
        await boot.wait_active()
        assert (await boot.client("get", "/"))["status"] == 302

        # upgrade: scripts/install again into the running system, then its restart
        pid = (await boot.show("MainPID"))["MainPID"]
        started = time.monotonic()
        res = await run(str(REPO / "scripts/install"), "--root", str(boot.merged), "--no-start", timeout=300)
        assert "install: done" in res.out, res.out + res.err
        await boot.sh("systemctl daemon-reload && systemctl restart enforcer.service", timeout=120)
        await boot.wait_active(not_pid=pid)
        boot.timings["upgrade"] = time.monotonic() - started
        assert (await boot.client("get", "/"))["status"] == 302

        # reboot: the kernel forgets the table; enforcer-block.service puts it back before the network
        # (and the app, enabled at boot) comes up, then enforcer.service replaces it
        await boot.poweroff()
        assert boot.nspawn is not None and boot.nspawn.returncode == 0, (boot.workdir / "nspawn.log").read_text()[-2000:]
        await _reset_kernel_tables(boot)
        boot.leader = 0
        await _start_container(boot)
        await boot.wait_active(timeout=60)
        assert (await boot.sh("systemctl is-active enforcer-test-app.service")).out.strip() == "active"
        block = (await boot.sh("journalctl -b -u enforcer-block.service -o cat --no-pager")).out
        assert "installed from the last-known-good definitions" in block, block
        order = (await boot.sh(
            "systemctl show -p ActiveEnterTimestampMonotonic --value enforcer-block.service enforcer-test-app.service"
        )).out.split()
        assert int(order[0]) < int(order[1]), order  # the block was there before the app started
        boot_flows = [f for f in await boot.flows() if f.get("method") == "BLOCK"]
        assert boot_flows and boot_flows[-1]["reason"] == "ports_blocked", boot_flows
        page = await boot.client("login", "/", USER, PASSWORD)
        assert page["status"] == 200 and "hello from the app behind the enforcer" in str(page["text"]), page
    print(f"\npoller: {stats['app_attempts']} tries of :8080, {stats['exposed_attempts']} of :443 "
          f"({stats['exposed_login']} logins)")
    assert stats["app_answers"] == [], stats["app_answers"]
    assert stats["exposed_other"] == [], stats["exposed_other"]
    assert int(str(stats["exposed_login"])) > 0


async def test_uninstall_keeps_the_config(boot: Boot) -> None:
    """After poweroff, `scripts/uninstall --root` removes the unit and the venv, keeps /etc/enforcer."""
    await boot.poweroff()
    boot.timings["phase"] = time.monotonic() - boot.started
    assert boot.nspawn is not None and boot.nspawn.returncode == 0, (boot.workdir / "nspawn.log").read_text()[-2000:]
    root = boot.merged
    res = await run(str(REPO / "scripts/uninstall"), "--root", str(root))
    assert "uninstall: done" in res.out
    assert not (root / "etc/systemd/system/enforcer.service").exists()
    assert not (root / "etc/systemd/system/enforcer-block.service").exists()
    assert not (root / "etc/systemd/system/sysinit.target.wants/enforcer-block.service").is_symlink()
    assert not (root / "etc/logrotate.d/enforcer").exists()
    assert not (root / "opt/enforcer").exists()
    assert not (root / "usr/share/doc/enforcer").exists()
    assert (root / "etc/enforcer/enforcer.yaml").read_text() == CONFIG
    assert (root / "etc/enforcer/definitions.d/app.yaml").exists()
    assert (root / "var/lib/private/enforcer/ca/ca.crt").exists()  # state kept too
