"""Pages the enforcer writes itself: security headers, escaping, no secrets."""

from __future__ import annotations

import json

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
