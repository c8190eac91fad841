"""The JWKS cache of enforcer.identity.oidc.Provider against the in-process fake OP.

Each test runs a real :class:`Provider` over HTTPS against :class:`tests.harness.fake_op.FakeOP`
(which counts the JWKS requests it answers) with an injected clock: its ``sleep`` moves the
clock instead of waiting, so throttle windows and key ages are exact and the tests are fast.
Rows: P-JWKS-01 (rotation), P-JWKS-02 (unknown-kid flood), P-JWKS-04/05 (failing endpoint,
key age) of /work/shared/spec/conformance.md, and issue 19 item 3.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from enforcer.identity.oidc import Provider, client_ssl_context
from enforcer.identity.tokens import OIDCError, VerifiedToken
from tests.harness.fake_op import DELETE, FakeOP, compact

FLOOR = 0.1
INTERVAL = 60.0
MAX_AGE = 3600.0
GRACE = 1800.0


@dataclass
class FakeClock:
    """A monotonic clock that only moves when told to (or when the provider sleeps)."""

    now: float = 10_000.0
    slept: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@dataclass
class Rig:
    """A provider on a fake clock, its OP and the events it reported."""

    op: FakeOP
    provider: Provider
    clock: FakeClock
    events: list[str]

    def jwks_requests(self) -> int:
        return len(self.op.seen("/jwks"))

    def claims(self) -> dict[str, Any]:
        return self.op.id_token_claims(None, None)

    async def verify(self, token: str) -> VerifiedToken:
        return await self.provider.verify(token)

    async def code(self, token: str) -> str:
        with pytest.raises(OIDCError) as info:
            await self.provider.verify(token)
        return info.value.code


@pytest_asyncio.fixture(scope="module")
async def op(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FakeOP]:
    """One fake OP for the module (key generation is the slow part)."""
    fake = FakeOP(workdir=tmp_path_factory.mktemp("jwks-op"))
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest_asyncio.fixture
async def rig(op: FakeOP) -> AsyncIterator[Rig]:
    """A discovered provider on a fake clock, against a correct OP with nothing recorded."""
    op.reset()
    clock = FakeClock()
    events: list[str] = []
    async with aiohttp.ClientSession() as http:
        provider = Provider(
            issuer=op.issuer,
            http=http,
            ssl_context=client_ssl_context(str(op.ca_file)),
            jwks_refresh_interval=INTERVAL,
            jwks_min_fetch_interval=FLOOR,
            jwks_max_age=MAX_AGE,
            jwks_stale_grace=GRACE,
            on_jwks_event=events.append,
            clock=clock,
            sleep=clock.sleep,
        )
        await provider.discover()
        yield Rig(op=op, provider=provider, clock=clock, events=events)


def made_up_kid_token(op: FakeOP) -> str:
    """A token with a random kid no JWKS will ever hold (its signature is never checked)."""
    header = {"alg": "RS256", "typ": "JWT", "kid": "made-up-" + secrets.token_hex(8)}
    return compact(header, op.id_token_claims(None, None), b"\x00" * 256)


# ------------------------------------------------------------------------------ rotation


async def test_every_login_verifies_when_the_idp_rotates_its_key_per_token(rig: Rig) -> None:
    """Issue 19: five tokens within half a second, each signed by a new key, all verify with one fetch each."""
    rig.op.behaviour.rotate_every_token = True
    start, fetches = rig.clock.now, rig.jwks_requests()
    for _ in range(5):
        token = rig.op.sign(rig.claims(), how="rotating")
        verified = await rig.verify(token)
        assert verified.header["kid"] == rig.op.rotated[-1].kid
        rig.clock.now += 0.01
    assert rig.jwks_requests() - fetches == 5
    assert rig.clock.now - start <= 5 * (FLOOR + 0.01) + 1e-9
    assert all(s <= FLOOR + 1e-9 for s in rig.clock.slept)


async def test_a_key_rotated_before_the_first_token_is_found(rig: Rig) -> None:
    """P-JWKS-01 native: a key published after discovery verifies after one refetch, without waiting."""
    rig.clock.now += FLOOR
    fetches = rig.jwks_requests()
    rig.op.rotate()
    await rig.verify(rig.op.sign(rig.claims()))
    assert rig.jwks_requests() - fetches == 1
    assert rig.clock.slept == []


# ------------------------------------------------------------------------------ throttle


async def test_a_made_up_kid_is_looked_up_once_per_interval(rig: Rig) -> None:
    """P-JWKS-02: the same unknown kid 100 times costs one fetch; after the interval it may cost one more."""
    token = made_up_kid_token(rig.op)
    fetches = rig.jwks_requests()
    for _ in range(100):
        assert await rig.code(token) == "id_token_unknown_key"
    assert rig.jwks_requests() - fetches == 1
    assert rig.events.count("throttled") == 99
    rig.clock.now += INTERVAL
    assert await rig.code(token) == "id_token_unknown_key"
    assert rig.jwks_requests() - fetches == 2


async def test_1000_concurrent_random_kids_share_one_fetch_and_a_new_key_still_verifies(rig: Rig) -> None:
    """P-JWKS-02: 1,000 concurrent random kids cause at most two fetches; a genuinely new kid among them verifies within the floor."""
    fetches, start = rig.jwks_requests(), rig.clock.now
    rig.op.rotate()
    genuine = rig.op.sign(rig.claims())
    flood = [made_up_kid_token(rig.op) for _ in range(1000)]
    results = await asyncio.gather(*(rig.verify(t) for t in [*flood[:500], genuine, *flood[500:]]),
                                   return_exceptions=True)
    assert isinstance(results[500], VerifiedToken)
    refused = [r for i, r in enumerate(results) if i != 500]
    assert all(isinstance(r, OIDCError) and r.code == "id_token_unknown_key" for r in refused)
    assert rig.jwks_requests() - fetches <= 2
    assert rig.clock.now - start <= FLOOR + 1e-9


async def test_waves_of_random_kids_fetch_at_most_once_per_floor(rig: Rig) -> None:
    """P-JWKS-02: 1,000 random kids in 10 waves 50 ms apart cost at most one fetch per floor, and a new kid after the flood verifies within the floor."""
    fetches, start = rig.jwks_requests(), rig.clock.now
    for _ in range(10):
        wave = [made_up_kid_token(rig.op) for _ in range(100)]
        results = await asyncio.gather(*(rig.verify(t) for t in wave), return_exceptions=True)
        assert all(isinstance(r, OIDCError) and r.code == "id_token_unknown_key" for r in results)
        rig.clock.now += 0.05
    elapsed = rig.clock.now - start
    assert rig.jwks_requests() - fetches <= 1 + elapsed / FLOOR
    assert rig.jwks_requests() - fetches <= 11
    rig.op.rotate()
    before = rig.clock.now
    await rig.verify(rig.op.sign(rig.claims()))
    assert rig.clock.now - before <= FLOOR + 1e-9


@pytest.mark.parametrize("kid", [7, "k" * 257, ["rsa-1"]])
async def test_a_kid_no_jwks_can_hold_is_refused_without_a_fetch(rig: Rig, kid: Any) -> None:
    """P-JOSE-06: a kid that is not a short string can never match, so it is refused without a JWKS fetch."""
    fetches = rig.jwks_requests()
    token = compact({"alg": "RS256", "kid": kid}, rig.claims(), b"\x00" * 256)
    assert await rig.code(token) == "id_token_unknown_key"
    assert rig.jwks_requests() == fetches


# ------------------------------------------------------------------------------ failing endpoint


@pytest.mark.parametrize(("case", "header", "codes"), [
    ("new kid", {"kid": "stranger"}, {"id_token_unknown_key"}),
    ("a known kid", {"kid": "rsa-1"}, {"id_token_bad_signature"}),
    ("another key's kid", {"kid": "ec-1"}, {"id_token_unknown_key"}),
    ("no kid", {"kid": DELETE}, {"id_token_bad_signature"}),
])
async def test_a_key_never_seen_is_refused_while_the_jwks_fails(
    rig: Rig, case: str, header: dict[str, Any], codes: set[str]
) -> None:
    """No fallback key: with the JWKS endpoint failing, a token signed by a key never published is refused whatever kid it names."""
    rig.op.behaviour.jwks_status = 500
    rig.clock.now += FLOOR
    token = rig.op.sign(rig.claims(), how="unknown", header={"typ": "JWT", **header})
    assert await rig.code(token) in codes, case
    await rig.verify(rig.op.sign(rig.claims()))  # the known key still works


@pytest.mark.parametrize(("age", "outcome"), [
    (MAX_AGE - 1, "ok"),  # fresh: no fetch at all
    (MAX_AGE + 1, "ok"),  # stale, the refetch fails: the last good set is kept (P-JWKS-04)
    (MAX_AGE + GRACE - 1, "ok"),
    (MAX_AGE + GRACE + 1, "jwks_http_error"),  # past the grace: fail closed
])
async def test_known_keys_outlive_a_failing_jwks_for_the_grace_only(rig: Rig, age: float, outcome: str) -> None:
    """A set older than jwks_max_age that cannot be refetched verifies for jwks_stale_grace more, then every token is refused."""
    rig.op.behaviour.jwks_status = 500
    token = rig.op.sign(rig.claims())
    rig.clock.now = rig.provider.keys_fetched + age
    if outcome == "ok":
        await rig.verify(token)
    else:
        assert await rig.code(token) == outcome
        assert rig.provider.keys == []
        assert "expired" in rig.events


async def test_a_failed_stale_refresh_is_retried_once_per_interval_and_recovers(rig: Rig) -> None:
    """P-JWKS-04: while the stale set is kept, the refetch is retried once per interval; past the grace a working JWKS brings logins back."""
    rig.op.behaviour.jwks_status = 500
    token = rig.op.sign(rig.claims())
    fetches = rig.jwks_requests()
    rig.clock.now = rig.provider.keys_fetched + MAX_AGE + 1
    for _ in range(20):
        await rig.verify(token)
    assert rig.jwks_requests() - fetches == 1
    rig.clock.now += INTERVAL
    await rig.verify(token)
    assert rig.jwks_requests() - fetches == 2
    rig.clock.now += GRACE
    assert await rig.code(token) == "jwks_http_error"
    rig.op.behaviour.jwks_status = 200
    await rig.verify(token)
    assert rig.events[-1] == "success"


async def test_a_removed_key_is_refused_once_the_set_is_refetched(rig: Rig) -> None:
    """P-JWKS-05: when the stale set is refetched, a key the OP removed no longer verifies."""
    rig.op.behaviour.jwks_keys = [rig.op.rsa2.as_dict(private=False)]
    rig.clock.now = rig.provider.keys_fetched + MAX_AGE + 1
    assert await rig.code(rig.op.sign(rig.claims())) == "id_token_unknown_key"


# ------------------------------------------------------------------------------ visibility


async def test_fetch_failures_and_throttled_kids_are_counted_and_logged(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed JWKS fetch and a throttled unknown kid each reach the event hook and the log; 50 throttled kids log one line."""
    caplog.set_level(logging.WARNING, logger="enforcer.identity.oidc")
    token = made_up_kid_token(rig.op)
    for _ in range(51):
        await rig.code(token)
    rig.op.behaviour.jwks_status = 503
    rig.clock.now += FLOOR
    await rig.code(made_up_kid_token(rig.op))
    assert rig.events.count("throttled") == 50
    assert rig.events.count("failure") == 1
    assert rig.provider.jwks_events["throttled"] == 50
    messages = [r.getMessage() for r in caplog.records]
    assert sum("not looked up again" in m for m in messages) == 1
    assert any("JWKS fetch" in m and "jwks_http_error" in m for m in messages)
