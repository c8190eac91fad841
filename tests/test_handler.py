"""Pure helpers of the request path: API-client detection and Host parsing."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import given
from hypothesis import strategies as st

from enforcer.handler import _split_host, is_api_request


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
    assert _split_host(value) == expected


@given(st.text(max_size=60))
def test_host_parsing_is_total(value: str) -> None:
    """_split_host never raises, whatever the client sends."""
    result = _split_host(value)
    assert result is None or (isinstance(result[0], str) and (result[1] is None or 0 < result[1] <= 65535))
