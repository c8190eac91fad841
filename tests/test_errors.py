"""Tests for enforcer.errors: one vocabulary of reasons, shown, counted and documented alike."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from enforcer import errors, policy
from enforcer.config.issues import ConfigError, ConfigIssue
from enforcer.config.sources import SourceError
from enforcer.errors import EnforcerError, Outcome, Reason, UpstreamError, UpstreamKind
from enforcer.flow import FlowRecord
from enforcer.http import pages
from enforcer.http.certs import CertError
from enforcer.identity.sessions import SessionStoreError
from enforcer.identity.tokens import OIDCError
from enforcer.metrics import Metrics
from enforcer.net.ruleset import MessageFailure, RedirectError

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "enforcer"

# Calls that take a reason (or a decision) code: the name called -> (positional index, keyword).
REASON_ARGS: dict[str, tuple[int | None, str | None]] = {
    "record": (None, "reason"),
    "fail": (0, "code"),  # http.gate's login-callback failure (a local function, not report.fail)
    "answer": (1, "reason"),  # http.gate's back-channel logout answer (a local function)
    "error_page": (1, "reason"),
    "json_error": (1, "reason"),
    "OIDCError": (0, "reason"),
    "PathError": (0, "code"),
    "EnforcerError": (0, "reason"),
}
DECISION_ARGS: dict[str, tuple[int | None, str | None]] = {"record": (None, "decision")}

LOCAL_ONLY = frozenset({"fail", "answer"})
"""Names that take a code only as local functions (``report.fail`` in cli.doctor takes text)."""


def _called(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and func.attr not in LOCAL_ONLY:
        return func.attr
    return None


def _argument(node: ast.Call, where: tuple[int | None, str | None]) -> ast.expr | None:
    index, keyword = where
    for kw in node.keywords:
        if kw.arg == keyword:
            return kw.value
    if index is not None and len(node.args) > index:
        return node.args[index]
    return None


def _texts(node: ast.expr | None) -> Iterator[str]:
    """Every code a reason argument can be: literals, both sides of a conditional, f-strings."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.IfExp):
        yield from _texts(node.body)
        yield from _texts(node.orelse)
    elif isinstance(node, ast.JoinedStr):
        yield "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)


def _codes_in_source(
    table: dict[str, tuple[int | None, str | None]], sources: dict[str, str] | None = None
) -> Iterator[tuple[str, str]]:
    """(where, text) for each string literal or f-string passed as a code to the calls in
    ``table``, and for each ``(status, "code", ...)`` tuple returned; ``sources`` (name -> code)
    defaults to every module of ``enforcer``."""
    if sources is None:
        sources = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in sorted(SOURCE.rglob("*.py"))}
    for name, text in sources.items():
        tree = ast.parse(text)
        for node in ast.walk(tree):
            where = f"{name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call) and (name := _called(node)) in table:
                for code in _texts(_argument(node, table[name])):
                    yield where, code
            elif (
                table is REASON_ARGS
                and isinstance(node, ast.Return)
                and isinstance(node.value, ast.Tuple)
                and len(node.value.elts) >= 2
                and isinstance(node.value.elts[0], ast.Constant)
                and isinstance(node.value.elts[0].value, int)
            ):
                yield from ((where, code) for code in _texts(node.value.elts[1]))


def _readme_codes() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.MULTILINE)


def test_the_source_names_every_reason_and_decision_by_its_member() -> None:
    """No reason or decision in the enforcer's source is a string literal or an f-string: each is a member."""
    assert list(_codes_in_source(REASON_ARGS)) == []
    assert list(_codes_in_source(DECISION_ARGS)) == []


def test_the_source_scan_finds_literal_and_built_codes() -> None:
    """The scan behind the test above sees literals, f-strings, conditionals and returned tuples."""
    sample = """
flow.record(decision="deny", reason="denied")
fail(f"id_token_bad_{name}")
pages.error_page(403, "a" if x else Reason.DENIED, flow_id)
def framing(): return 400, "malformed_request"
"""
    reasons = [code for _, code in _codes_in_source(REASON_ARGS, {"sample.py": sample})]
    assert reasons == ["denied", "id_token_bad_{}", "a", "malformed_request"] or sorted(reasons) == sorted(
        ["denied", "id_token_bad_{}", "a", "malformed_request"]
    )
    assert [code for _, code in _codes_in_source(DECISION_ARGS, {"sample.py": sample})] == ["deny"]


def test_codes_are_unique_snake_case() -> None:
    """Reason and Outcome values are distinct lower snake_case words of at most 64 characters."""
    for enum in (Reason, Outcome, UpstreamKind):
        values = [member.value for member in enum]
        assert len(values) == len(set(values))
        assert all(re.fullmatch(r"[a-z][a-z0-9_]{0,63}", v) for v in values), enum


@pytest.mark.parametrize("reason", list(Reason))
def test_every_reason_has_a_page_title(reason: Reason) -> None:
    """Each reason has its own heading, which its error page shows."""
    title = pages.REASON_TITLES[reason]
    assert title
    body = pages.error_page(400, reason, "f" * 16).text
    assert body is not None
    assert f"<h1>{title}</h1>" in body
    assert f"<code>{reason.value}</code>" in body


def test_page_titles_name_only_reasons() -> None:
    """The page-title table has no entry that is not a Reason."""
    assert set(pages.REASON_TITLES) == set(Reason)


def test_every_reason_and_outcome_is_a_metric_label() -> None:
    """Each Reason (under each Outcome) is counted under its own code as the label value."""
    m = Metrics()
    flow = FlowRecord.begin(flow_id="f" * 16, client="192.0.2.1:1", sni=None, host=None, method="GET", path="/", now=100.0)
    flow.service = "app"
    flow.finish(now=100.001)
    for outcome in Outcome:
        for reason in Reason:
            flow.record(decision=outcome, reason=reason)
            m.observe_flow(flow)
    for reason in (Reason.MISSING_TAGS, Reason.UNFINISHED, Reason.LOGOUT_TOKEN_BAD_SID):
        labels = {"service": "app", "decision": "deny", "reason": reason.value}
        assert m.registry.get_sample_value("enforcer_requests_total", labels) == 1
    series = [s for f in m.registry.collect() if f.name == "enforcer_requests" for s in f.samples
              if s.name == "enforcer_requests_total"]
    assert len(series) == len(Reason) * len(Outcome)


def test_every_reason_has_a_readme_row() -> None:
    """The README's reason table has exactly one row per Reason, in the enum's order."""
    assert _readme_codes() == [r.value for r in Reason]


@pytest.mark.parametrize(("exc", "reason", "status"), [
    (policy.PathError(Reason.SEMICOLON, "x"), Reason.SEMICOLON, 400),
    (policy.PathError(Reason.TOO_LONG, "x", 414), Reason.TOO_LONG, 414),
    (OIDCError(Reason.ID_TOKEN_EXPIRED), Reason.ID_TOKEN_EXPIRED, 400),
    (OIDCError(Reason.JWKS_INVALID, "no keys", status=502), Reason.JWKS_INVALID, 502),
    (UpstreamError("timeout", 504), Reason.UPSTREAM_TIMEOUT, 504),
    (UpstreamError(UpstreamKind.RESET, 502), Reason.UPSTREAM_RESET, 502),
    (SessionStoreError("closed"), Reason.SESSION_STORE_ERROR, 503),
    (CertError("cannot read /x"), Reason.CERTIFICATE_ERROR, 500),
    (SourceError("/x: gone"), Reason.SOURCE_UNAVAILABLE, 503),
    (RedirectError("no nftables"), Reason.REDIRECT_ERROR, 500),
    (ConfigError([ConfigIssue("f", "k", "bad")]), Reason.CONFIG_INVALID, 500),
])
def test_every_enforcer_exception_carries_a_reason_and_status(exc: EnforcerError, reason: Reason, status: int) -> None:
    """Each exception the enforcer raises on purpose is an EnforcerError with its reason and status."""
    assert isinstance(exc, EnforcerError)
    assert exc.reason is reason
    assert exc.status == status
    assert str(exc)


def test_every_upstream_kind_has_its_reason() -> None:
    """Each UpstreamKind maps to the upstream_* reason of the same name, and free text is refused."""
    for kind in UpstreamKind:
        assert errors.UPSTREAM_REASONS[kind] == f"upstream_{kind.value}"
    with pytest.raises(ValueError, match="not a valid UpstreamKind"):
        UpstreamError("exploded", 502)


def test_exception_messages_are_kept() -> None:
    """The operator-facing errors keep their messages (and ConfigError its issues)."""
    assert str(CertError("cannot read /etc/x.pem")) == "cannot read /etc/x.pem"
    failure = MessageFailure("add rule", 1, "refused")
    assert str(RedirectError("apply failed", [failure])) == f"apply failed\n  - {failure}"
    issue = ConfigIssue("enforcer.yaml", "listen.port", "must be a port")
    assert ConfigError([issue]).issues == (issue,)
