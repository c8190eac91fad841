"""`enforcer demo` (the README's first command) starts a working setup a person can log in to."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from enforcer.cli import demo as demo_mod
from tests.harness.browser import ScriptedBrowser
from tests.harness.e2e_stack import free_port
from tests.harness.prereq import require_e2e

# The commands the demo prints run with this checkout's .venv/bin first on PATH, as after
# scripts/setup (whose /usr/local/bin link may belong to another checkout on this machine).
VENV_BIN = str(Path(sys.executable).parent)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")}
COMMAND = re.compile(r"^\s+\$ (?P<cmd>.*?)(?:   # -> (?P<expect>.*))?$")


async def _read_until(proc: asyncio.subprocess.Process, marker: str, timeout: float = 60) -> str:
    """The demo's output up to the line holding ``marker`` (fails if the demo exits first)."""
    assert proc.stdout is not None
    text = ""
    async with asyncio.timeout(timeout):
        while marker not in text:
            line = await proc.stdout.readline()
            if not line:
                pytest.fail(f"demo exited before {marker!r}:\n" + text)
            text += line.decode()
    return text


async def _banner(proc: asyncio.subprocess.Process) -> str:
    """The demo's start-up text, up to the line that says it serves (fails if it exits first)."""
    return await _read_until(proc, "Stop with Ctrl-C")


def _commands(text: str) -> list[tuple[str, str]]:
    """Every ``$ COMMAND   # -> EXPECTED`` line of the demo's output, as (command, expected)."""
    return [(m["cmd"], m["expect"] or "") for line in text.splitlines() if (m := COMMAND.match(line))]


async def _run_as_printed(command: str, expect: str) -> str:
    """Run one printed command in bash and check it does what its comment says; returns its output."""
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    text = out.decode(errors="replace")
    if expect.startswith("refused"):
        assert proc.returncode == 7, f"{command}\n-> {proc.returncode}, expected curl's 'refused' (7):\n{text}"
    else:
        assert proc.returncode == 0, f"{command}\n-> {proc.returncode}:\n{text}"
        if status := re.match(r"\d{3}\b", expect):
            assert text.startswith(status[0]), f"{command}\n-> expected {status[0]}:\n{text}"
    assert "Traceback" not in text, text
    return text


async def _run_every_printed_command(proc: asyncio.subprocess.Process, banner: str) -> list[str]:
    """Run the banner's commands in order; the last kills the enforcer: run what the demo then
    prints (each refused), wait until it is back and check the first command works again."""
    printed = _commands(banner)
    assert printed, banner
    assert "--kill-enforcer" in printed[-1][0], printed
    for command, expect in printed:
        await _run_as_printed(command, expect)
    killed = await _read_until(proc, "it comes back in")
    after_kill = _commands(killed)
    assert after_kill, killed
    assert all(expect.startswith("refused") for _, expect in after_kill), after_kill
    for command, expect in after_kill:
        await _run_as_printed(command, expect)
    await _read_until(proc, "the enforcer is back")
    await _run_as_printed(*printed[0])
    return [command for command, _ in printed + after_kill]


async def _stop(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if proc.returncode is None:
        proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def test_the_banner_names_this_checkouts_enforcer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Printed commands say `enforcer` when PATH finds this checkout's, else this checkout's full path."""
    own = Path(sys.prefix) / "bin" / "enforcer"
    other = tmp_path / "other-checkout" / "enforcer"
    other.parent.mkdir()
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    for path, expected in ((str(own.parent), "enforcer"), (str(other.parent), str(own)), ("/nonexistent", str(own))):
        monkeypatch.setenv("PATH", path)
        assert demo_mod._enforcer_command() == expected, path


@pytest.mark.parametrize("option", ["--port", "--idp-port"])
def test_a_busy_port_is_one_line_naming_the_option(tmp_path: Path, option: str) -> None:
    """A taken --port or --idp-port ends the demo with one line saying which port and which option."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = {"--port": free_port(), "--idp-port": free_port(), option: busy}
        done = subprocess.run(
            [sys.executable, "-m", "enforcer", "demo", "--no-netns", "--state-dir", str(tmp_path / "demo"),
             *(str(x) for kv in ports.items() for x in kv)],
            capture_output=True, text=True, timeout=60, env=ENV, check=False,
        )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == f"enforcer demo: port {busy} is in use: choose another with {option}\n"

@pytest.mark.e2e
async def test_demo_serves_the_sample_app_behind_a_login(tmp_path: Path) -> None:
    """The demo prints its URL; alice logs in and sees the sample app, eve is denied, /healthz is public."""
    require_e2e()
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "enforcer", "demo", "--port", str(port), "--state-dir", str(tmp_path / "demo"),
        "--no-netns", "--idp-port", str(free_port()),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
        env=ENV,
    )
    try:
        banner = await _banner(proc)
        assert f"https://localhost:{port}/" in banner
        ctx = ssl.create_default_context(cafile=str(tmp_path / "demo" / "ca" / "ca.crt"))
        base = f"https://localhost:{port}"
        async with ScriptedBrowser(ctx, resolve={"localhost": "127.0.0.1"}) as alice:
            page = await alice.login(base + "/", "alice", "alice")
            assert page.status == 200, page.text[:300]
            assert "Hello from the sample app" in page.text
            assert "alice@example.com" in page.text
            admin = await alice.get(base + "/admin/")
            assert admin.status == 200
        async with ScriptedBrowser(ctx, resolve={"localhost": "127.0.0.1"}) as eve:
            page = await eve.login(base + "/", "eve", "eve")
            assert page.status == 403
            assert "missing_tags" in page.text
            health = await eve.get(base + "/healthz")
            assert health.status == 200
    finally:
        await _stop(proc, signal.SIGINT)
    assert proc.returncode in (0, -signal.SIGINT, 130)


@pytest.mark.e2e
async def test_every_command_the_loopback_demo_prints_works_as_printed(tmp_path: Path) -> None:
    """Each `$` line of the loopback demo runs as pasted (doctor passes, reload reaches the daemon),
    and after --kill-enforcer the enforcer's port refuses until the demo brings it back."""
    require_e2e()
    port, idp_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "enforcer", "demo", "--no-netns", "--port", str(port), "--idp-port", str(idp_port),
        "--restart-after", "8", "--state-dir", str(tmp_path / "demo"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
        env=ENV,
    )  # fmt: skip
    try:
        banner = await _banner(proc)
        assert f"ssh -L {port}:127.0.0.1:{port} -L {idp_port}:127.0.0.1:{idp_port} " in banner, banner
        ran = await _run_every_printed_command(proc, banner)
        for sub in ("doctor", "reload", "flows", "explain"):
            assert any(c.startswith(f"enforcer {sub} ") for c in ran), (sub, ran)
    finally:
        await _stop(proc, signal.SIGINT)
    assert proc.returncode == 0


@pytest.mark.e2e
@pytest.mark.root
async def test_demo_as_root_runs_behind_the_real_redirect_in_namespaces(tmp_path: Path) -> None:
    """As root the demo builds client/app namespaces: a login through :443 reaches the sample app,
    from the client host and from a browser on this machine through the printed URL.

    The app's own port refuses the client host; every command the demo prints works as
    pasted, also after --kill-enforcer (then 443 and the app port refuse, never an app page);
    every enf-demo-* namespace is gone afterwards.
    """
    from enforcer.cli import demo  # noqa: PLC0415
    from tests.harness.netns import NetnsLoop, netns_names, refused, require_root  # noqa: PLC0415

    require_root()
    require_e2e()
    deadline = time.monotonic() + 60  # another demo (a concurrent run) may still be using the names
    while leftovers := [n for n in netns_names() if n.startswith("enf-demo-")]:
        assert time.monotonic() < deadline, f"namespaces of another demo are in the way: {leftovers}"
        await asyncio.sleep(0.5)
    state = tmp_path / "demo-netns"
    port, idp_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "enforcer", "demo", "--restart-after", "8", "--state-dir", str(state),
        "--port", str(port), "--idp-port", str(idp_port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
        env=ENV,
    )  # fmt: skip
    client: NetnsLoop | None = None
    try:
        banner = await _banner(proc)
        assert f"--resolve {demo.DEMO_HOST}:443:{demo.APP4} https://{demo.DEMO_HOST}/" in banner, banner
        assert {demo.CLIENT_NS, demo.APP_NS} <= set(netns_names())
        cadata = (state / "ca" / "ca.crt").read_text()
        client = NetnsLoop(demo.CLIENT_NS)

        async def login(address: str) -> tuple[int, str, list[str]]:
            ctx = ssl.create_default_context(cadata=cadata)
            async with ScriptedBrowser(ctx, resolve={demo.DEMO_HOST: address}) as alice:
                page = await alice.login(f"https://{demo.DEMO_HOST}/", "alice", "alice")
                return page.status, page.text, page.urls

        for address in (demo.APP4, demo.APP6):
            status, text, urls = await client.run(login(address))
            assert status == 200, text[:300]
            assert "Hello from the sample app" in text
            assert "alice@example.com" in text
            assert any(u.startswith(f"https://localhost:{idp_port}/") for u in urls), urls
        # a browser on this machine: the printed URL is forwarded into the client host
        assert f"open          https://localhost:{port}/" in banner, banner
        async with ScriptedBrowser(ssl.create_default_context(cadata=cadata)) as here:
            page = await here.login(f"https://localhost:{port}/", "bob", "bob")
            assert page.status == 200, page.text[:300]
            assert "bob@example.com" in page.text
        assert refused(demo.CLIENT_NS, demo.APP4, demo.APP_PORT)
        assert refused(demo.CLIENT_NS, demo.APP6, demo.APP_PORT)
        ran = await _run_every_printed_command(proc, banner)
        assert any(c.startswith(f"ip netns exec {demo.APP_NS} enforcer doctor ") for c in ran), ran
        proc.send_signal(signal.SIGTERM)  # the demo stops and tears down
        await asyncio.wait_for(proc.wait(), 40)
        assert proc.returncode == 0
    finally:
        if client is not None:
            client.close()
        await _stop(proc, signal.SIGTERM)
        left = [n for n in netns_names() if n.startswith("enf-demo-")]
        for name in left:  # never leave them behind, even when the demo did
            subprocess.run(["ip", "netns", "del", name], check=False)
    assert not left, f"the demo left namespaces behind: {left}"
