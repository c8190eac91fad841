"""Sessions for a fleet (issue 17): three enforcers on three hosts behind HAProxy, one Redis.

Real parts only: network namespaces (see ``tests/harness/fleet.py``), the real node OpenID
Provider, redis-server and HAProxy from Debian, ``python -m enforcer run`` processes, a recording
app. The fleet is built once for the module; each test leaves it whole (every enforcer running,
Redis up) for the next.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.harness.browser import Response, ScriptedBrowser
from tests.harness.fleet import BASE, COOKIE, HOST4, HUB4, USERS, Fleet, fleet
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


async def cookie_of(browser: ScriptedBrowser) -> str:
    """The session cookie ``browser`` holds, as a ``Cookie`` header value."""
    cookie = browser.cookies.get(COOKIE)
    assert cookie is not None, browser.cookies.names()
    return f"{COOKIE}={cookie.value}"


class Direct:
    """Requests sent straight to each enforcer (bypassing HAProxy) with a given Cookie header."""

    def __init__(self, stack: Fleet, browsers: list[ScriptedBrowser]) -> None:
        self.stack = stack
        self.browsers = browsers

    @classmethod
    async def open(cls, stack: Fleet) -> Direct:
        return cls(stack, [await stack.browser(address) for address in HOST4])

    async def get(self, i: int, path: str, cookie: str) -> Response:
        """GET ``path`` on enforcer ``i`` (0-based) with ``cookie``; redirects not followed."""
        b = self.browsers[i]
        return await self.stack.client.run(b.request("GET", BASE + path, follow=False, headers={"Cookie": cookie}))

    async def until_refused(self, i: int, cookie: str, start: float, limit: float = 3.0) -> tuple[float, Response]:
        """Ask enforcer ``i`` every ~5 ms until it no longer serves ``cookie``: (seconds since ``start``, answer)."""
        n = 0
        while True:
            n += 1
            page = await self.get(i, f"/probe/{i}/{n}", cookie)
            if page.status != 200:
                return time.monotonic() - start, page
            if time.monotonic() - start > limit:
                return limit + 1, page
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        for b in self.browsers:
            await self.stack.client.run(b.close())


def is_login(page: Response, stack: Fleet) -> bool:
    return page.status == 302 and (page.location or "").startswith(stack.op.issuer + "/auth?")


async def test_kill_9_one_enforcer_under_load_nobody_logs_in_again(
    stack: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """kill -9 of one enforcer under load through HAProxy: every request is served (a reset connection retried, as a browser does, at most twice), none is sent to log in again, none reaches the app unauthenticated; the restarted enforcer serves the session."""
    browser = await stack.browser(new_connection_per_request=True)
    direct = await Direct.open(stack)
    victim = stack.enforcers[1]
    try:
        assert (await login(stack, browser, "/before-kill")).status == 200
        cookie = await cookie_of(browser)
        statuses: list[int] = []
        resets = [0]
        unserved = [0]
        stop = asyncio.Event()

        async def load() -> None:
            async def worker(w: int) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    for _attempt in range(3):  # as a browser does, retry a GET on a reset connection
                        try:
                            page = await browser.get(f"{BASE}/load/{w}/{n}", follow=False)
                        except (aiohttp.ClientError, OSError):
                            resets[0] += 1
                            continue
                        statuses.append(page.status)
                        break
                    else:  # three resets in a row: the user would have seen an error page
                        unserved[0] += 1

            await asyncio.gather(*(worker(w) for w in range(6)))

        async def stopper() -> None:
            stop.set()

        task = asyncio.ensure_future(stack.client.run(load(), timeout=120))
        await asyncio.sleep(1.0)
        assert victim.proc is not None
        victim.proc.kill()  # SIGKILL: `ip netns exec` exec()s, so this is the enforcer itself
        served_before_kill = len(statuses)
        await asyncio.sleep(2.0)
        await stack.client.run(stopper())
        await task
        assert await victim.stop() == -9
        victim.start()
        await victim.wait_ready()
        after = await direct.get(1, "/after-restart", cookie)
    finally:
        await stack.client.run(browser.close())
        await direct.close()
    assert after.status == 200, (after.status, after.location)
    assert len(statuses) > served_before_kill + 50, (served_before_kill, len(statuses))
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}  # never a 302 to the OP
    assert unserved[0] == 0, f"{unserved[0]} requests failed three times in a row"
    assert unauthenticated(stack.seen()) == []
    with capsys.disabled():
        print(f"\n[fleet] kill -9 under load: {len(statuses)} requests served ({served_before_kill} before the kill), "
              f"{resets[0]} connection reset(s) retried, 0 unserved after 3 tries, 0 asked to log in, "
              "0 unauthenticated at the app")


@pytest.mark.parametrize("how", ["logout", "backchannel"])
async def test_logout_on_one_enforcer_is_enforced_by_the_others_within_1s(
    stack: Fleet, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A logout at one enforcer (or a back-channel logout the OP sends through HAProxy) is refused by every other enforcer within 1 s, and the refusal is a new login."""
    browser = await stack.browser()
    direct = await Direct.open(stack)
    try:
        assert (await login(stack, browser, f"/before-{how}")).status == 200
        cookie = await cookie_of(browser)
        for i in range(3):  # every enforcer has the session in its cache
            assert (await direct.get(i, f"/warm/{how}/{i}", cookie)).status == 200
        start = time.monotonic()  # the delays below include the logout request itself
        if how == "logout":
            others = [1, 2]
            out = await direct.get(0, "/oauth2/logout", cookie)
            assert out.status == 302 and (out.location or "").startswith(stack.op.issuer + "/session/end"), out.location
        else:
            others = [0, 1, 2]
            out = await stack.client.run(browser.logout(f"{stack.op.issuer}/session/end?client_id=app"))
            assert out.status == 200 and "Signed out" in out.text, out.text[:300]
        refused = await asyncio.gather(*(direct.until_refused(i, cookie, start) for i in others))
    finally:
        await stack.client.run(browser.close())
        await direct.close()
    delays = {HOST4[i]: round(delay * 1000, 1) for i, (delay, _) in zip(others, refused, strict=True)}
    with capsys.disabled():
        print(f"\n[fleet] {how}: refused by the other enforcers after (ms) {delays}")
    for delay, page in refused:
        assert delay <= 1.0, delays
        assert is_login(page, stack), (page.status, page.location)
    if how == "backchannel":  # it came through HAProxy to one enforcer (flow logs flush every 200 ms)
        deadline = time.monotonic() + 3
        while not (flows := [f for e in stack.enforcers for f in e.flows() if f.get("reason") == "backchannel_logout"]):
            assert time.monotonic() < deadline, "no enforcer recorded the back-channel logout"
            await asyncio.sleep(0.1)
        assert len(flows) == 1 and flows[0]["client"].startswith(HUB4), flows


async def store_states(stack: Fleet) -> list[tuple[float | None, int, dict[str, Any]]]:
    """Each enforcer's ``enforcer_session_store_up`` and /readyz (status, problems)."""
    return list(await asyncio.gather(*(asyncio.to_thread(e.store_state) for e in stack.enforcers)))


def flow_reasons(stack: Fleet, ids: set[str]) -> dict[str, str]:
    """The reason each enforcer recorded for the flows ``ids`` (flow logs flush every 200 ms)."""
    return {f["flow_id"]: f["reason"] for e in stack.enforcers for f in e.flows() if f["flow_id"] in ids}


async def test_logout_while_redis_hangs_is_replayed_to_the_whole_fleet(
    stack: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """A logout at one enforcer while Redis hangs clears the cookie and that enforcer refuses the session at once; once Redis answers, every enforcer refuses it (the owed delete), and the flow record and the log say so."""
    browser = await stack.browser()
    direct = await Direct.open(stack)
    try:
        assert (await login(stack, browser, "/before-hung-logout")).status == 200
        cookie = await cookie_of(browser)
        for i in range(3):
            assert (await direct.get(i, f"/warm/hung-logout/{i}", cookie)).status == 200
        stack.redis.pause(True)
        try:
            out = await direct.get(0, "/oauth2/logout", cookie)
            after = await direct.get(0, "/after-hung-logout", cookie)
        finally:
            stack.redis.pause(False)
        resumed = time.monotonic()
        while [(up, status) for up, status, _ in await store_states(stack)] != [(1.0, 200)] * 3:
            assert time.monotonic() - resumed < 10, await store_states(stack)
            await asyncio.sleep(0.05)
        up_after = time.monotonic() - resumed
        refused = [await direct.get(i, f"/after-redis-back/{i}", cookie) for i in range(3)]
    finally:
        await stack.client.run(browser.close())
        await direct.close()
    with capsys.disabled():
        print(f"\n[fleet] logout with Redis hung: answered {out.status}; every enforcer up and refusing it "
              f"{up_after * 1000:.0f} ms after Redis answered again")
    assert out.status == 200 and "reaches every server as soon as it is back" in out.text, out.text[:300]
    assert any(c.startswith(f"{COOKIE}=;") and "Max-Age=0" in c for c in out.set_cookies), out.set_cookies
    assert after.status != 200
    for page in refused:
        assert is_login(page, stack), (page.status, page.location)
    assert not [r for r in stack.seen() if r["path"] in ("/after-hung-logout",) or r["path"].startswith("/after-redis-back/")]
    flow_id = out.headers.get("X-Enforcer-Flow", "")
    deadline = time.monotonic() + 3
    while not (flows := [f for f in stack.enforcers[0].flows() if f["flow_id"] == flow_id]):
        assert time.monotonic() < deadline, "the logout's flow record is missing"
        await asyncio.sleep(0.1)
    assert (flows[0]["decision"], flows[0]["reason"]) == ("logout", "session_store_unavailable"), flows
    log = stack.enforcers[0].tail()
    assert "logout while the session store (Redis) is unavailable" in log and "logout(s) owed" in log, log


@pytest.mark.parametrize("how", ["stopped", "hung"])
async def test_redis_down_fails_closed_and_service_resumes_when_it_returns(
    stack: Fleet, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Redis stopped (or hung: SIGSTOP) under load from several clients: every enforcer reports it (metric 0, /readyz 503 naming sessions), a valid session it has not cached then gets 503 session_store_unavailable, no request without a valid session reaches the app, cached ones stop within the staleness bound; Redis back: metric 1, ready, service resumes with no enforcer restarted."""
    pids = [e.proc.pid for e in stack.enforcers if e.proc is not None]
    alice = await stack.browser()
    other = await stack.browser(HOST4[0])  # logs in on enforcer 1 only: 2 and 3 never cache it
    loaders = [await stack.browser(new_connection_per_request=True) for _ in range(6)]
    direct = await Direct.open(stack)
    stop = asyncio.Event()
    load_answers: dict[str, list[int]] = {"known": [], "bogus": [], "anon": []}
    try:
        assert (await login(stack, alice, f"/before-redis-{how}")).status == 200
        known = await cookie_of(alice)
        for i in range(3):
            assert (await direct.get(i, f"/warm/redis/{how}/{i}", known)).status == 200
        other_page = await login(stack, other, f"/other-login-{how}")
        assert other_page.status == 200, other_page.location
        uncached = await cookie_of(other)
        bogus = f"{COOKIE}={secrets.token_urlsafe(32)}"
        assert [(up, status) for up, status, _ in await store_states(stack)] == [(1.0, 200)] * 3

        async def load() -> None:
            """Six clients through HAProxy, each a new connection per request, two of each: the
            cached session, a well-formed unknown cookie, no cookie (each client its own cookie
            jar: a browser's jar replaces a Cookie header given)."""
            kinds = {"known": {"Cookie": known}, "bogus": {"Cookie": bogus}, "anon": {}}

            async def client(w: int, kind: str, browser: ScriptedBrowser) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    page = await browser.request("GET", f"{BASE}/load-{kind}/{w}/{n}", follow=False,
                                                 headers=kinds[kind])
                    load_answers[kind].append(page.status)

            await asyncio.gather(*(client(w, list(kinds)[w % 3], b) for w, b in enumerate(loaders)))

        async def stopper() -> None:
            stop.set()

        task = asyncio.ensure_future(stack.client.run(load(), timeout=120))
        await asyncio.sleep(0.3)
        if how == "stopped":
            stack.redis.stop()
        else:
            stack.redis.pause(True)
        stopped = time.monotonic()
        last_served: list[float] = []
        seen: dict[int, float] = {}  # enforcer -> when its metric said 0 (and /readyz 503 named sessions)
        down_states: dict[int, tuple[float | None, int, dict[str, Any]]] = {}
        uncached_seen: list[tuple[int, Response]] = []
        bogus_answers: list[int] = []
        while time.monotonic() - stopped < 2.5 or len(seen) < 3:
            assert time.monotonic() - stopped < 8, f"not every enforcer reported the outage: {seen}"
            for i, state in enumerate(await store_states(stack)):
                if i not in seen and state[0] == 0.0:
                    seen[i], down_states[i] = time.monotonic() - stopped, state
            for i in range(3):
                sent = time.monotonic() - stopped
                if (await direct.get(i, f"/known/{how}/{i}", known)).status == 200:
                    last_served.append(sent)
                bogus_answers.append((await direct.get(i, f"/bogus/{how}/{i}", bogus)).status)
            for i in (1, 2):
                was_seen = i in seen
                page = await direct.get(i, f"/uncached/{how}/{i}", uncached)
                if was_seen:
                    uncached_seen.append((i, page))
        await stack.client.run(stopper())
        await task
        outage_paths = [r["path"] for r in stack.seen()
                        if r["path"].startswith(("/bogus/", "/uncached/", "/load-bogus/", "/load-anon/"))]

        if how == "stopped":
            stack.redis.start()
        else:
            stack.redis.pause(False)
        restarted = time.monotonic()
        resumed: dict[int, float] = {}
        while len(resumed) < 3 and time.monotonic() - restarted < 15:
            for i in set(range(3)) - set(resumed):
                if (await direct.get(i, f"/resumed/{how}/{i}", known)).status == 200:
                    resumed[i] = time.monotonic() - restarted
            await asyncio.sleep(0.02)
        up_states = await store_states(stack)
        uncached_after = [(await direct.get(i, f"/uncached-after/{how}/{i}", uncached)).status for i in (1, 2)]
        through_lb = await stack.client.run(alice.get(f"{BASE}/after-redis-{how}", follow=False))
    finally:
        if not stop.is_set():
            await stack.client.run(stopper())
        if stack.redis.proc is None:
            stack.redis.start()
        else:
            stack.redis.pause(False)
        for b in (alice, other, *loaders):
            await stack.client.run(b.close())
        await direct.close()
    ids = {page.headers.get("X-Enforcer-Flow", "") for _, page in uncached_seen}
    deadline = time.monotonic() + 3
    while len(reasons := flow_reasons(stack, ids)) < len(ids):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    with capsys.disabled():
        print(f"\n[fleet] Redis {how}: reported down after (ms) { {HOST4[i]: round(t * 1000) for i, t in seen.items()} }; "
              f"cached session served until {max(last_served, default=0) * 1000:.0f} ms; load answers "
              f"{ {k: {s: v.count(s) for s in sorted(set(v))} for k, v in load_answers.items()} }; "
              f"Redis back: served again after (ms) { {HOST4[i]: round(t * 1000) for i, t in resumed.items()} }")
    for i, (_, status, problems) in down_states.items():
        assert status == 503 and "sessions" in problems, (HOST4[i], status, problems)
    assert uncached_seen and {p.status for _, p in uncached_seen} == {503}, [(i, p.status) for i, p in uncached_seen]
    assert all("Sign-in unavailable" in p.text for _, p in uncached_seen)
    assert set(reasons.values()) == {"session_store_unavailable"} and len(reasons) == len(ids), reasons
    assert outage_paths == []
    assert set(bogus_answers) <= {302, 503}, bogus_answers
    assert load_answers["known"] and set(load_answers["known"]) <= {200, 503}, load_answers  # never a 302
    assert set(load_answers["bogus"]) <= {302, 503} and set(load_answers["anon"]) <= {302, 503}, load_answers
    assert max(last_served, default=0) <= 1.3  # staleness 1 s (+ one round of requests)
    assert sorted(resumed) == [0, 1, 2], resumed
    assert [(up, status) for up, status, _ in up_states] == [(1.0, 200)] * 3, up_states
    assert uncached_after == [200, 200]
    assert through_lb.status == 200
    assert [e.proc.pid for e in stack.enforcers if e.proc is not None] == pids  # no enforcer restarted
    assert unauthenticated(stack.seen()) == []
