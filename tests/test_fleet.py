"""Sessions for a fleet (issue 17): three enforcers on three hosts behind HAProxy, one Redis.

Real parts only: network namespaces (see ``tests/harness/fleet.py``), the real node OpenID
Provider, redis-server and HAProxy from Debian, ``python -m enforcer run`` processes, a recording
app. The fleet is built once for the module; each test leaves it whole (every enforcer running,
Redis up) for the next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.harness.browser import Response, ScriptedBrowser
from tests.harness.fleet import BASE, HOST4, USERS, Fleet, fleet
from tests.harness.netns import require_root
from tests.harness.prereq import require, require_e2e

pytestmark = [pytest.mark.root, pytest.mark.e2e]


@pytest_asyncio.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    """The fleet, torn down afterwards (even on failure)."""
    require_root()
    require_e2e()
    import shutil  # noqa: PLC0415

    require(shutil.which("haproxy") is not None, "haproxy (scripts/setup)")
    require(shutil.which("redis-server") is not None, "redis-server (scripts/setup)")
    async with fleet(tmp_path_factory.mktemp("fleet")) as f:
        yield f


async def login(stack: Fleet, browser: ScriptedBrowser, path: str = "/") -> Response:
    """Log alice in through whatever ``browser`` resolves app.test to."""
    return await stack.client.run(browser.login(BASE + path, "alice", USERS["alice"].password))


def unauthenticated(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """App requests that came without an identity header (none may ever exist: every path is protected)."""
    return [r for r in rows if not any(k.lower() == "x-forwarded-user" for k, _ in r["headers"])]


async def test_one_login_then_1000_requests_through_the_load_balancer(stack: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """One login through HAProxy, then 1,000 requests on new connections spread over three enforcers: all served, none asks to log in again."""
    browser = await stack.browser(new_connection_per_request=True)
    try:
        page = await login(stack, browser, "/first")
        assert page.status == 200, (page.status, page.text[:300])
        logins = sum(1 for u in page.urls if u.startswith(stack.op.issuer + "/auth?"))
        assert logins == 1, page.urls
        before = len(stack.seen())

        async def burst() -> list[Response]:
            sem = asyncio.Semaphore(8)

            async def one(i: int) -> Response:
                async with sem:
                    return await browser.get(f"{BASE}/r/{i}", follow=False)

            return await asyncio.gather(*(one(i) for i in range(1000)))

        start = time.monotonic()
        answers = await stack.client.run(burst(), timeout=300)
        elapsed = time.monotonic() - start
    finally:
        await stack.client.run(browser.close())
    assert [a.status for a in answers] == [200] * 1000, {a.status for a in answers}
    rows = stack.seen()[before:]
    assert len(rows) == 1000
    assert unauthenticated(stack.seen()) == []
    by_enforcer = {a: sum(1 for r in rows if r["peer"].removeprefix("::ffff:") == a) for a in HOST4}
    assert all(n > 200 for n in by_enforcer.values()), by_enforcer  # round-robin: about a third each
    with capsys.disabled():
        print(f"\n[fleet] 1,000 requests (one new connection each) in {elapsed:.1f} s; per enforcer: {by_enforcer}")
