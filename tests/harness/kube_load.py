"""Load from the client namespace while the enforcer pod is replaced: what each request got, when.

:class:`Load` runs on a :class:`~tests.harness.netns.NetnsLoop` (so every connection comes from
the client network namespace) with three kinds of workers, each on a new connection per
request:

* ``user``: a signed-in browser (its session cookie) asking for ``/<tag>/user/<n>``;
* ``anon``: a browser with no cookie at all (its jar is emptied before each request, so the
  login transaction cookies of the enforcer's redirects do not pile up);
* ``port``: a bare TCP connect to the app's own port, which must always be refused.

Every outcome is a :class:`Sample` with its start and end time (``time.monotonic()``, the same
clock as the test's thread); :func:`outage` reads the interruption out of the samples.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from dataclasses import dataclass, field

import aiohttp

from tests.harness.browser import ScriptedBrowser


@dataclass(frozen=True)
class Sample:
    """One request of the load (``status`` None: the connection failed; ``error`` says how)."""

    kind: str
    start: float
    end: float
    status: int | None = None
    user: str | None = None
    location: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """A signed-in request answered by the app with the user's identity."""
        return self.status == 200 and self.user is not None


@dataclass
class Load:
    """The workers' shared state; ``stop`` (thread-safe) ends them after their current request."""

    base: str
    tag: str
    user: ScriptedBrowser
    anon: ScriptedBrowser
    app_addr: tuple[str, int]
    samples: list[Sample] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    pause: float = 0.02

    async def _user(self, w: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            await self._http("user", self.user, f"{self.base}/{self.tag}/user/{w}/{n}")
            await asyncio.sleep(self.pause)

    async def _anon(self, w: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            self.anon.cookies.clear()
            await self._http("anon", self.anon, f"{self.base}/{self.tag}/anon/{w}/{n}")
            await asyncio.sleep(self.pause)

    async def _http(self, kind: str, browser: ScriptedBrowser, url: str) -> None:
        start = time.monotonic()
        try:
            page = await browser.get(url, follow=False)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.samples.append(Sample(kind, start, time.monotonic(), error=type(exc).__name__))
            return
        user = None
        if page.status == 200:
            try:
                user = json.loads(page.text).get("user")
            except ValueError:
                user = None
        self.samples.append(Sample(kind, start, time.monotonic(), page.status, user, page.location))

    async def _port(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                _reader, writer = await asyncio.wait_for(asyncio.open_connection(*self.app_addr), 3)
            except (OSError, TimeoutError) as exc:
                self.samples.append(Sample("port", start, time.monotonic(), error=type(exc).__name__))
            else:
                writer.close()
                self.samples.append(Sample("port", start, time.monotonic(), status=0, error="connected"))
            await asyncio.sleep(0.05)

    async def run(self, users: int = 3, anons: int = 2) -> None:
        """Run every worker until :attr:`stop` is set (call on the client's NetnsLoop)."""
        await asyncio.gather(
            *(self._user(w) for w in range(users)), *(self._anon(w) for w in range(anons)), self._port()
        )

    def of(self, kind: str) -> list[Sample]:
        return [s for s in list(self.samples) if s.kind == kind]


@dataclass(frozen=True)
class Outage:
    """How the signed-in requests fared around an event at ``at`` (seconds relative to ``at``)."""

    first_failure: float | None
    """Start of the first signed-in request after ``at`` that was not served (None: none failed)."""
    resumed: float | None
    """End of the first signed-in request served after the last failure (None: never resumed)."""
    longest_gap: float
    """The longest time between two served signed-in requests after ``at``."""
    failed: int


def outage(samples: list[Sample], at: float) -> Outage:
    """Read the interruption of the signed-in requests out of ``samples`` for an event at ``at``."""
    users = sorted((s for s in samples if s.kind == "user"), key=lambda s: s.start)
    after = [s for s in users if s.end >= at]
    failures = [s for s in after if not s.ok]
    first_failure = failures[0].start - at if failures else None
    last_failure_start = failures[-1].start if failures else at
    resumed_at = min((s.end for s in after if s.ok and s.start > last_failure_start), default=None)
    ok_ends = sorted(s.end for s in users if s.ok)
    before = [e for e in ok_ends if e < at][-1:]
    ends = before + [e for e in ok_ends if e >= at]
    gaps = [b - a for a, b in itertools.pairwise(ends)]
    return Outage(
        first_failure=first_failure,
        resumed=None if resumed_at is None else resumed_at - at,
        longest_gap=max(gaps, default=0.0),
        failed=len(failures),
    )
