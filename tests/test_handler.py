"""Pure helpers of the request path: API-client detection and Host parsing."""

from __future__ import annotations

import types
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import given
from hypothesis import strategies as st

from enforcer.config.definitions import IdentityHeaders
from enforcer.http.gate import is_api_request
from enforcer.http.headers import MAX_IDENTITY_VALUE, clean_value
from enforcer.http.plan import identity_headers, split_host
from enforcer.identity.sessions import Session


@pytest.mark.parametrize(
    ("headers", "api"),
    [
        ({"Accept": "text/html,application/xhtml+xml", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}, False),
        ({"Accept": "*/*"}, False),
        ({}, False),
        ({"Accept": "application/json"}, True),
        ({"Accept": "text/html", "X-Requested-With": "XMLHttpRequest"}, True),
        ({"Accept": "text/html", "Sec-Fetch-Mode": "cors"}, True),
        ({"Accept": "text/html", "Sec-Fetch-Dest": "empty"}, True),
        ({"Accept": "text/html", "Sec-Fetch-Dest": "iframe"}, True),
        ({"Upgrade": "websocket", "Connection": "Upgrade"}, True),
    ],
)
def test_api_requests_get_401_not_a_redirect(headers: dict[str, str], api: bool) -> None:
    """mod_auth_openidc's heuristics decide who gets a 401 instead of a login redirect."""
    assert is_api_request(make_mocked_request("GET", "/", headers=headers)) is api


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("app.example", ("app.example", None)),
        ("APP.Example.COM", ("app.example.com", None)),
        ("app.example.", ("app.example", None)),
        ("app.example:443", ("app.example", 443)),
        ("[::1]:8443", ("::1", 8443)),
        ("127.0.0.1", ("127.0.0.1", None)),
        ("app.example:0443", None),
        ("app.example:", None),
        ("app.example:99999x", None),
        ("app.example:65536", None),
        ("app.example@evil", None),
        ("a b", None),
        ("a,b", None),
        ("", None),
        ("[::1", None),
        ("app/x", None),
    ],
)
def test_host_header_parsing(value: str, expected: tuple[str, int | None] | None) -> None:
    """Host is lower-cased without trailing dot; ports must be plain digits; odd forms are refused."""
    assert split_host(value) == expected


@given(st.text(max_size=60))
def test_host_parsing_is_total(value: str) -> None:
    """split_host never raises, whatever the client sends."""
    result = split_host(value)
    assert result is None or (isinstance(result[0], str) and (result[1] is None or 0 < result[1] <= 65535))


# ------------------------------------------------------------------ identity headers (X-LIM-05)


def _session_with_groups(groups: list[str]) -> Session:
    return Session(
        service="app", issuer="https://idp", sub="u1", email="u1@example.com", username="u1",
        tags=frozenset(f"groups={g}" for g in groups), sid=None, id_token="", created=0.0, last_seen=0.0,
        expires=1.0,
    )


def _service_with_groups_header() -> Any:
    return types.SimpleNamespace(identity_headers=IdentityHeaders(groups="X-Forwarded-Groups"))


def test_a_huge_group_list_is_cut_at_whole_groups_never_inside_one() -> None:
    """Groups that do not fit the header limit are left out whole: every group the app sees
    is one the user has, and the value fits without being truncated."""
    groups = [f"team-{i:04d}-administrators" for i in range(400)]
    value = identity_headers(_service_with_groups_header(), _session_with_groups(groups))["X-Forwarded-Groups"]
    sent = value.split(",")
    assert set(sent) <= set(groups) and 0 < len(sent) < len(groups)
    assert len(clean_value(value)) <= MAX_IDENTITY_VALUE and clean_value(value) == value


def test_a_single_group_longer_than_the_limit_is_left_out() -> None:
    """A group name longer than the limit (after percent-encoding) is not sent cut short."""
    groups = ["staff", "\u00e9" * 2000]  # 2,000 characters, 12,000 once percent-encoded
    value = identity_headers(_service_with_groups_header(), _session_with_groups(groups))["X-Forwarded-Groups"]
    assert value == "staff"


@given(st.lists(st.text(min_size=1, max_size=300), max_size=60))
def test_groups_header_is_always_whole_groups_within_the_limit(groups: list[str]) -> None:
    """For any group names, the header holds only whole names of the user and fits the limit."""
    value = identity_headers(_service_with_groups_header(), _session_with_groups(groups))["X-Forwarded-Groups"]
    assert len(clean_value(value)) <= MAX_IDENTITY_VALUE
    kept = sorted(set(groups))
    joined = [g for g in kept if g in value.split(",")] if value else []
    assert ",".join(joined) == value or any("," in g for g in groups)
