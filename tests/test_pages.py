"""Pages the enforcer writes itself: security headers, escaping, no secrets."""

from __future__ import annotations

import json

import pytest

from enforcer.http import pages


def test_error_page_escapes_everything_it_shows() -> None:
    """Reason, message, tags and retry URL are HTML-escaped; the flow id is shown."""
    resp = pages.error_page(
        403, "<script>x</script>", "abc123", message="<b>hi</b>",
        would_allow=[frozenset({"groups=<admins>"})], missing=["email=\"x\""], retry_url="https://a/?q='x'",
    )
    body = resp.text or ""
    assert "<script>" not in body and "&lt;script&gt;" in body
    assert "<b>hi" not in body
    assert "groups=&lt;admins&gt;" in body
    assert "abc123" in body
    assert "&#x27;x&#x27;" in body


def test_enforcer_pages_carry_the_security_headers() -> None:
    """Every generated response is uncacheable, unframeable and sends no referrer."""
    for resp in (
        pages.error_page(400, "bad", "f"),
        pages.json_error(401, "login_required", "f"),
        pages.redirect("https://idp/x"),
        pages.info_page("t", "<p>x</p>"),
        pages.plain_close(400, "x"),
    ):
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Strict-Transport-Security"].startswith("max-age=31536000")


def test_json_401_has_www_authenticate_and_login_url() -> None:
    """API clients get a JSON error, a WWW-Authenticate challenge and where to log in."""
    resp = pages.json_error(401, "login_required", "fid", login_url="https://app/x")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(resp.text or "") == {"error": "login_required", "flow_id": "fid", "login": "https://app/x"}


def test_redirect_sets_each_cookie_separately() -> None:
    """Several Set-Cookie values stay separate header lines."""
    resp = pages.redirect("/x", set_cookies=["a=1; Path=/", "b=2; Path=/"])
    assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert resp.status == 302


DENY_SETS = (frozenset({"groups=admins"}), frozenset({"email=alice@example.com"}), frozenset({"sub=42", "groups=ops"}))


@pytest.mark.parametrize(
    ("show", "present", "absent"),
    [
        ("groups", ["groups=admins", "Rule: <code>admin-area</code>", "2 more rule(s)"],
         ["alice@example.com", "sub=42", "groups=ops"]),
        ("all", ["groups=admins", "alice@example.com", "sub=42", "Rule: <code>admin-area</code>"], ["more rule(s)"]),
        ("none", ["missing_tags"], ["groups=admins", "alice@example.com", "Rule:"]),
    ],
)
def test_deny_page_shows_as_much_as_the_setting_says(show: str, present: list[str], absent: list[str]) -> None:
    """denyPage.show decides what the 403 tells; by default no other person's email= or sub= appears."""
    resp = pages.deny_page(
        "missing_tags", "f1", rule="admin-area", would_allow=DENY_SETS, missing={"groups=admins"}, show=show,
        sign_out_url="/oauth2/logout",
    )
    body = resp.text or ""
    assert all(p in body for p in present), body
    assert not any(a in body for a in absent), body
    assert "Sign out / use another account" in body
    assert resp.headers[pages.FLOW_HEADER] == "f1"


def test_deny_page_hides_missing_tags_that_name_a_person() -> None:
    """The missing tags are shown only when they come from a tag set the page shows."""
    resp = pages.deny_page(
        "missing_tags", "f1", rule=None, would_allow=[frozenset({"email=alice@example.com"})],
        missing={"email=alice@example.com"},
    )
    assert "alice" not in (resp.text or "")


def test_plain_close_names_its_flow() -> None:
    """A plain closing answer given a flow id shows it in its line and its header."""
    resp = pages.plain_close(400, "bad request target", "abc")
    assert resp.text == "bad request target (flow id abc)\n"
    assert resp.headers[pages.FLOW_HEADER] == "abc"
