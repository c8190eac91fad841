"""Tests for enforcer.policy: canonical paths, patterns, matching and decisions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer.policy import (
    MAX_TARGET_BYTES,
    Decision,
    Endpoint,
    EndpointTable,
    PathError,
    Reason,
    Verdict,
    canonical_path,
    decide,
    explain,
    validate_pattern,
)


def ep(
    uri: str,
    methods: str = "*",
    *scopes: str,
    public: bool = False,
    rule: str = "",
) -> Endpoint:
    """Endpoint from compact test notation: scopes are comma-separated AND lists."""
    return Endpoint(
        uri=uri,
        methods=frozenset(methods.split()),
        public=public,
        allowed_scopes=tuple(frozenset(s.split(",")) for s in scopes),
        rule=rule or uri,
    )


def tags(*t: str) -> frozenset[str]:
    """Frozen tag set."""
    return frozenset(t)


# The configuration of conformance.md §4.2.
PUBLIC = ep("/public/*", "*", public=True)
ADMIN = ep("/admin/*", "*", "groups=admins")
API_STATUS = ep("/api/*/status", "GET", "groups=ops")
STAFF = ep("/*", "GET", "groups=staff")
SPEC_TABLE = EndpointTable([PUBLIC, ADMIN, API_STATUS, STAFF])

ADMIN_USER = tags("groups=admins", "email=root@example.com")
STAFF_USER = tags("groups=staff")

# --- canonical_path: conformance.md X-PATH-01..10 ------------------------------------------

# (target, expected canonical path or PathError code, endpoint the path must land on)
SPEC_PATHS: list[tuple[str, str, Endpoint | None]] = [
    # X-PATH-01 dot segments, raw and encoded, and double encoding
    ("/public/../admin", "/admin", ADMIN),
    ("/public/./../admin", "/admin", ADMIN),
    ("/public/%2e%2e/admin", "/admin", ADMIN),
    ("/public/%2E%2E/admin", "/admin", ADMIN),
    ("/public/.%2e/admin", "/admin", ADMIN),
    ("/public/..%2fadmin", "encoded_separator", None),
    ("/%2e%2e/admin", "/admin", ADMIN),
    ("/public/%252e%252e/admin", "encoded_delimiter", None),
    # X-PATH-02 duplicate slashes
    ("//admin", "/admin", ADMIN),
    ("///admin", "/admin", ADMIN),
    ("/public//../admin", "/admin", ADMIN),
    ("/./admin", "/admin", ADMIN),
    ("/admin/.", "/admin/", ADMIN),
    # X-PATH-03 encoded slash / backslash, raw backslash
    ("/admin%2f", "encoded_separator", None),
    ("/admin%2F", "encoded_separator", None),
    ("/public%2F..%2Fadmin", "encoded_separator", None),
    ("/public/..%5Cadmin", "encoded_separator", None),
    ("/admin%5C", "encoded_separator", None),
    ("\\admin", "bad_target", None),
    ("/public\\..\\admin", "bad_char", None),
    # X-PATH-04 matrix parameters
    ("/admin;jsessionid=x", "semicolon", None),
    ("/public/..;/admin", "semicolon", None),
    ("/admin;/", "semicolon", None),
    ("/public;x=/../admin", "semicolon", None),
    ("/admin%3B", "semicolon", None),
    # X-PATH-05 case, trailing slash, odd suffixes, encoded controls
    ("/ADMIN", "/ADMIN", STAFF),
    ("/Admin", "/Admin", STAFF),
    ("/admin/", "/admin/", ADMIN),
    ("/admin", "/admin", ADMIN),
    ("/admin%20", "/admin%20", STAFF),
    ("/admin.", "/admin.", STAFF),
    ("/admin%00", "encoded_control", None),
    ("/admin%0a", "encoded_control", None),
    ("/admin%0d", "encoded_control", None),
    # X-PATH-06 fragments raw and encoded
    ("/admin#/public", "fragment", None),
    ("/public#/../admin", "fragment", None),
    ("/admin%23/public", "encoded_delimiter", None),
    ("/foo/secret%23/bar", "encoded_delimiter", None),
    # X-PATH-07 the query never takes part in matching
    ("/admin?/public", "/admin", ADMIN),
    ("/api/x?path=/status", "/api/x", STAFF),
    ("/admin?x=/public/", "/admin", ADMIN),
    # X-PATH-08 overlong UTF-8 and Unicode look-alikes
    ("/%c0%ae%c0%ae/admin", "bad_encoding", None),
    ("/public/%c0%af../admin", "bad_encoding", None),
    ("\uff0fadmin", "bad_target", None),
    ("/public\uff0f..\uff0fadmin", "bad_char", None),
    ("/public/%ef%bc%8f..%ef%bc%8fadmin", "/public/%EF%BC%8F..%EF%BC%8Fadmin", PUBLIC),
    ("/\uff41dmin", "bad_char", None),
    ("/%ef%bd%81dmin", "/%EF%BD%81dmin", STAFF),
    # X-PATH-09 non-origin forms are refused here (the handler strips a checked authority)
    ("https://app.example/admin", "bad_target", None),
    ("https://other.example/public", "bad_target", None),
    ("*", "bad_target", None),
    ("app:443", "bad_target", None),
    # X-PATH-10 no leading slash, empty
    ("admin", "bad_target", None),
    ("", "bad_target", None),
]


@pytest.mark.parametrize(("target", "expected", "endpoint"), SPEC_PATHS)
def test_conformance_paths(target: str, expected: str, endpoint: Endpoint | None) -> None:
    """Every X-PATH-01..10 input is refused with its code or lands on the expected rule."""
    if not expected.startswith("/"):
        with pytest.raises(PathError) as info:
            canonical_path(target)
        assert info.value.code == expected
        assert info.value.status == 400
        return
    path, _ = canonical_path(target)
    assert path == expected
    matched, _ = SPEC_TABLE.match("GET", path)
    assert matched is endpoint
    if endpoint is not PUBLIC:
        assert decide("GET", path, None, SPEC_TABLE).verdict is Verdict.LOGIN


def test_conformance_paths_never_reach_admin_as_public() -> None:
    """No X-PATH input that canonicalises to an /admin path is decided by the public rule."""
    for target, expected, _ in SPEC_PATHS:
        if expected in ("/admin", "/admin/"):
            decision = decide("GET", canonical_path(target)[0], None, SPEC_TABLE)
            assert decision.reason is Reason.LOGIN_REQUIRED
            assert decision.endpoint is ADMIN


def test_64k_target_is_414() -> None:
    """A 64 KiB target (X-PATH-10) is refused with status 414 and code too_long."""
    with pytest.raises(PathError) as info:
        canonical_path("/" + "a" * 65535)
    assert (info.value.code, info.value.status) == ("too_long", 414)


def test_length_limit_boundary() -> None:
    """A target of exactly MAX_TARGET_BYTES bytes is accepted and one more byte is 414."""
    target = "/" + "a" * (MAX_TARGET_BYTES - 1)
    assert canonical_path(target)[0] == target
    with pytest.raises(PathError) as info:
        canonical_path(target + "a")
    assert info.value.status == 414


def test_length_counts_utf8_bytes() -> None:
    """Non-ASCII targets are measured in UTF-8 bytes, so they hit 414 before bad_char."""
    with pytest.raises(PathError) as info:
        canonical_path("/" + "\u00e9" * MAX_TARGET_BYTES)
    assert info.value.status == 414


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("/", "/", ""),
        ("/a/./b//c?x=1", "/a/b/c", "x=1"),
        ("/a/b/..", "/a/", ""),
        ("/a/b/../", "/a/", ""),
        ("/..", "/", ""),
        ("/../../..", "/", ""),
        ("/a/../../b", "/b", ""),
        ("/a/..b/.c/...", "/a/..b/.c/...", ""),
        ("/.well-known/openid", "/.well-known/openid", ""),
        ("/%41%62%7e%2D%5f%2e", "/Ab~-_.", ""),
        ("/%3a%40%21%2a%20", "/%3A%40%21%2A%20", ""),
        ("/caf%c3%a9", "/caf%C3%A9", ""),
        ("/%f0%9f%98%80", "/%F0%9F%98%80", ""),
        ("/a?", "/a", ""),
        ("/a?b?c=/../d;e\\f", "/a", "b?c=/../d;e\\f"),
        ("/a//", "/a/", ""),
        ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,=", ""),
    ],
)
def test_canonical_forms(target: str, path: str, query: str) -> None:
    """Accepted targets give the documented canonical path and the raw query."""
    assert canonical_path(target) == (path, query)


@pytest.mark.parametrize(
    ("target", "code"),
    [
        ("/a b", "bad_char"),
        ("/a\tb", "bad_char"),
        ("/a\x7f", "bad_char"),
        ("/a\x00", "bad_char"),
        ("/a?x=\x01", "bad_char"),
        ("/a?x= y", "bad_char"),
        ("/a?x=\u00e9", "bad_char"),
        ("/a?x#y", "fragment"),
        ("/a%", "bad_encoding"),
        ("/a%4", "bad_encoding"),
        ("/a%G1", "bad_encoding"),
        ("/a%+1", "bad_encoding"),
        ("/a%%41", "bad_encoding"),
        ("/a%3f", "encoded_delimiter"),
        ("/a%25", "encoded_delimiter"),
        ("/a%1f", "encoded_control"),
        ("/a%7F", "encoded_control"),
        ("/a%3b", "semicolon"),
        ("/%c3", "bad_encoding"),
        ("/%c3/%a9", "bad_encoding"),
        ("/%e0%80%af", "bad_encoding"),
        ("/%ed%a0%80", "bad_encoding"),
        ("/%f4%90%80%80", "bad_encoding"),
        ("/%80", "bad_encoding"),
        ("/%ff", "bad_encoding"),
    ],
)
def test_refused_targets(target: str, code: str) -> None:
    """Ambiguous, malformed or invalid targets raise PathError with the documented code."""
    with pytest.raises(PathError) as info:
        canonical_path(target)
    assert info.value.code == code
    assert info.value.status == 400


def test_path_error_is_value_error() -> None:
    """PathError is a ValueError carrying code, status and a readable message."""
    err = PathError(Reason.FRAGMENT, "raw '#'")
    assert isinstance(err, ValueError)
    assert (err.code, err.status, str(err)) == ("fragment", 400, "raw '#'")


# --- patterns -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri", ["/", "/*", "/admin", "/admin/", "/admin/*", "/api/*/status", "/a/*/b/*", "/%C3%A9"]
)
def test_valid_patterns(uri: str) -> None:
    """Canonical patterns with whole-segment wildcards are accepted."""
    assert validate_pattern(uri) is None


@pytest.mark.parametrize(
    ("uri", "hint"),
    [
        ("", "non-empty"),
        ("admin/*", "'/admin/*'"),
        ("/a//b", "'/a/b'"),
        ("/a/./b", "'/a/b'"),
        ("/admin/..", "'/'"),
        ("/%c3%a9", "'/%C3%A9'"),
        ("/%41", "'/A'"),
        ("/api/v*", "'/api/*'"),
        ("/api/**", "'/api/*'"),
        ("/foo/.*/bar", "'/foo/*/bar'"),
        ("/a?x=1", "'/a'"),
        ("/a;b", "semicolon"),
        ("/a%2Fb", "encoded_separator"),
        ("/a b", "bad_char"),
    ],
)
def test_invalid_patterns(uri: str, hint: str) -> None:
    """Non-canonical or globbing patterns are rejected with a one-line message naming a fix."""
    problem = validate_pattern(uri)
    assert problem is not None
    assert "\n" not in problem
    assert hint in problem


def test_endpoint_parse_normalises() -> None:
    """Endpoint.parse upper-cases methods and freezes allowed scopes."""
    e = Endpoint.parse("/x/*", ["get", " Post "], allowed_scopes=[["a=1", "b=2"]], rule="r")
    assert e == Endpoint("/x/*", frozenset({"GET", "POST"}), False, (tags("a=1", "b=2"),), "r")


@pytest.mark.parametrize(
    ("uri", "methods"), [("/x*", ["GET"]), ("/x", []), ("/x", [""]), ("/x", ["*", "GET"])]
)
def test_endpoint_parse_rejects(uri: str, methods: list[str]) -> None:
    """Endpoint.parse raises ValueError for a bad pattern or method list."""
    with pytest.raises(ValueError, match="endpoint"):
        Endpoint.parse(uri, methods)


def test_table_rejects_invalid_pattern() -> None:
    """EndpointTable refuses a pattern that validate_pattern rejects instead of ignoring it."""
    with pytest.raises(ValueError, match="whole segment"):
        EndpointTable([ep("/a*")])


# --- matching and specificity ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/x", "/x", True),
        ("/x", "/x/", False),
        ("/x", "/X", False),
        ("/x/", "/x/", True),
        ("/x/*", "/x", True),
        ("/x/*", "/x/", True),
        ("/x/*", "/x/y/z", True),
        ("/x/*", "/xy", False),
        ("/x/*", "/", False),
        ("/*", "/", True),
        ("/*", "/anything/at/all", True),
        ("/api/*/status", "/api/v1/status", True),
        ("/api/*/status", "/api/status", False),
        ("/api/*/status", "/api/v1/v2/status", False),
        ("/api/*/status", "/api/v1/status/", False),
        ("/api/*/*", "/api/v1", True),
        ("/api/*/*", "/api/v1/x/y", True),
        ("/api/*/*", "/api", False),
        ("/api/*/*", "/api/", False),
        ("/", "/", True),
        ("/", "/x", False),
    ],
)
def test_pattern_matching(pattern: str, path: str, matches: bool) -> None:
    """Exact, prefix and one-segment wildcard patterns match exactly the documented paths."""
    e = ep(pattern)
    assert EndpointTable([e]).match("GET", path) == ((e if matches else None), matches)


def test_specificity_order() -> None:
    """Exact beats wildcard, then more literal segments, then longer literal prefix."""
    catch_all = ep("/*")
    api = ep("/api/*")
    any_status = ep("/*/v1/status")
    api_status = ep("/api/*/status")
    api_v1 = ep("/api/v1/*")
    exact = ep("/api/v1/status")
    everything = [catch_all, api, any_status, api_status, api_v1, exact]
    expected_order = [exact, api_v1, api_status, any_status, api, catch_all]
    for i, winner in enumerate(expected_order):
        remaining = [e for e in everything if e not in expected_order[:i]]
        assert EndpointTable(remaining).match("GET", "/api/v1/status")[0] is winner
        assert EndpointTable(remaining[::-1]).match("GET", "/api/v1/status")[0] is winner


def test_declaration_order_breaks_ties() -> None:
    """Equally specific patterns are decided by declaration order, first wins."""
    first, second = ep("/a/*", rule="first"), ep("/a/*", rule="second")
    assert EndpointTable([first, second]).match("GET", "/a/b")[0] is first
    x1, x2 = ep("/a", rule="x1"), ep("/a", rule="x2")
    assert EndpointTable([x1, x2]).match("GET", "/a")[0] is x1
    s1, s2 = ep("/*/b", rule="s1"), ep("/a/*", rule="s2")
    assert EndpointTable([s1, s2]).match("GET", "/a/b")[0] is s2  # longer literal prefix


def test_methods_are_part_of_the_match() -> None:
    """An endpoint whose methods exclude the request method is skipped for a broader one."""
    admin_get = ep("/admin/*", "GET", "groups=admins")
    catch_all_post = ep("/*", "POST", "groups=staff")
    table = EndpointTable([admin_get, catch_all_post])
    assert table.match("POST", "/admin/x") == (catch_all_post, True)
    assert table.match("GET", "/admin/x") == (admin_get, True)
    assert table.match("PUT", "/admin/x") == (None, True)


def test_head_matches_get_and_star_matches_any() -> None:
    """HEAD uses GET endpoints, '*' endpoints take any method, lower-case methods upper-case."""
    get_only = ep("/g", "GET")
    post_only = ep("/p", "POST")
    star = ep("/s", "*")
    table = EndpointTable([get_only, post_only, star])
    assert table.match("HEAD", "/g") == (get_only, True)
    assert table.match("get", "/g") == (get_only, True)
    assert table.match("HEAD", "/p") == (None, True)
    assert table.match("GET", "/p") == (None, True)
    assert table.match("PROPFIND", "/s") == (star, True)


def test_exact_without_method_falls_back_to_wildcard() -> None:
    """An exact pattern lacking the method lets a wildcard pattern with the method decide."""
    exact = ep("/healthz", "GET", public=True)
    catch_all = ep("/*", "POST", "groups=staff")
    table = EndpointTable([exact, catch_all])
    assert table.match("POST", "/healthz") == (catch_all, True)
    assert table.match("DELETE", "/healthz") == (None, True)


def test_match_on_non_path_is_no_match() -> None:
    """A path that does not start with '/' matches nothing (fail closed)."""
    assert EndpointTable([ep("/*")]).match("GET", "x") == (None, False)


def test_empty_table_matches_nothing() -> None:
    """An empty table matches no path."""
    assert EndpointTable([]).match("GET", "/") == (None, False)
    assert EndpointTable([]).endpoints == ()


# --- decide ---------------------------------------------------------------------------------

D = Decision
ALLOW, DENY, LOGIN = Verdict.ALLOW, Verdict.DENY, Verdict.LOGIN
DESIGN_HEALTH = ep("/healthz", "GET", public=True)
DESIGN_ADMIN = ep("/admin/*", "GET POST", "groups=admins,email_verified=true")
DESIGN_ALL = ep("/*", "GET", "email=alice@example.com", "groups=staff")
NOBODY = ep("/locked/*", "*")
DESIGN_TABLE = EndpointTable([DESIGN_HEALTH, DESIGN_ADMIN, DESIGN_ALL, NOBODY])
ADMIN_SCOPES = DESIGN_ADMIN.allowed_scopes
ALL_SCOPES = DESIGN_ALL.allowed_scopes


@pytest.mark.parametrize(
    ("method", "path", "user", "expected"),
    [
        # public endpoints, anonymous or not
        ("GET", "/healthz", None, D(ALLOW, Reason.PUBLIC, DESIGN_HEALTH)),
        ("GET", "/healthz", tags(), D(ALLOW, Reason.PUBLIC, DESIGN_HEALTH)),
        ("HEAD", "/healthz", None, D(ALLOW, Reason.PUBLIC, DESIGN_HEALTH)),
        # anonymous on a protected endpoint
        ("GET", "/", None, D(LOGIN, Reason.LOGIN_REQUIRED, DESIGN_ALL)),
        ("GET", "/admin", None, D(LOGIN, Reason.LOGIN_REQUIRED, DESIGN_ADMIN)),
        # anonymous with a method no endpoint allows: login, policy not revealed
        ("DELETE", "/x", None, D(LOGIN, Reason.LOGIN_REQUIRED, None)),
        # OR of ANDs
        ("GET", "/x", tags("email=alice@example.com"), D(ALLOW, Reason.ALLOWED, DESIGN_ALL)),
        ("GET", "/x", tags("groups=staff", "z=1"), D(ALLOW, Reason.ALLOWED, DESIGN_ALL)),
        (
            "GET",
            "/admin/users",
            tags("groups=admins", "email_verified=true"),
            D(ALLOW, Reason.ALLOWED, DESIGN_ADMIN),
        ),
        (
            "GET",
            "/admin/users",
            tags("groups=admins", "email_verified=false"),
            D(DENY, Reason.MISSING_TAGS, DESIGN_ADMIN, ADMIN_SCOPES, tags("email_verified=true")),
        ),
        (
            "POST",
            "/admin",
            tags("groups=staff"),
            D(
                DENY,
                Reason.MISSING_TAGS,
                DESIGN_ADMIN,
                ADMIN_SCOPES,
                tags("groups=admins", "email_verified=true"),
            ),
        ),
        (
            "GET",
            "/x",
            tags("email=bob@example.com"),
            D(DENY, Reason.MISSING_TAGS, DESIGN_ALL, ALL_SCOPES, tags("email=alice@example.com")),
        ),
        # the /admin vs /admin/* vs /* case: staff may read /x but not /admin
        (
            "GET",
            "/admin",
            tags("groups=staff"),
            D(
                DENY,
                Reason.MISSING_TAGS,
                DESIGN_ADMIN,
                ADMIN_SCOPES,
                tags("groups=admins", "email_verified=true"),
            ),
        ),
        ("GET", "/adminx", tags("groups=staff"), D(ALLOW, Reason.ALLOWED, DESIGN_ALL)),
        # methods: signed-in users get method_not_allowed, HEAD follows GET
        ("DELETE", "/x", tags("groups=staff"), D(DENY, Reason.METHOD_NOT_ALLOWED, None)),
        ("PUT", "/admin/x", ADMIN_USER, D(DENY, Reason.METHOD_NOT_ALLOWED, None)),
        ("HEAD", "/x", tags("groups=staff"), D(ALLOW, Reason.ALLOWED, DESIGN_ALL)),
        ("TRACE", "/healthz", None, D(LOGIN, Reason.LOGIN_REQUIRED, None)),
        # empty allowed_scopes on a non-public endpoint allows nobody
        ("GET", "/locked/x", tags("groups=admins"), D(DENY, Reason.MISSING_TAGS, NOBODY)),
        ("GET", "/locked", None, D(LOGIN, Reason.LOGIN_REQUIRED, NOBODY)),
    ],
)
def test_decide_design_table(
    method: str, path: str, user: frozenset[str] | None, expected: Decision
) -> None:
    """decide() returns the documented verdict, reason, endpoint, would_allow and missing."""
    assert decide(method, path, user, DESIGN_TABLE) == expected


def test_unmatched_path_hides_policy_from_anonymous() -> None:
    """With no endpoint for the path, anonymous users get login and signed-in users a deny."""
    table = EndpointTable([ep("/app/*", "GET", "groups=staff")])
    assert decide("GET", "/other", None, table) == D(LOGIN, Reason.LOGIN_REQUIRED, None)
    assert decide("GET", "/other", STAFF_USER, table) == D(DENY, Reason.NO_MATCHING_ENDPOINT, None)


def test_missing_picks_smallest_alternative() -> None:
    """missing is the smallest set of absent tags over all alternatives, first on a tie."""
    e = ep("/x", "GET", "a,b,c", "d,e", "f,g")
    table = EndpointTable([e])
    assert decide("GET", "/x", tags("a"), table).missing == tags("b", "c")
    assert decide("GET", "/x", tags("a", "b"), table).missing == tags("c")
    assert decide("GET", "/x", tags(), table).missing == tags("d", "e")


def test_public_rule_does_not_cover_admin_on_spec_table() -> None:
    """On the spec table, the /admin/* rule wins over /* and /public/* for every method."""
    for method in ["GET", "HEAD", "POST", "DELETE", "TRACE"]:
        d = decide(method, "/admin", ADMIN_USER, SPEC_TABLE)
        assert d == D(ALLOW, Reason.ALLOWED, ADMIN)
        assert decide(method, "/admin", STAFF_USER, SPEC_TABLE).verdict is DENY


def test_group_ops_on_api_status() -> None:
    """GET /api/*/status is allowed for ops, POST is not, and other api paths fall to /*."""
    ops = tags("groups=ops")
    assert decide("GET", "/api/v1/status", ops, SPEC_TABLE).endpoint is API_STATUS
    assert decide("GET", "/api/v1/status", ops, SPEC_TABLE).verdict is ALLOW
    assert decide("POST", "/api/v1/status", ops, SPEC_TABLE).reason is Reason.METHOD_NOT_ALLOWED
    assert decide("GET", "/api/x", ops, SPEC_TABLE).endpoint is STAFF
    assert decide("GET", "/api/x", ops, SPEC_TABLE).verdict is DENY


def test_conformance_post_through_public() -> None:
    """X-PATH-12: POST /public/../admin is decided by /admin/*, not the public rule."""
    path, _ = canonical_path("/public/../admin")
    assert decide("POST", path, None, SPEC_TABLE) == D(LOGIN, Reason.LOGIN_REQUIRED, ADMIN)
    assert decide("HEAD", "/admin", None, SPEC_TABLE).endpoint is ADMIN


# --- explain ----------------------------------------------------------------------------------


def test_explain_missing_tags() -> None:
    """explain() names the endpoint, the alternatives and the missing tags."""
    user = tags("email=bob@example.com")
    text = explain(decide("GET", "/admin", user, DESIGN_TABLE), "GET", "/admin", user)
    assert "DENY (missing_tags)" in text
    assert "/admin/*" in text
    assert "email_verified=true, groups=admins" in text
    assert "missing:  email_verified=true, groups=admins" in text
    assert "email=bob@example.com" in text


@pytest.mark.parametrize(
    ("method", "path", "user", "needle"),
    [
        ("GET", "/healthz", None, "public"),
        ("GET", "/x", STAFF_USER, "satisfy one"),
        ("GET", "/x", None, "log in"),
        ("DELETE", "/x", None, "not revealed"),
        ("DELETE", "/x", STAFF_USER, "none allows method DELETE"),
        ("GET", "/locked/a", STAFF_USER, "allows nobody"),
    ],
)
def test_explain_every_reason(
    method: str, path: str, user: frozenset[str] | None, needle: str
) -> None:
    """explain() gives a multi-line reason for every kind of decision."""
    text = explain(decide(method, path, user, DESIGN_TABLE), method, path, user)
    assert needle in text
    assert text.count("\n") >= 4


def test_explain_no_matching_endpoint() -> None:
    """explain() tells the operator to add an endpoint when none matches."""
    table = EndpointTable([ep("/a", "GET", "x")])
    text = explain(decide("GET", "/b", tags(), table), "GET", "/b", tags())
    assert "no endpoint pattern matches" in text
    assert "tags: (none)" in text


# --- properties -------------------------------------------------------------------------------

# Characters that exercise every branch: separators, dots, escapes, hex, delimiters, controls.
TARGET_ALPHABET = st.sampled_from(
    [*"/////....%%%%2eEfFcC0a9A?;#\\~-_ ", "\x00", "\x7f", "\n", "\u00e9", "\uff0f"]
)
ESCAPE = st.integers(0, 255).map(lambda b: f"%{b:02x}" if b % 2 else f"%{b:02X}")
TARGET_PIECE = st.one_of(
    TARGET_ALPHABET,
    ESCAPE,
    st.sampled_from(["/..", "/.", "//", "%c3%a9", "%C0%AE", "%f0%9f%98%80", "admin", "public"]),
)
TARGETS = st.one_of(
    st.text(max_size=40),
    st.lists(TARGET_PIECE, max_size=30).map("".join),
    st.lists(TARGET_PIECE, max_size=30).map(lambda parts: "/" + "".join(parts)),
)
FORBIDDEN_ESCAPES = ("%2F", "%5C", "%00", "%23", "%3B", "%25")


@settings(max_examples=600)
@given(TARGETS)
def test_canonical_path_properties(target: str) -> None:
    """canonical_path is total, idempotent and its output has no ambiguous pieces."""
    result: tuple[str, str] | PathError
    try:
        result = canonical_path(target)
    except PathError as err:
        result = err
    if isinstance(result, PathError):
        assert result.status in (400, 414)
        return
    path, query = result
    assert path.startswith("/")
    assert canonical_path(path) == (path, "")
    for bad in ("//", "/./", "/../"):
        assert bad not in path
    for bad in FORBIDDEN_ESCAPES:
        assert bad not in path.upper()
    assert not path.endswith(("/..", "/."))
    assert path.isascii()
    assert "?" not in path
    assert "#" not in path
    assert "#" not in query


SEGMENTS = st.sampled_from(["a", "b", "c"])
PATTERNS = st.lists(st.sampled_from(["a", "b", "*"]), max_size=4).map(
    lambda segs: "/" + "/".join(segs)
)
ENDPOINTS = st.builds(
    Endpoint,
    uri=PATTERNS,
    methods=st.frozensets(st.sampled_from(["GET", "POST", "*"]), max_size=2),
    public=st.booleans(),
    allowed_scopes=st.lists(st.frozensets(st.sampled_from(["t1", "t2", "t3"])), max_size=3).map(
        tuple
    ),
)
PATHS = st.lists(st.sampled_from(["a", "b", "c", ""]), max_size=5).map(
    lambda segs: canonical_path("/" + "/".join(segs))[0]
)
USERS = st.one_of(st.none(), st.frozensets(st.sampled_from(["t1", "t2", "t3", "t4"])))
METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "get"])


def reference_match(
    endpoints: list[Endpoint], method: str, path: str
) -> tuple[Endpoint | None, bool]:
    """Linear-scan model of matching and specificity, written from the docstring."""

    def path_ok(uri: str) -> bool:
        pat, segs = uri.split("/")[1:], path.split("/")[1:]
        if pat[-1] == "*":
            pat = pat[:-1]
            segs = segs[: len(pat)]
        return len(pat) == len(segs) and all(
            p == s or (p == "*" and s != "") for p, s in zip(pat, segs, strict=True)
        )

    def method_ok(e: Endpoint) -> bool:
        m = method.upper()
        return "*" in e.methods or m in e.methods or (m == "HEAD" and "GET" in e.methods)

    def key(ie: tuple[int, Endpoint]) -> tuple[int, int, int, int]:
        i, e = ie
        segs = e.uri.split("/")[1:]
        literal = sum(s != "*" for s in segs)
        return ("*" in segs, -literal, -len(e.uri.partition("*")[0]), i)

    on_path = [(i, e) for i, e in enumerate(endpoints) if path_ok(e.uri)]
    candidates = [(i, e) for i, e in on_path if method_ok(e)]
    best = min(candidates, key=key)[1] if candidates else None
    return best, bool(on_path)


@settings(max_examples=400)
@given(st.lists(ENDPOINTS, max_size=6), METHODS, PATHS)
def test_table_agrees_with_reference(endpoints: list[Endpoint], method: str, path: str) -> None:
    """The compiled trie/dict lookup picks the same endpoint as a linear scan."""
    match = EndpointTable(endpoints).match(method, path)
    expected = reference_match(endpoints, method, path)
    assert match[1] == expected[1]
    assert match[0] is expected[0]


@given(st.lists(ENDPOINTS, max_size=6), st.text(max_size=10), st.text(max_size=20), USERS)
def test_decide_total_and_deterministic(
    endpoints: list[Endpoint], method: str, path: str, user: frozenset[str] | None
) -> None:
    """decide never raises for any method, path or tags, and repeats its answer."""
    table = EndpointTable(endpoints)
    first = decide(method, path, user, table)
    assert decide(method, path, user, table) == first
    assert (first.verdict is Verdict.ALLOW) == (first.reason in (Reason.PUBLIC, Reason.ALLOWED))
    if user is None:
        assert first.verdict is not Verdict.DENY


@given(
    st.lists(ENDPOINTS, max_size=6),
    METHODS,
    PATHS,
    st.frozensets(st.sampled_from(["t1", "t2", "t3"])),
    st.frozensets(st.sampled_from(["t1", "t2", "t3", "t4"])),
)
def test_decide_is_monotonic_in_tags(
    endpoints: list[Endpoint],
    method: str,
    path: str,
    user: frozenset[str],
    extra: frozenset[str],
) -> None:
    """A superset of an allowed tag set is still allowed, and signing in never loses access."""
    table = EndpointTable(endpoints)
    if decide(method, path, user, table).verdict is Verdict.ALLOW:
        assert decide(method, path, user | extra, table).verdict is Verdict.ALLOW
    if decide(method, path, None, table).verdict is Verdict.ALLOW:
        assert decide(method, path, user, table).verdict is Verdict.ALLOW


@given(st.lists(ENDPOINTS, max_size=6), METHODS, PATHS, st.frozensets(st.text(max_size=3)))
def test_missing_tags_would_allow(
    endpoints: list[Endpoint], method: str, path: str, user: frozenset[str]
) -> None:
    """On a tag deny, adding the missing tags turns the decision into an allow."""
    table = EndpointTable(endpoints)
    d = decide(method, path, user, table)
    if d.reason is Reason.MISSING_TAGS and d.would_allow:
        assert d.missing
        assert not d.missing & user
        assert decide(method, path, user | d.missing, table).verdict is Verdict.ALLOW
