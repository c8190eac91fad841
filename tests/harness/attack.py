"""The attack driver of the proxy's attack tables: send raw bytes plus a harmless follow-up, judge what happened."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass

from tests.harness.e2e_stack import Seen, Stack
from tests.harness.raw import Raw, Reply, request


def marker() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class Outcome:
    first: Reply | None
    follow: Reply | None
    closed: bool
    seen: list[Seen]
    follow_path: str

    @property
    def follow_seen(self) -> bool:
        return any(s.target == self.follow_path for s in self.seen)

    @property
    def attack_seen(self) -> list[Seen]:
        return [s for s in self.seen if s.target != self.follow_path]


async def attack(stack: Stack, payload: bytes, *, head: bool = False, settle: float = 0.3, **open_kw: object) -> Outcome:
    """Send ``payload`` then, in the same write, a harmless public GET; collect what happened."""
    follow_path = f"/public/after-{marker()}"
    before = len(stack.upstream.seen)
    conn = await Raw.open(stack, **open_kw)  # type: ignore[arg-type]
    try:
        await conn.send(payload + request(f"GET {follow_path} HTTP/1.1", "Connection: close", port=stack.port))
        first = await conn.reply(head=head)
        follow = await conn.reply(timeout=8.0) if first is not None else None
        closed = await conn.closed(2.0) if follow is not None else True
    finally:
        await conn.close()
    await asyncio.sleep(settle)
    return Outcome(first, follow, closed, stack.upstream.seen[before:], follow_path)


def assert_close(out: Outcome, *statuses: int) -> None:
    """400-CLOSE: the named status, the connection ends, nothing (not even the follow-up) reaches the app."""
    assert out.first is not None, "no answer at all"
    assert out.first.status in (statuses or (400,)), (out.first.status, out.first.text[:200])
    assert out.first.header("Connection") == ["close"], out.first.headers
    assert out.follow is None, f"request after a {out.first.status} was processed: {out.follow}"
    assert out.closed
    assert out.seen == [], [(s.method, s.target) for s in out.seen]


def assert_served_then_next(out: Outcome, status: int = 200) -> None:
    """The request got ``status`` and the pipelined follow-up was served, unpoisoned, as its own request."""
    assert out.first is not None and out.first.status == status, out.first and (out.first.status, out.first.text[:200])
    assert out.follow is not None and out.follow.status == 200, out.follow and out.follow.text[:200]
    assert json.loads(out.follow.body)["path"] == out.follow_path
    assert [s.target for s in out.seen].count(out.follow_path) == 1


