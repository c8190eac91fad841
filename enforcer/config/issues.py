"""Configuration problems: each names the file, the key path, the bad value and the fix.

:class:`ConfigIssue` is one problem; :class:`ConfigError` carries all of them at once, so an
operator fixes a file in one pass. Pydantic's validation errors are translated here, with a
did-you-mean for unknown keys.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import (
    BaseModel,
    ValidationError,
)

from enforcer.errors import EnforcerError, Reason

# ---------------------------------------------------------------------------
# errors


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in one file: where, what, and how to fix it."""

    source: str
    path: str
    message: str
    value: object = None
    fix: str = ""

    def __str__(self) -> str:
        where = f"{self.source}: {self.path}" if self.path else self.source
        text = f"{where}: {self.message}"
        if self.value is not None:
            shown = repr(self.value)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            text += f" (got {shown})"
        if self.fix:
            text += f"\n    fix: {self.fix}"
        return text


class ConfigError(EnforcerError):
    """The configuration or a definitions set is invalid; ``issues`` says why."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__(Reason.CONFIG_INVALID, 500, "\n".join(str(i) for i in self.issues))


# A hint per key of the definitions, appended to pydantic's message: the "how to fix it" part.
_FIX = {
    "OIDCClientSecret": "an inline string, or {file: /etc/enforcer/secrets/<service>}",
    "OIDCProviderURL": "the issuer URL whose /.well-known/openid-configuration exists",
    "OIDCCallbackURL": "https://<one of hosts>[:exposedPort] (OIDCCallbackPath is appended) or the full "
    "redirect URI ending in OIDCCallbackPath; `enforcer check` prints the URI to register at the IdP",
    "OIDCScopes": "a list such as [openid, email]",
    "hosts": "a list of DNS names users type, e.g. [app.example.com]",
    "port": "the app's internal TCP port (1-65535)",
    "exposedPort": "the port users connect to, usually 443",
    "selectors": "a list of tag lists, e.g. [[app=frontend]]",
    "exposedAPIs": "a list of tag lists, e.g. [[httpresourcespec:name=private-app]]",
    "endpoints": "a list of {URI: /path/*, methods: [GET], allowedScopes: [[tag=value]]}",
    "allowedScopes": "a list of tag lists (OR of ANDs), e.g. [[groups=admins]], or any-signed-in-user",
    "methods": "a list such as [GET, POST]",
    "URI": "a path such as /, /api, /api/* or /api/*/status",
    "kind": "kind: service or kind: httpresourcespec",
    "tags": "a list of key=value tags, e.g. [app=frontend]",
}

# The daemon config's own hints, by dotted key path (or last key): never the definitions' ones,
# whose ``port`` is the app's port, not the listener's.
FIX_DAEMON = {
    "tags": "this enforcer's tags, e.g. [app=frontend]: a service applies here when its selectors match them",
    "listen.address": "the address the TLS listener binds, e.g. '::' (all) or 127.0.0.1",
    "listen.port": "the TCP port the enforcer's TLS listener binds (1-65535), e.g. 8443; "
    "the redirect sends every exposedPort there",
    "listen.workers": "the number of serving processes, e.g. 1, or auto",
    "admin.address": "a loopback address, e.g. 127.0.0.1",
    "admin.port": "the loopback port of /metrics, /healthz and /readyz (0-65535, 0 picks a free one), e.g. 9090",
    "metrics.address": "the address of the metrics-only listener, e.g. '::' (every address) or the node's IP",
    "metrics.port": "the port of the metrics-only listener (GET /metrics), e.g. 9091; not admin.port",
    "flowLogStdout": "true to also write each flow record to standard output (kubectl logs), else false",
    "definitions": "a list of sources, e.g. [{file: /etc/enforcer/definitions.d}] or [{url: https://...}]",
    "allowNoServices": "true only on a host that may run with no service (every request refused), else false",
    "stateDir": "a directory for the CA, certificates and sessions, e.g. /var/lib/enforcer",
    "logsDir": "a directory for flows.jsonl, e.g. /var/log/enforcer",
    "sessions.store": "sqlite (the default) or memory",
    "redirect.enabled": "true to install the nftables redirect, false to leave the firewall alone",
}


def _loc_to_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _value_at(data: object, loc: Sequence[int | str]) -> object:
    cur = data
    for part in loc:
        try:
            cur = cur[part]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return None
    return cur


def _issues_from_validation(
    exc: ValidationError,
    source: str,
    prefix: str,
    data: object,
    model: type[BaseModel],
    *,
    fixes: Mapping[str, str] = _FIX,
) -> list[ConfigIssue]:
    """One :class:`ConfigIssue` per problem pydantic found; ``fixes`` holds the hints, by dotted
    key path (indexes left out) or by the last key."""
    issues = []
    for err in exc.errors(include_url=False):
        # pydantic reports validators and union branches as extra loc parts ('function-after[..]',
        # 'str', 'SecretFile', 'lax-or-strict[...]'): they are not keys of the file
        loc = [p for p in err["loc"] if not (isinstance(p, str) and (p in _BRANCH_TAGS or "[" in p or "(" in p))]
        key_path = prefix + _loc_to_path(loc)
        last = next((p for p in reversed(loc) if isinstance(p, str)), "")
        keys = ".".join(p for p in loc if isinstance(p, str))
        fix = fixes.get(keys) or fixes.get(str(last), "")
        fix = str((err.get("ctx") or {}).get("fix") or fix)  # a validator's own fix (PydanticCustomError)
        msg = err["msg"].removeprefix("Value error, ")
        value = _value_at(data, loc)
        if err["type"] == "extra_forbidden":
            parent = _value_at(data, loc[:-1])
            known = _known_fields(model, loc[:-1])
            close = difflib.get_close_matches(str(last), known, n=1)
            msg = f"unknown key {last!r}"
            fix = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            value = None
            del parent
        elif err["type"] == "missing":
            msg = "required key is missing"
            value = None
        if last == "OIDCClientSecret" or "Secret" in key_path:
            value = None  # never echo secrets
        issues.append(ConfigIssue(source, key_path, msg, value, fix))
    return _merge_branches(issues)


_BRANCH_TAGS = frozenset({"SecretStr", "SecretFile", "str", "int", "float", "bool", "list", "dict"})


def _merge_branches(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    """One issue per key for a value no branch of a union accepted: a mapping given for a
    ``string or {file: ...}`` key is reported by its own keys only, and two type errors for
    one key become one naming both choices."""
    paths = {i.path for i in issues}
    out: list[ConfigIssue] = []
    for issue in issues:
        if issue.message == "Input should be a valid string" and any(
            p.startswith(issue.path + ".") for p in paths
        ):
            continue  # the mapping branch was meant: its own issues say what is wrong
        if issue.message.startswith("Input should be '") and any(p.startswith(issue.path + "[") for p in paths):
            continue  # the list branch was meant (not the keyword): its own issues say what is wrong
        merged = issue
        if out and out[-1].path == issue.path and out[-1].source == issue.source:
            last = out.pop()
            other = issue.message[:1].lower() + issue.message[1:]
            merged = ConfigIssue(
                last.source, last.path, f"{last.message}, or {other}", last.value, last.fix or issue.fix
            )
        out.append(merged)
    return out


def _known_fields(model: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        f = current.model_fields.get(part) if hasattr(current, "model_fields") else None
        if f is None:
            return []
        ann = f.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args, *(a for x in args for a in getattr(x, "__args__", ()))]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return sorted(current.model_fields)


