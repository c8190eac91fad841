"""`enforcer demo` (the README's first command) starts a working setup a person can log in to."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import sys
from pathlib import Path

import pytest

from tests.conftest import require_e2e
from tests.e2e_stack import free_port
from tests.harness.browser import ScriptedBrowser

pytestmark = pytest.mark.e2e


async def test_demo_serves_the_sample_app_behind_a_login(tmp_path: Path) -> None:
    """The demo prints its URL; alice logs in and sees the sample app, eve is denied, /healthz is public."""
    require_e2e()
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "enforcer", "demo", "--port", str(port), "--state-dir", str(tmp_path / "demo"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        banner = ""
        async with asyncio.timeout(60):
            while "Stop with Ctrl-C" not in banner:
                line = await proc.stdout.readline()
                if not line:
                    pytest.fail("demo exited early:\n" + banner)
                banner += line.decode()
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
