"""Load the daemon config and the definitions into frozen, validated objects.

Two kinds of YAML meet here:

* the daemon config (``enforcer.yaml``), owned by the host operator: this enforcer's
  own tags, listener, state and log directories, definition sources, sessions;
* the definitions, one object per YAML document with a ``kind:`` field
  (``service`` / ``httpresourcespec``), with the field names of the Microsegmentation
  guide (``OIDCClientID``, ``exposedAPIs``, ``endpoints[].allowedScopes`` ...).

Every problem becomes a :class:`ConfigIssue` naming the file, the key path, the bad
value and how to fix it; :class:`ConfigError` carries all of them at once, so an
operator fixes a file in one pass.  Unknown keys are errors (with a did-you-mean).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from enforcer import policy

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


class ConfigError(Exception):
    """The configuration or a definitions set is invalid; ``issues`` says why."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


# ---------------------------------------------------------------------------
# small value parsers

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """``30`` / ``"30s"`` / ``"10m"`` / ``"8h"`` / ``"1d"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration such as 30s, 10m, 8h or 1d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration such as 30s, 10m, 8h or 1d (not negative)")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError("a duration such as 30s, 10m, 8h or 1d")


Duration = Annotated[float, BeforeValidator(parse_duration)]

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_TAG = re.compile(r"^[^\s=]+=\S*$")
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_HEADER = re.compile(r"^[A-Za-z0-9-]{1,64}$")


def normalise_host(host: str) -> str:
    """Lower-case, drop one trailing dot; IP literals in canonical form."""
    host = host.strip().lower()
    if host.endswith("."):
        host = host[:-1]
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return host


def _check_host(host: str) -> str:
    h = normalise_host(host)
    try:
        ipaddress.ip_address(h)
        return h
    except ValueError:
        pass
    labels = h.split(".")
    if len(h) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError("a DNS name such as app.example.com (letters, digits, '-', dots)")
    return h


def _check_tag(tag: str) -> str:
    if not _TAG.match(tag):
        raise ValueError("a tag of the form key=value without spaces, e.g. app=frontend")
    return tag


Tag = Annotated[str, BeforeValidator(lambda v: _check_tag(v) if isinstance(v, str) else v)]
TagExpression = list[list[Tag]]  # OR of ANDs


def tags_match(expression: Sequence[Sequence[str]], tags: Iterable[str]) -> bool:
    """True if one inner list of ``expression`` is contained in ``tags``."""
    have = set(tags)
    return any(set(clause) <= have for clause in expression)


# ---------------------------------------------------------------------------
# definitions (kind: service / kind: httpresourcespec)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SecretFile(_Strict):
    """``{file: /path}``: read the secret from a file (first line, stripped)."""

    file: Path


class TLSOverride(_Strict):
    """Operator-supplied certificate for a service, overriding the self-issued one."""

    cert: Path
    key: Path


class IdentityHeaders(_Strict):
    """Names of the identity headers the enforcer injects towards the app."""

    user: str = "X-Forwarded-User"
    email: str = "X-Forwarded-Email"
    groups: str | None = None

    @field_validator("user", "email", "groups")
    @classmethod
    def _header_name(cls, v: str | None) -> str | None:
        if v is not None and not _HEADER.match(v):
            raise ValueError("a header name of letters, digits and '-' (no '_')")
        return v


class EndpointModel(_Strict):
    """One ``endpoints[]`` entry of an httpresourcespec."""

    URI: str
    methods: list[str] = Field(min_length=1)
    public: bool = False
    allowedScopes: TagExpression = Field(default_factory=list)

    @field_validator("URI")
    @classmethod
    def _uri(cls, v: str) -> str:
        problem = policy.validate_pattern(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        out = []
        for m in v:
            if m != "*" and not re.match(r"^[A-Za-z]{1,20}$", m):
                raise ValueError(f"method {m!r} is not an HTTP method (GET, POST, ... or *)")
            out.append(m.upper())
        return out


class HTTPResourceSpecModel(_Strict):
    """``kind: httpresourcespec``: the endpoints of an API and who may call them."""

    kind: Literal["httpresourcespec"]
    name: str
    description: str = ""
    namespace: str = ""
    endpoints: list[EndpointModel] = Field(min_length=1)
    associatedTags: list[Tag] = Field(default_factory=list)
    propagate: bool = False
    protected: bool = False


class ServiceModel(_Strict):
    """``kind: service``: an app exposed through this enforcer with OIDC login."""

    kind: Literal["service"]
    name: str
    description: str = ""
    namespace: str = ""
    type: Literal["HTTP"] = "HTTP"
    authorizationType: Literal["OIDC"] = "OIDC"
    OIDCClientID: str = Field(min_length=1)
    OIDCClientSecret: SecretStr | SecretFile
    OIDCProviderURL: str
    OIDCCallbackURL: str
    OIDCCallbackPath: str = "/oauth2/callback"
    OIDCLogoutPath: str = "/oauth2/logout"
    OIDCScopes: list[str] = Field(default_factory=lambda: ["openid", "email"])
    OIDCCAFile: Path | None = None
    OIDCPostLogoutRedirectURL: str | None = None
    OIDCUserInfo: Literal["auto", "always", "never"] = "auto"
    hosts: list[str] = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    upstreamHost: str = "127.0.0.1"
    exposedPort: int = Field(default=443, ge=1, le=65535)
    selectors: TagExpression = Field(default_factory=list)
    exposedAPIs: TagExpression = Field(min_length=1)
    associatedTags: list[Tag] = Field(default_factory=list)
    propagate: bool = False
    protected: bool = False
    identityHeaders: IdentityHeaders = Field(default_factory=IdentityHeaders)
    TLSCertificate: TLSOverride | None = None
    bypassPaths: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("lower-case letters, digits and '-' (at most 63), e.g. private-app")
        return v

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        return [_check_host(h) for h in v]

    @field_validator("OIDCScopes")
    @classmethod
    def _scopes(cls, v: list[str]) -> list[str]:
        if "openid" not in v:
            raise ValueError("must include 'openid' (OpenID Connect needs it)")
        for s in v:
            if not re.match(r"^[\x21\x23-\x5b\x5d-\x7e]+$", s):
                raise ValueError(f"scope {s!r} has characters a scope may not contain")
        return v

    @field_validator("OIDCCallbackPath", "OIDCLogoutPath")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/") or policy.validate_pattern(v) or "*" in v:
            raise ValueError("an absolute path without wildcards, e.g. /oauth2/callback")
        return v

    @field_validator("bypassPaths")
    @classmethod
    def _bypass(cls, v: list[str]) -> list[str]:
        for p in v:
            problem = policy.validate_pattern(p)
            if problem:
                raise ValueError(problem)
        return v


_KIND_MODELS: dict[str, type[_Strict]] = {
    "service": ServiceModel,
    "httpresourcespec": HTTPResourceSpecModel,
}

# A hint per key, appended to pydantic's message: the "how to fix it" part.
_FIX = {
    "OIDCClientSecret": "an inline string, or {file: /etc/enforcer/secrets/<service>}",
    "OIDCProviderURL": "the issuer URL whose /.well-known/openid-configuration exists",
    "OIDCCallbackURL": "https://<one of hosts>[:exposedPort], registered at the IdP",
    "OIDCScopes": "a list such as [openid, email]",
    "hosts": "a list of DNS names users type, e.g. [app.example.com]",
    "port": "the app's internal TCP port (1-65535)",
    "exposedPort": "the port users connect to, usually 443",
    "selectors": "a list of tag lists, e.g. [[app=frontend]]",
    "exposedAPIs": "a list of tag lists, e.g. [[httpresourcespec:name=private-app]]",
    "endpoints": "a list of {URI: /path/*, methods: [GET], allowedScopes: [[tag=value]]}",
    "allowedScopes": "a list of tag lists (OR of ANDs), e.g. [[groups=admins]]",
    "methods": "a list such as [GET, POST]",
    "URI": "a path such as /, /api, /api/* or /api/*/status",
    "kind": "kind: service or kind: httpresourcespec",
    "tags": "a list of key=value tags, e.g. [app=frontend]",
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
    exc: ValidationError, source: str, prefix: str, data: object, model: type[BaseModel]
) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors(include_url=False):
        # pydantic reports validators and union branches as extra loc parts ('function-after[..]',
        # 'str', 'SecretFile', 'lax-or-strict[...]'): they are not keys of the file
        loc = [p for p in err["loc"] if not (isinstance(p, str) and (p in _BRANCH_TAGS or "[" in p or "(" in p))]
        key_path = prefix + _loc_to_path(loc)
        last = next((p for p in reversed(loc) if isinstance(p, str)), "")
        fix = _FIX.get(last, "")
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


# ---------------------------------------------------------------------------
# resolved, runtime objects


@dataclass(frozen=True)
class Service:
    """A service resolved for this enforcer: its endpoints and everything to run it."""

    name: str
    client_id: str
    client_secret: str = field(repr=False)
    issuer: str
    callback_url: str  # full redirect_uri sent to the IdP
    callback_path: str
    logout_path: str
    origin: str  # https://host[:port] users see; used for every generated URL
    post_logout_redirect: str | None
    userinfo: str  # auto: only when the ID token lacks claims the scopes asked for
    scopes: tuple[str, ...]
    hosts: tuple[str, ...]
    upstream_host: str
    port: int
    exposed_port: int
    endpoints: tuple[policy.Endpoint, ...]
    table: policy.EndpointTable = field(compare=False, repr=False)
    identity_headers: IdentityHeaders
    idp_ca_file: Path | None
    tls: TLSOverride | None
    specs: tuple[str, ...]  # names of the httpresourcespecs that contributed endpoints


@dataclass(frozen=True)
class Definitions:
    """A validated set of definitions, resolved against this enforcer's tags."""

    services: tuple[Service, ...]
    ignored: tuple[str, ...] = ()  # services whose selectors do not match this enforcer
    warnings: tuple[str, ...] = ()

    def by_host(self) -> dict[str, Service]:
        return {h: s for s in self.services for h in s.hosts}

    def get(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)


def _read_secret(secret: SecretStr | SecretFile, source: str, key: str) -> str:
    if isinstance(secret, SecretStr):
        return secret.get_secret_value()
    try:
        text = secret.file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            [
                ConfigIssue(
                    source,
                    key + ".file",
                    f"cannot read secret file: {exc.strerror}",
                    str(secret.file),
                    "create the file (mode 0600) containing the client secret",
                )
            ]
        ) from None
    if not text:
        raise ConfigError([ConfigIssue(source, key + ".file", "secret file is empty", str(secret.file))])
    return text


def _https_url(url: str, *, allow_http_loopback: bool) -> str | None:
    """None if ``url`` is an acceptable https URL, else the reason."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "not a URL"
    if parts.scheme == "https" and parts.hostname:
        if parts.query or parts.fragment:
            return "must not carry a query or fragment"
        return None
    if parts.scheme == "http" and allow_http_loopback and parts.hostname:
        try:
            if ipaddress.ip_address(parts.hostname).is_loopback:
                return None
        except ValueError:
            if parts.hostname == "localhost":
                return None
    return "must be an https:// URL"


@dataclass(frozen=True)
class RawDocument:
    """One YAML document and where it came from (for error messages)."""

    source: str
    index: int
    data: object

    @property
    def where(self) -> str:
        return f"{self.source} (document {self.index + 1})"


def load_documents(path: Path) -> list[RawDocument]:
    """Read every YAML document of a file, or of every *.yaml/*.yml file in a directory."""
    files = (
        sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()) if path.is_dir() else [path]
    )
    docs: list[RawDocument] = []
    issues: list[ConfigIssue] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except OSError as exc:
            issues.append(ConfigIssue(str(f), "", f"cannot read: {exc.strerror}", fix="check path and permissions"))
            continue
        docs_or_issue = parse_documents(text, str(f))
        if isinstance(docs_or_issue, ConfigIssue):
            issues.append(docs_or_issue)
        else:
            docs.extend(docs_or_issue)
    if issues:
        raise ConfigError(issues)
    return docs


def parse_documents(text: str, source: str) -> list[RawDocument] | ConfigIssue:
    """Parse YAML (one object per document, or a list of objects) without executing tags."""
    try:
        loaded = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        return ConfigIssue(source, where, f"invalid YAML: {problem}", fix="fix the YAML syntax")
    out: list[RawDocument] = []
    for d in loaded:
        items = d if isinstance(d, list) else [d]
        for item in items:
            out.append(RawDocument(source, len(out), item))
    return out


def resolve_definitions(
    docs: Sequence[RawDocument],
    enforcer_tags: Sequence[str],
    *,
    allow_http_loopback_idp: bool = False,
) -> Definitions:
    """Validate a whole set of definitions and resolve it for this enforcer (or raise)."""
    issues: list[ConfigIssue] = []
    services: list[tuple[RawDocument, ServiceModel]] = []
    specs: list[tuple[RawDocument, HTTPResourceSpecModel]] = []
    for doc in docs:
        if not isinstance(doc.data, Mapping):
            issues.append(
                ConfigIssue(doc.where, "", "each document must be a mapping with a 'kind' key", type(doc.data).__name__)
            )
            continue
        kind = doc.data.get("kind")
        model = _KIND_MODELS.get(kind) if isinstance(kind, str) else None
        name = doc.data.get("name")
        prefix = f"{kind}[{name}]." if isinstance(name, str) else ""
        if model is None:
            issues.append(ConfigIssue(doc.where, prefix + "kind", "unknown kind", kind, _FIX["kind"]))
            continue
        try:
            obj = model.model_validate(doc.data)
        except ValidationError as exc:
            issues.extend(_issues_from_validation(exc, doc.where, prefix, doc.data, model))
            continue
        if isinstance(obj, ServiceModel):
            services.append((doc, obj))
        elif isinstance(obj, HTTPResourceSpecModel):
            specs.append((doc, obj))

    _check_unique(issues, services, "service")
    _check_unique(issues, specs, "httpresourcespec")

    all_tags = {*enforcer_tags, "$identity=processingunit"}
    resolved: list[Service] = []
    ignored: list[str] = []
    warnings: list[str] = []
    seen_hosts: dict[tuple[str, int], str] = {}
    for doc, svc in services:
        prefix = f"service[{svc.name}]."
        if svc.selectors and not tags_match(svc.selectors, all_tags):
            ignored.append(svc.name)
            continue
        for key, url in (("OIDCProviderURL", svc.OIDCProviderURL), ("OIDCCallbackURL", svc.OIDCCallbackURL)):
            problem = _https_url(url, allow_http_loopback=allow_http_loopback_idp and key == "OIDCProviderURL")
            if problem:
                issues.append(ConfigIssue(doc.where, prefix + key, problem, url, _FIX[key]))
        cb = urllib.parse.urlsplit(svc.OIDCCallbackURL)
        if cb.scheme == "https" and cb.hostname and normalise_host(cb.hostname) not in svc.hosts:
            issues.append(
                ConfigIssue(
                    doc.where,
                    prefix + "OIDCCallbackURL",
                    "host is not one of the service's hosts",
                    svc.OIDCCallbackURL,
                    f"use https://{svc.hosts[0]} or add the host to hosts",
                )
            )
        cb_port = cb.port if cb.scheme == "https" and cb.hostname else None
        if cb_port is not None and cb_port != svc.exposedPort:
            issues.append(
                ConfigIssue(
                    doc.where,
                    prefix + "OIDCCallbackURL",
                    "port differs from exposedPort",
                    svc.OIDCCallbackURL,
                    f"use port {svc.exposedPort} or change exposedPort",
                )
            )
        for h in svc.hosts:
            other = seen_hosts.get((h, svc.exposedPort))
            if other is not None:
                issues.append(
                    ConfigIssue(
                        doc.where,
                        prefix + "hosts",
                        f"host is already served by service {other!r} on the same exposedPort",
                        h,
                        "give each service its own hosts",
                    )
                )
            seen_hosts[(h, svc.exposedPort)] = svc.name
        secret = ""
        try:
            secret = _read_secret(svc.OIDCClientSecret, doc.where, prefix + "OIDCClientSecret")
        except ConfigError as exc:
            issues.extend(exc.issues)

        endpoints: list[policy.Endpoint] = []
        spec_names: list[str] = []
        for _sdoc, spec in specs:
            if not tags_match(svc.exposedAPIs, {*spec.associatedTags, f"httpresourcespec:name={spec.name}"}):
                continue
            spec_names.append(spec.name)
            for i, ep in enumerate(spec.endpoints):
                endpoints.append(
                    policy.Endpoint(
                        uri=ep.URI,
                        methods=frozenset(ep.methods),
                        public=ep.public,
                        allowed_scopes=tuple(frozenset(c) for c in ep.allowedScopes),
                        rule=f"{spec.name}#{i}",
                    )
                )
        for i, p in enumerate(svc.bypassPaths):
            endpoints.append(
                policy.Endpoint(uri=p, methods=frozenset({"*"}), public=True, rule=f"{svc.name}.bypassPaths[{i}]")
            )
        if not spec_names:
            warnings.append(
                f"service {svc.name!r}: exposedAPIs {svc.exposedAPIs} match no httpresourcespec; "
                "every request will be denied"
            )
        origin = f"https://{svc.hosts[0]}" + ("" if svc.exposedPort == 443 else f":{svc.exposedPort}")
        if cb.scheme == "https" and cb.hostname:
            origin = f"https://{normalise_host(cb.hostname)}" + (f":{cb.port}" if cb.port and cb.port != 443 else "")
        callback_base = svc.OIDCCallbackURL.rstrip("/")
        resolved.append(
            Service(
                name=svc.name,
                client_id=svc.OIDCClientID,
                client_secret=secret,
                issuer=svc.OIDCProviderURL,
                callback_url=callback_base + svc.OIDCCallbackPath,
                callback_path=(urllib.parse.urlsplit(callback_base).path + svc.OIDCCallbackPath),
                logout_path=svc.OIDCLogoutPath,
                origin=origin,
                post_logout_redirect=svc.OIDCPostLogoutRedirectURL,
                userinfo=svc.OIDCUserInfo,
                scopes=tuple(svc.OIDCScopes),
                hosts=tuple(svc.hosts),
                upstream_host=svc.upstreamHost,
                port=svc.port,
                exposed_port=svc.exposedPort,
                endpoints=tuple(endpoints),
                table=policy.EndpointTable(endpoints),
                identity_headers=svc.identityHeaders,
                idp_ca_file=svc.OIDCCAFile,
                tls=svc.TLSCertificate,
                specs=tuple(spec_names),
            )
        )
    if issues:
        raise ConfigError(issues)
    return Definitions(tuple(resolved), tuple(ignored), tuple(warnings))


def _check_unique(issues: list[ConfigIssue], items: Sequence[tuple[RawDocument, Any]], kind: str) -> None:
    seen: dict[str, str] = {}
    for doc, obj in items:
        if obj.name in seen:
            issues.append(
                ConfigIssue(
                    doc.where,
                    f"{kind}[{obj.name}].name",
                    f"duplicate {kind} name (also in {seen[obj.name]})",
                    obj.name,
                    "names must be unique within a definitions set",
                )
            )
        seen.setdefault(obj.name, doc.where)


# ---------------------------------------------------------------------------
# daemon config (enforcer.yaml)

MAX_WORKERS = 64


def _quota_v2(directory: Path) -> float | None:
    """CPUs allowed by ``cpu.max`` in a cgroup v2 directory (None: no file, ``max`` or junk)."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        if quota != "max" and int(period) > 0 and int(quota) > 0:
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    return None


def _quota_v1(directory: Path) -> float | None:
    """CPUs allowed by ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (cgroup v1; -1: none)."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def _with_ancestors(mount: Path, path: str) -> list[Path]:
    """``mount``/``path`` and each parent up to ``mount`` itself (a parent's quota binds too)."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_cpu_limit(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> float | None:
    """The CPU quota that binds this process, in CPUs: the smallest along its own cgroup and
    its ancestors, cgroup v2 (``cpu.max``: a Kubernetes CPU limit, systemd ``CPUQuota=``) or
    v1 (``cpu.cfs_quota_us``); None when there is none or it cannot be read.

    The path comes from ``/proc/self/cgroup``; inside a container whose cgroup is mounted at
    the root of ``/sys/fs/cgroup`` (a cgroup namespace, or Docker's v1 bind mount) the mount
    root itself is read too, so a path that only makes sense on the host does no harm."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and controllers == "":
            found = [_quota_v2(d) for d in _with_ancestors(root, path)]
        elif "cpu" in controllers.split(","):
            mounts = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
            found = [_quota_v1(d) for m in dict.fromkeys(mounts) for d in _with_ancestors(m, path)]
        else:
            continue
        limits.extend(q for q in found if q is not None)
    return min(limits) if limits else None


def usable_cpus(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process can keep busy: its CPU affinity (taskset, cpuset), lowered to the
    cgroup CPU quota rounded up (:func:`cgroup_cpu_limit`: a Kubernetes CPU limit of 1500m
    gives 2), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(proc_cgroup, root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def resolve_workers(value: object) -> object:
    """``listen.workers`` / ``--workers``: ``auto`` becomes :func:`usable_cpus` (at most
    MAX_WORKERS); anything else is left for the int check."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return min(MAX_WORKERS, usable_cpus())
        if not text.isdigit():
            raise ValueError(f"must be a number from 1 to {MAX_WORKERS}, or auto (one per usable CPU)")
    return value


class ListenModel(_Strict):
    """Where the TLS listener binds (redirected traffic arrives here)."""

    address: str = "::"
    port: int = Field(default=8443, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, le=MAX_WORKERS)
    """Serving processes sharing the port (SO_REUSEPORT); more than one needs the SQLite store.
    ``auto``: one per CPU this process may use (:func:`usable_cpus`)."""

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        return resolve_workers(value)
    fastPath: bool = True
    """Serve allowed GET/HEAD requests with a cached session on the lean HTTP/1.1 path
    (enforcer/fastpath.py); everything else, and everything when off, goes through aiohttp."""


class AdminModel(_Strict):
    """Metrics and health endpoints; loopback only."""

    address: str = "127.0.0.1"
    port: int = Field(default=9090, ge=0, le=65535)

    @field_validator("address")
    @classmethod
    def _loopback(cls, v: str) -> str:
        try:
            if not ipaddress.ip_address(v).is_loopback:
                raise ValueError("the admin listener must bind a loopback address, e.g. 127.0.0.1")
        except ValueError as exc:
            raise ValueError(str(exc) if "loopback" in str(exc) else "an IP address, e.g. 127.0.0.1") from None
        return v


class SessionsModel(_Strict):
    """Session store and lifetimes."""

    store: Literal["sqlite", "memory"] = "sqlite"
    idleTimeout: Duration = 8 * 3600.0
    absoluteTimeout: Duration = 24 * 3600.0
    maxSessions: int = Field(default=100_000, ge=1)
    cacheSize: int = Field(default=10_000, ge=1, le=10_000_000)
    """Sessions the SQLite store keeps in memory (~0.3 KB each, the 256 most recently used
    ~3 KB): a request of a cached session needs no disk read; one beyond it costs a SQLite
    read (~0.3 ms of CPU) and enters the cache."""


class OIDCSettingsModel(_Strict):
    """Settings shared by every service's OpenID Connect client."""

    leeway: Duration = 60.0
    maxIdTokenAge: Duration = 600.0
    loginTimeout: Duration = 600.0
    httpTimeout: Duration = 10.0
    jwksRefreshInterval: Duration = 60.0
    caFile: Path | None = None
    allowHttpLoopbackIssuer: bool = False


class SourceModel(_Strict):
    """A definitions source: a YAML file or directory (``file``), or an HTTP(S) ``url``."""

    file: Path | None = None
    url: str | None = None
    tokenFile: Path | None = None
    caFile: Path | None = None
    interval: Duration = 30.0
    timeout: Duration = 10.0

    @model_validator(mode="after")
    def _one_kind(self) -> SourceModel:
        if (self.file is None) == (self.url is None):
            raise ValueError("give exactly one of file: /path or url: https://...")
        if self.url is not None:
            problem = _https_url(self.url, allow_http_loopback=True)
            if problem:
                raise ValueError(f"url {problem} (plain http is accepted only on loopback)")
        if self.interval < 1:
            raise ValueError("interval must be at least 1s")
        return self


class RedirectModel(_Strict):
    """The transparent redirect (nftables): exposed ports land on the listener.

    Off unless enabled, so that a development or test run never touches the host's
    firewall; ``scripts/install``'s sample config turns it on."""

    enabled: bool = False
    table: str = Field(default="enforcer", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    mark: int = Field(default=0x454E, ge=1, le=0xFFFFFFFF)
    blockAppPort: bool = True
    keepBlockOnStop: bool = False


class LimitsModel(_Strict):
    """Bounds on what a client controls."""

    maxBodyBytes: int = Field(default=1 << 30, ge=0)
    headerTimeout: Duration = 30.0
    idleTimeout: Duration = 75.0
    writeTimeout: Duration = 60.0
    """A client that takes none of our answer for this long (its window stays shut while we
    have bytes for it: a slow-read attack, X-LIM-08) is disconnected; 0 turns it off."""
    upstreamConnectTimeout: Duration = 5.0
    upstreamReadTimeout: Duration = 300.0
    maxConnections: int = Field(default=10_000, ge=1)
    maxConnectionsPerIP: int = Field(default=512, ge=1)


class DaemonModel(_Strict):
    """``enforcer.yaml``."""

    tags: list[Tag] = Field(default_factory=list)
    listen: ListenModel = Field(default_factory=ListenModel)
    admin: AdminModel = Field(default_factory=AdminModel)
    stateDir: Path = Path("/var/lib/enforcer")
    logsDir: Path = Path("/var/log/enforcer")
    definitions: list[SourceModel] = Field(min_length=1)
    sessions: SessionsModel = Field(default_factory=SessionsModel)
    oidc: OIDCSettingsModel = Field(default_factory=OIDCSettingsModel)
    limits: LimitsModel = Field(default_factory=LimitsModel)
    redirect: RedirectModel = Field(default_factory=RedirectModel)
    flowLog: Path | None = None  # default: <logsDir>/flows.jsonl


@dataclass(frozen=True)
class Settings:
    """The daemon config, resolved (paths absolute, defaults filled in)."""

    path: Path
    model: DaemonModel

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(self.model.tags)

    @property
    def state_dir(self) -> Path:
        return self.model.stateDir

    @property
    def flow_log(self) -> Path:
        return self.model.flowLog or self.model.logsDir / "flows.jsonl"

    @property
    def sources(self) -> tuple[Path, ...]:
        """The file sources (HTTP sources are read by ``enforcer.definitions``)."""
        return tuple(s.file for s in self.model.definitions if s.file is not None)


def load_settings(path: Path) -> Settings:
    """Read and validate ``enforcer.yaml``; relative paths are relative to its folder."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue(source, "", f"cannot read: {exc.strerror}", fix="pass -c /path/to/enforcer.yaml")]
        ) from None
    docs = parse_documents(text, source)
    if isinstance(docs, ConfigIssue):
        raise ConfigError([docs])
    if len(docs) != 1 or not isinstance(docs[0].data, Mapping):
        raise ConfigError([ConfigIssue(source, "", "must be one YAML mapping", fix="see README: enforcer.yaml")])
    data = dict(docs[0].data)
    base = path.parent.resolve()
    try:
        model = DaemonModel.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_issues_from_validation(exc, source, "", data, DaemonModel)) from None

    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else base / p

    model = model.model_copy(
        update={
            "stateDir": absolute(model.stateDir),
            "logsDir": absolute(model.logsDir),
            "flowLog": absolute(model.flowLog) if model.flowLog else None,
            "definitions": [
                s.model_copy(
                    update={
                        "file": absolute(s.file) if s.file else None,
                        "tokenFile": absolute(s.tokenFile) if s.tokenFile else None,
                        "caFile": absolute(s.caFile) if s.caFile else None,
                    }
                )
                for s in model.definitions
            ],
            "oidc": model.oidc.model_copy(
                update={"caFile": absolute(model.oidc.caFile) if model.oidc.caFile else None}
            ),
        }
    )
    if model.sessions.idleTimeout > model.sessions.absoluteTimeout:
        raise ConfigError(
            [
                ConfigIssue(
                    source,
                    "sessions.idleTimeout",
                    "is longer than sessions.absoluteTimeout",
                    model.sessions.idleTimeout,
                    "make idleTimeout <= absoluteTimeout",
                )
            ]
        )
    settings = Settings(path=path, model=model)
    check_workers(settings, model.listen.workers, "listen.workers")
    return settings


def check_workers(settings: Settings, workers: int, where: str) -> None:
    """Several serving processes must share sessions and pending logins (raises ConfigError)."""
    if workers > 1 and settings.model.sessions.store != "sqlite":
        raise ConfigError(
            [
                ConfigIssue(
                    str(settings.path),
                    where,
                    f"{workers} workers cannot share the in-memory session store (sessions.store: memory)",
                    workers,
                    "use sessions.store: sqlite (the default) or a single worker",
                )
            ]
        )


def with_workers(settings: Settings, workers: int | str) -> Settings:
    """``settings`` with ``listen.workers`` replaced (the ``--workers`` option: a number or
    ``auto``), checked by :class:`ListenModel` exactly like the file's value."""
    try:
        listen = ListenModel.model_validate({**settings.model.listen.model_dump(), "workers": workers})
    except ValidationError:
        raise ConfigError([ConfigIssue(
            "--workers", "", f"must be a number from 1 to {MAX_WORKERS}, or auto", workers, "e.g. --workers 2",
        )]) from None
    check_workers(settings, listen.workers, "--workers")
    return Settings(path=settings.path, model=settings.model.model_copy(update={"listen": listen}))


def load_definitions(settings: Settings) -> Definitions:
    """Read every configured source and resolve the set (raises ConfigError)."""
    docs: list[RawDocument] = []
    issues: list[ConfigIssue] = []
    for src in settings.sources:
        if not src.exists():
            issues.append(
                ConfigIssue(
                    str(settings.path),
                    "definitions",
                    "source does not exist",
                    str(src),
                    "create the file or fix the path",
                )
            )
            continue
        try:
            docs.extend(load_documents(src))
        except ConfigError as exc:
            issues.extend(exc.issues)
    if issues:
        raise ConfigError(issues)
    return resolve_definitions(docs, settings.tags, allow_http_loopback_idp=settings.model.oidc.allowHttpLoopbackIssuer)
