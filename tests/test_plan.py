"""plan_request: the one plan both HTTP paths act on, from plain values."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enforcer import policy
from enforcer.config.definitions import IdentityHeaders, Service
from enforcer.http import plan as plan_mod
from enforcer.http.plan import Deny, Endpoint, Forward, Login, NeedSession, OwnEndpoint, Plan, Refuse
from enforcer.identity import cookies as cookies_mod
from enforcer.identity.sessions import Session

T0 = 1_000_000.0
LISTEN_PORT = 8443


def _service(name: str, host: str, exposed_port: int = 443) -> Service:
    endpoints = (
        policy.Endpoint.parse("/public/*", ["GET"], public=True, rule=f"{name}#public"),
        policy.Endpoint.parse("/admin/*", ["*"], allowed_scopes=[["groups=admin"]], rule=f"{name}#admin"),
        policy.Endpoint.parse("/*", ["*"], allowed_scopes=[["groups=staff"], ["groups=admin"]], rule=f"{name}#all"),
    )
    return Service(
        name=name, client_id=name, client_secret="s", issuer="https://idp.test",
        callback_url=f"https://{host}/cb", callback_path="/cb", logout_path="/logout",
        origin=f"https://{host}", post_logout_redirect=None, userinfo="auto", scopes=("openid",),
        hosts=(host,), upstream_host="127.0.0.1", port=8080, exposed_port=exposed_port, endpoints=endpoints,
        table=policy.EndpointTable(endpoints), identity_headers=IdentityHeaders(), idp_ca_file=None, tls=None,
        specs=(),
    )


APP = _service("app", "app.test")
OTHER = _service("other", "other.test", exposed_port=8444)
BY_HOST = {"app.test": APP, "other.test": OTHER}


def _session(service: str, *groups: str) -> Session:
    return Session(
        service=service, issuer="https://idp.test", sub=f"sub-{service}", email="u@example.com", username="u",
        tags=frozenset(f"groups={g}" for g in groups), sid=None, id_token="", created=T0, last_seen=T0,
        expires=T0 + 3600,
    )


STAFF = cookies_mod.new_handle()
ADMIN = cookies_mod.new_handle()
STORED = cookies_mod.new_handle()  # in the store, not in the cache
UNKNOWN = cookies_mod.new_handle()
CACHE = {(STAFF, "app"): _session("app", "staff"), (ADMIN, "app"): _session("app", "admin")}
STORE = {**CACHE, (STORED, "app"): _session("app", "staff")}


def _cached(handle: str, service: str, now: float) -> Session | None:
    """The session cache: only what it holds live."""
    return CACHE.get((handle, service))


def _cookie(handle: str, service: str = "app") -> list[str]:
    return [f"{cookies_mod.session_cookie_name(service)}={handle}"]


def _plan(
    target: str = "/", *, method: str = "GET", host: str = "app.test", sni: str | None = "app.test",
    destination: tuple[str, int] | None = None, cookies: list[str] | None = None, cached: Any = _cached,
    content_length: int | None = None,
) -> Plan:
    return plan_mod.plan_request(
        BY_HOST, LISTEN_PORT, method, target, host, sni=sni, destination=destination, cookies=cookies or [],
        cached=cached, now=T0, content_length=content_length, max_body=1000,
    )


@pytest.mark.parametrize(
    ("kwargs", "status", "reason", "service", "path"),
    [
        ({"host": "app.test:abc"}, 400, "bad_host", None, None),
        ({"host": "nowhere.test"}, 421, "unknown_host", None, None),
        ({"host": "app.test:9999"}, 421, "unknown_host", None, None),
        ({"sni": "other.test"}, 421, "sni_host_mismatch", None, None),
        ({"destination": ("10.0.0.1", 8444)}, 421, "destination_mismatch", None, None),
        ({"target": "/a/%2f/b"}, 400, "encoded_separator", APP, None),
        ({"target": "/upload", "content_length": 1001}, 413, "body_too_large", APP, "/upload"),
    ],
    ids=["malformed-host", "unknown-host", "wrong-port", "sni-mismatch", "destination-mismatch", "bad-path",
         "body-too-large"],
)
def test_refusals_carry_status_reason_and_how_far_routing_got(
    kwargs: dict[str, Any], status: int, reason: str, service: Service | None, path: str | None
) -> None:
    """A request that cannot be routed, canonicalised or accepted is refused with its status and
    reason, and names the service and path only once they are known."""
    plan = _plan(**kwargs)
    assert isinstance(plan, Refuse)
    assert (plan.status, plan.reason, plan.service, plan.path) == (status, reason, service, path)


@pytest.mark.parametrize(
    ("kwargs", "host", "destination"),
    [
        ({"host": "app.test:443"}, "app.test", None),
        ({"host": f"app.test:{LISTEN_PORT}"}, "app.test", None),
        ({"host": "APP.test", "sni": None}, "app.test", None),
        ({"host": "other.test", "sni": "other.test", "destination": ("10.0.0.1", 8444)}, "other.test", 8444),
    ],
    ids=["exposed-port", "listen-port", "no-sni-any-case", "redirected-to-its-port"],
)
def test_hosts_route_on_their_ports_with_or_without_sni(
    kwargs: dict[str, Any], host: str, destination: int | None
) -> None:
    """Host on the service's exposed port or the listener's, any case, with a matching or no
    SNI and a matching original destination, routes to that service."""
    plan = _plan("/public/x", **kwargs)
    assert isinstance(plan, Forward) and plan.service is BY_HOST[host]


@pytest.mark.parametrize(
    ("target", "endpoint"),
    [("/cb", Endpoint.CALLBACK), ("/cb?code=1&state=2", Endpoint.CALLBACK), ("/logout", Endpoint.LOGOUT),
     ("/logout/backchannel", Endpoint.BACKCHANNEL), ("//logout", Endpoint.LOGOUT)],
)
def test_the_enforcers_own_endpoints_are_planned_before_any_session(target: str, endpoint: Endpoint) -> None:
    """The callback, logout and back-channel logout paths (after canonicalisation) go to the
    enforcer's own endpoints whatever cookie is sent."""
    plan = _plan(target, cookies=_cookie(UNKNOWN))
    assert isinstance(plan, OwnEndpoint) and plan.endpoint is endpoint


@pytest.mark.parametrize("target", ["/logout-help", "/logoutx", "/logout/", "/logout/other", "/cb/"])
def test_paths_that_only_start_like_an_own_endpoint_belong_to_the_app(target: str) -> None:
    """Only the exact logout and back-channel paths are the enforcer's: /logout-help and the
    like are the app's and are decided by its policy (the lean path used to hand them over)."""
    plan = _plan(target, cookies=_cookie(STAFF))
    assert isinstance(plan, Forward) and plan.path == target


@pytest.mark.parametrize(
    ("target", "cookies", "cached", "expected", "reason"),
    [
        ("/public/a", [], _cached, Forward, "public"),
        ("/private", [], _cached, Login, "login_required"),
        ("/private?q=1", _cookie(STAFF), _cached, Forward, "allowed"),
        ("/admin/x", _cookie(STAFF), _cached, Deny, "missing_tags"),
        ("/admin/x", _cookie(ADMIN), _cached, Forward, "allowed"),
        ("/private", _cookie(STORED), _cached, NeedSession, None),
        ("/private", _cookie(STAFF), None, NeedSession, None),
        ("/private", _cookie(STAFF, "other"), _cached, Login, "login_required"),
    ],
    ids=["public", "anonymous", "cached-staff", "staff-on-admin", "cached-admin", "not-cached", "no-cache",
         "other-services-cookie"],
)
def test_sessions_and_policy_decide_the_rest(
    target: str, cookies: list[str], cached: Any, expected: type, reason: str | None
) -> None:
    """After routing, the cached session (or its absence) and the policy give Forward, Login or
    Deny; a cookie the cache cannot vouch for asks for the session store."""
    plan = _plan(target, cookies=cookies, cached=cached)
    assert type(plan) is expected
    if reason is not None:
        assert getattr(plan, "reason", None) == reason


def test_a_forward_carries_target_identity_and_rule() -> None:
    """A forward names the target with its query, the user, the identity headers and the rule."""
    plan = _plan("/a/./b?x=1", cookies=_cookie(STAFF))
    assert isinstance(plan, Forward)
    assert (plan.path, plan.target, plan.endpoint) == ("/a/b", "/a/b?x=1", "app#all")
    assert plan.identity is CACHE[(STAFF, "app")]
    assert plan.identity_headers == {"X-Forwarded-User": "u", "X-Forwarded-Email": "u@example.com"}


def test_a_deny_says_what_would_have_allowed() -> None:
    """A deny carries the tag sets that would allow the request and the tags the user lacks."""
    plan = _plan("/admin/x", cookies=_cookie(STAFF))
    assert isinstance(plan, Deny)
    assert plan.would_allow == (frozenset({"groups=admin"}),) and plan.missing == frozenset({"groups=admin"})


# ------------------------------------------------------------------ the lean path is a subset of the full path


def _full(method: str, target: str, host: str, sni: str | None, cookies: list[str]) -> Plan:
    """What the full path plans: the cache first, else the store (as Gate.handle does)."""
    plan = _plan(target, method=method, host=host, sni=sni, cookies=cookies)
    if isinstance(plan, NeedSession):
        identity = STORE.get((plan.handle, plan.service.name))
        plan = plan_mod.decide(plan.service, method, plan.path, plan.query, identity)
    return plan


_TARGETS = st.one_of(
    st.sampled_from([
        "/", "/cb", "/cb/", "//cb", "/logout", "/logout/backchannel", "/logout-x", "/logout/x", "/public/a",
        "/public/../admin/x", "/admin/x", "/admin", "/a/%2e%2e/admin/x", "/a;b", "/a%2fb", "/x?y=1",
    ]),
    st.text(alphabet="/abcx.%2eflogut?=;", max_size=20).map(lambda t: "/" + t),
)
_COOKIES = st.lists(
    st.sampled_from([STAFF, ADMIN, STORED, UNKNOWN, "not-a-handle"]).flatmap(
        lambda h: st.sampled_from(["app", "other"]).map(lambda s: f"{cookies_mod.session_cookie_name(s)}={h}")
    ),
    max_size=2,
)


@given(
    method=st.sampled_from(["GET", "HEAD"]),
    target=_TARGETS,
    host=st.sampled_from(["app.test", "APP.test:443", "other.test", "app.test:1", "nowhere"]),
    sni=st.sampled_from(["app.test", "other.test", None]),
    cookies=_COOKIES,
)
def test_what_the_lean_path_forwards_the_full_path_forwards_the_same(
    method: str, target: str, host: str, sni: str | None, cookies: list[str]
) -> None:
    """Whenever the lean path's plan (session cache only) is a Forward, the full path's plan
    (cache, then store) is the very same Forward: the lean path's plans are a subset."""
    lean = _plan(target, method=method, host=host, sni=sni, cookies=cookies)
    if isinstance(lean, Forward):
        full = _full(method, target, host, sni, cookies)
        assert type(full) is Forward and full == lean


def test_the_host_cache_is_bounded_and_still_answers_after_it_is_cleared() -> None:
    """Past its bound the per-value Host cache starts afresh, and a value seen before still splits the same."""
    plan_mod._HOST_CACHE.clear()
    for n in range(plan_mod._HOST_CACHE_MAX + 5):
        assert plan_mod._host_split(f"h{n}.example:{1000 + n}") == (f"h{n}.example", 1000 + n)
    assert len(plan_mod._HOST_CACHE) <= plan_mod._HOST_CACHE_MAX
    assert plan_mod._host_split("h0.example:1000") == ("h0.example", 1000)


def test_the_cut_groups_warning_set_is_bounded() -> None:
    """Users whose groups did not fit are warned about once each, and the remembered set never grows past 1,000."""
    plan_mod._CUT_WARNED.clear()
    huge = [f"group-{i:05d}-" + "x" * 200 for i in range(40)]
    for n in range(1005):
        plan_mod._whole_items(huge, f"user-{n}")
    assert 0 < len(plan_mod._CUT_WARNED) <= 1000


# ------------------------------------------------------------------ a pod's listener: its services only

THIRD = _service("third", "third.test")
CATALOG = {"app.test": APP, "other.test": OTHER, "third.test": THIRD}
POD_HOSTS = ("app.test", "other.test", "third.test", "nowhere.test")


def _scoped(scope: dict[str, Service], host: str, sni: str | None, *, port: int | None = None) -> Plan:
    """A pod's connection (its listener on LISTEN_PORT): routed among ``scope`` only."""
    return plan_mod.plan_request(
        scope, LISTEN_PORT, "GET", "/public/x", host if port is None else f"{host}:{port}", sni=sni,
        destination=None, cookies=[], cached=_cached, now=T0, scoped=True,
    )


@pytest.mark.parametrize(
    ("host", "sni", "reason"),
    [
        ("other.test", "other.test", "unknown_host"),  # another pod's service by Host and SNI
        ("other.test", None, "unknown_host"),  # by Host, without SNI (the default certificate)
        ("other.test", "app.test", "unknown_host"),  # by Host, SNI of the pod's own service
        ("app.test", "other.test", "unknown_host"),  # by SNI only: not a mere mismatch, a host not served here
        ("app.test", "nowhere.test", "unknown_host"),  # a name no pod serves
        ("app.test", "app.test", None),
        ("app.test", None, None),
    ],
)
def test_a_pods_listener_refuses_another_pods_service_like_an_unknown_host(
    host: str, sni: str | None, reason: str | None
) -> None:
    """On a pod's listener a Host or TLS server name of a service outside the pod is refused 421 unknown_host."""
    plan = _scoped({"app.test": APP}, host, sni)
    if reason is None:
        assert isinstance(plan, Forward) and plan.service is APP
    else:
        assert plan == Refuse(421, reason, "this host is not served here")


def test_without_a_scope_an_sni_of_another_service_stays_a_mismatch() -> None:
    """The host's listener keeps today's answer to a TLS server name of another served service: sni_host_mismatch."""
    plan = _plan("/public/x", host="app.test", sni="other.test")
    assert isinstance(plan, Refuse) and (plan.status, plan.reason) == (421, "sni_host_mismatch")
    plan = plan_mod.plan_request(
        BY_HOST, LISTEN_PORT, "GET", "/public/x", "app.test", sni="other.test", destination=None, cookies=[],
        cached=_cached, now=T0, scoped=True,
    )
    assert isinstance(plan, Refuse) and plan.reason == "sni_host_mismatch"  # both served by this pod: a mismatch


@given(
    served=st.sets(st.sampled_from(sorted(CATALOG))),
    host=st.sampled_from(POD_HOSTS),
    sni=st.none() | st.sampled_from(POD_HOSTS),
    port=st.none() | st.sampled_from([443, 8444, LISTEN_PORT, 9999]),
)
def test_a_scoped_plan_never_reaches_a_service_outside_the_scope(
    served: set[str], host: str, sni: str | None, port: int | None
) -> None:
    """Whatever Host, port and SNI, a pod's listener plans only its own services; outside names are unknown hosts,
    and within its services it answers exactly as an unscoped listener serving the same services would."""
    scope = {h: CATALOG[h] for h in served}
    plan = _scoped(scope, host, sni, port=port)
    if isinstance(plan, Refuse):
        if host not in scope or (sni is not None and sni not in scope):
            assert (plan.status, plan.reason) == (421, "unknown_host")
            return
    else:
        assert plan.service in scope.values()
    unscoped = plan_mod.plan_request(
        scope, LISTEN_PORT, "GET", "/public/x", host if port is None else f"{host}:{port}", sni=sni,
        destination=None, cookies=[], cached=_cached, now=T0,
    )
    assert plan == unscoped
