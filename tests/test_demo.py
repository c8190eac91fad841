"""`enforcer demo` (the README's first command) starts a working setup a person can log in to."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_e2e
from tests.e2e_stack import free_port
from tests.harness.browser import ScriptedBrowser

pytestmark = pytest.mark.e2e



async def _banner(proc: asyncio.subprocess.Process) -> str:
    """The demo's start-up text, up to the line that says it serves (fails if it exits first)."""
    assert proc.stdout is not None
    banner = ""
    async with asyncio.timeout(60):
        while "Stop with Ctrl-C" not in banner:
            line = await proc.stdout.readline()
            if not line:
                pytest.fail("demo exited early:\n" + banner)
            banner += line.decode()
    return banner

async def test_demo_serves_the_sample_app_behind_a_login(tmp_path: Path) -> None:
    """The demo prints its URL; alice logs in and sees the sample app, eve is denied, /healthz is public."""
    require_e2e()
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "enforcer", "demo", "--port", str(port), "--state-dir", str(tmp_path / "demo"),
        "--no-netns",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
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
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    assert proc.returncode in (0, -signal.SIGINT, 130)


@pytest.mark.root
async def test_demo_as_root_runs_behind_the_real_redirect_in_namespaces(tmp_path: Path) -> None:
    """As root the demo builds client/app namespaces: a login through :443 reaches the sample app.

    The app's own port refuses the client host, and with --exit-after every enf-demo-*
    namespace is gone afterwards.
    """
    from enforcer.cli import demo  # noqa: PLC0415
    from tests.netns import NetnsLoop, netns_names, refused, require_root  # noqa: PLC0415

    require_root()
    require_e2e()
    deadline = time.monotonic() + 60  # another demo (a concurrent run) may still be using the names
    while leftovers := [n for n in netns_names() if n.startswith("enf-demo-")]:
        assert time.monotonic() < deadline, f"namespaces of another demo are in the way: {leftovers}"
        await asyncio.sleep(0.5)
    state = tmp_path / "demo-netns"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "enforcer", "demo", "--exit-after", "12", "--state-dir", str(state),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
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
            assert any(u.startswith(f"https://{demo.APP4}:{demo.IDP_PORT}/") for u in urls), urls
        assert refused(demo.CLIENT_NS, demo.APP4, demo.APP_PORT)
        assert refused(demo.CLIENT_NS, demo.APP6, demo.APP_PORT)
        await asyncio.wait_for(proc.wait(), 40)  # --exit-after: the demo stops and tears down
        assert proc.returncode == 0, await proc.stdout.read()
    finally:
        if client is not None:
            client.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        left = [n for n in netns_names() if n.startswith("enf-demo-")]
        for name in left:  # never leave them behind, even when the demo did
            subprocess.run(["ip", "netns", "del", name], check=False)
    assert not left, f"the demo left namespaces behind: {left}"
