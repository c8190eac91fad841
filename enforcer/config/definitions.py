"""The definitions (``kind: service`` / ``kind: httpresourcespec``) → frozen :class:`Service` objects.

One object per YAML document with a ``kind:`` field, with the field names of the
Microsegmentation guide (``OIDCClientID``, ``exposedAPIs``, ``endpoints[].allowedScopes`` ...).
Unknown keys are errors (with a did-you-mean).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)

from enforcer import policy
from enforcer.config.fields import _HEADER, _NAME, Tag, TagExpression, _check_host, _Strict, normalise_host, tags_match
from enforcer.config.issues import _FIX, ConfigError, ConfigIssue, _issues_from_validation


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


HTTP_METHODS = frozenset({
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY",
    # WebDAV, CalDAV and versioning (the IANA HTTP Method Registry, names without '-')
    "ACL", "BIND", "CHECKIN", "CHECKOUT", "COPY", "LABEL", "LINK", "LOCK", "MERGE", "MKACTIVITY",
    "MKCALENDAR", "MKCOL", "MKREDIRECTREF", "MKWORKSPACE", "MOVE", "ORDERPATCH", "PROPFIND",
    "PROPPATCH", "REBIND", "REPORT", "SEARCH", "UNBIND", "UNCHECKOUT", "UNLINK", "UNLOCK", "UPDATE",
    "UPDATEREDIRECTREF",
})
"""The methods an endpoint may name (besides ``*``): a typo such as ``PSOT`` is an error."""


ANY_SIGNED_IN = "any-signed-in-user"
"""``allowedScopes: any-signed-in-user``: the explicit way to let every signed-in user in (a bare
empty clause, ``[[]]``, does the same but loads with a warning, as it is easily a slip)."""


class EndpointModel(_Strict):
    """One ``endpoints[]`` entry of an httpresourcespec."""

    URI: str
    methods: list[str] = Field(min_length=1)
    public: bool = False
    allowedScopes: TagExpression | Literal["any-signed-in-user"] = Field(default_factory=list)
    """OR of ANDs of tags; ``any-signed-in-user`` (documented) lets every signed-in user in."""

    def scopes(self) -> tuple[frozenset[str], ...]:
        """The tag sets that allow (``any-signed-in-user``: the one empty set)."""
        if self.allowedScopes == ANY_SIGNED_IN:
            return (frozenset(),)
        return tuple(frozenset(c) for c in self.allowedScopes)

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
            if m != "*" and m.upper() not in HTTP_METHODS:
                close = difflib.get_close_matches(m.upper(), sorted(HTTP_METHODS), n=1)
                hint = f"did you mean {close[0]}?" if close else "GET, POST, ... or *"
                raise ValueError(f"method {m!r} is not an HTTP method ({hint})")
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
        hosts = [_check_host(h) for h in v]
        for h in hosts:
            try:
                ipaddress.ip_address(h)
            except ValueError:
                continue  # a DNS name
            raise ValueError(
                f"{h} is an IP address: browsers send no SNI for an IP, so the enforcer cannot pick "
                "the service or its certificate; use a DNS name (for a test, map one to the address "
                f"in /etc/hosts, e.g. '{h} app.test')"
            )
        return hosts

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


IDENTITY_TAG = "$identity=processingunit"
"""The tag every processing unit (this enforcer, a pod) carries besides its own."""

_KIND_MODELS: dict[str, type[_Strict]] = {
    "service": ServiceModel,
    "httpresourcespec": HTTPResourceSpecModel,
}
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
    selectors: tuple[tuple[str, ...], ...] = ()  # the processing units it is served for (OR of ANDs)
    secret_file: Path | None = None  # where the client secret was read from (OIDCClientSecret: {file: ...})
    namespace: str = ""
    """Its Kubernetes namespace (a custom resource's): pod mode serves it only to pods of that
    namespace. Empty (a file's service without ``namespace:``): pods of any namespace."""


@dataclass(frozen=True)
class Definitions:
    """A validated set of definitions, resolved against this enforcer's tags."""

    services: tuple[Service, ...]
    """The services this enforcer serves: ``for_tags(its tags)``."""
    ignored: tuple[str, ...] = ()  # services whose selectors do not match this enforcer
    warnings: tuple[str, ...] = ()
    catalog: tuple[Service, ...] = ()
    """Every valid service of the set, whichever tags its selectors ask for, in document order."""

    def for_tags(self, tags: Iterable[str]) -> tuple[Service, ...]:
        """The services a processing unit with these tags is served (the catalog's services
        whose selectors match; a pure function of ``tags``)."""
        have = frozenset(tags)
        return tuple(s for s in self.catalog if selects(s.selectors, have))

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
                    secret_fix(secret.file),
                )
            ]
        ) from None
    if not text:
        raise ConfigError(
            [ConfigIssue(source, key + ".file", "secret file is empty", str(secret.file), secret_fix(secret.file))]
        )
    return text


SECRETS_GROUP = "enforcer-secrets"
"""The group the shipped unit (systemd/enforcer.service) adds its dynamic user to, so that it
reads secrets kept ``root:enforcer-secrets 0640`` (scripts/install creates it)."""


def secret_fix(path: Path | str) -> str:
    """How to create a secret file the shipped unit can read (and nobody else)."""
    return (
        f"write the client secret to {path}, then: chown root:{SECRETS_GROUP} {path} && chmod 0640 {path} "
        f"(the shipped unit reads secrets through group {SECRETS_GROUP})"
    )


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
    """Validate a whole set of definitions and resolve it for this enforcer (or raise).

    Every service is resolved into the catalog; the ones this enforcer's tags select are its
    ``services``, and only their problems (and their hosts clashing) make the set invalid."""
    issues: list[ConfigIssue] = []
    services, specs = _validate_documents(docs, issues, allow_http_loopback_idp=allow_http_loopback_idp)
    _check_unique(issues, services, "service")
    _check_unique(issues, specs, "httpresourcespec")
    catalog: list[Service] = []
    ignored: list[str] = []
    warnings: list[str] = []
    seen_hosts: dict[tuple[str, int], str] = {}
    for doc, svc in services:
        selected = selects(svc.selectors, enforcer_tags)
        own = _check_urls(doc, svc, allow_http_loopback_idp=allow_http_loopback_idp)
        if selected:
            own.extend(_check_hosts(doc, svc, seen_hosts))
        secret = ""
        try:
            secret = _read_secret(svc.OIDCClientSecret, doc.where, f"service[{svc.name}].OIDCClientSecret")
        except ConfigError as exc:
            own.extend(exc.issues)
        if selected:
            issues.extend(own)
        else:
            ignored.append(svc.name)
        if own:
            continue
        service = _resolve_service(svc, secret, specs)
        catalog.append(service)
        if selected and not service.specs:
            warnings.append(
                f"service {svc.name!r}: exposedAPIs {svc.exposedAPIs} match no httpresourcespec; "
                "every request will be denied"
            )
    warnings.extend(_empty_clause_warnings(specs))
    if issues:
        raise ConfigError(issues)
    mine = tuple(s for s in catalog if selects(s.selectors, enforcer_tags))
    return Definitions(mine, tuple(ignored), tuple(warnings), catalog=tuple(catalog))


def _empty_clause_warnings(specs: Sequence[tuple[RawDocument, HTTPResourceSpecModel]]) -> list[str]:
    """A non-public endpoint whose allowedScopes has an empty clause lets every signed-in user in:
    say so unless it was written the documented way (``any-signed-in-user``)."""
    out = []
    for _doc, spec in specs:
        for i, ep in enumerate(spec.endpoints):
            if not ep.public and isinstance(ep.allowedScopes, list) and any(not c for c in ep.allowedScopes):
                out.append(
                    f"httpresourcespec {spec.name!r} endpoints[{i}] ({ep.URI}): an empty allowedScopes clause "
                    f"lets every signed-in user in; write allowedScopes: {ANY_SIGNED_IN} if that is meant, "
                    "or name the tags, e.g. [[groups=staff]]"
                )
    return out


def selects(selectors: Sequence[Sequence[str]], tags: Iterable[str]) -> bool:
    """Whether a service with these ``selectors`` is served for a processing unit with ``tags``
    (no selectors: everywhere)."""
    return not selectors or tags_match(selectors, {*tags, IDENTITY_TAG})


def _validate_documents(
    docs: Sequence[RawDocument], issues: list[ConfigIssue], *, allow_http_loopback_idp: bool = False
) -> tuple[list[tuple[RawDocument, ServiceModel]], list[tuple[RawDocument, HTTPResourceSpecModel]]]:
    """Each document validated against the model of its ``kind``; problems go to ``issues``."""
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
            found = _issues_from_validation(exc, doc.where, prefix, doc.data, model)
            issues.extend(found)
            if model is ServiceModel:
                reported = {i.path for i in found}
                issues.extend(
                    _raw_service_checks(doc, prefix, reported, allow_http_loopback_idp=allow_http_loopback_idp)
                )
            continue
        if isinstance(obj, ServiceModel):
            services.append((doc, obj))
        elif isinstance(obj, HTTPResourceSpecModel):
            specs.append((doc, obj))
    return services, specs


def _raw_service_checks(
    doc: RawDocument, prefix: str, reported: set[str], *, allow_http_loopback_idp: bool
) -> list[ConfigIssue]:
    """For a service document with other problems: the checks of its URLs and secret file that
    need no valid document, so one run names every problem (a typo'd key hides nothing)."""
    data = doc.data
    assert isinstance(data, Mapping)
    issues: list[ConfigIssue] = []
    for key in ("OIDCProviderURL", "OIDCCallbackURL"):
        url = data.get(key)
        if isinstance(url, str) and prefix + key not in reported:
            problem = _https_url(url, allow_http_loopback=allow_http_loopback_idp and key == "OIDCProviderURL")
            if problem:
                issues.append(ConfigIssue(doc.where, prefix + key, problem, url, _FIX[key]))
    secret = data.get("OIDCClientSecret")
    key = prefix + "OIDCClientSecret"
    if isinstance(secret, Mapping) and not any(p.startswith(key) for p in reported):
        try:
            _read_secret(SecretFile.model_validate(secret), doc.where, key)
        except ValidationError:
            pass  # reported with the document's own issues
        except ConfigError as exc:
            issues.extend(exc.issues)
    return issues


def _check_urls(doc: RawDocument, svc: ServiceModel, *, allow_http_loopback_idp: bool) -> list[ConfigIssue]:
    """The IdP and callback URLs are https, and the callback is on one of the service's hosts and ports."""
    prefix = f"service[{svc.name}]."
    issues: list[ConfigIssue] = []
    for key, url in (("OIDCProviderURL", svc.OIDCProviderURL), ("OIDCCallbackURL", svc.OIDCCallbackURL)):
        problem = _https_url(url, allow_http_loopback=allow_http_loopback_idp and key == "OIDCProviderURL")
        if problem:
            issues.append(ConfigIssue(doc.where, prefix + key, problem, url, _FIX[key]))
    try:
        cb = urllib.parse.urlsplit(svc.OIDCCallbackURL)
        cb_port = cb.port if cb.scheme == "https" and cb.hostname else None
    except ValueError:  # brackets or a port out of range
        if not issues or issues[-1].path != prefix + "OIDCCallbackURL":
            issues.append(ConfigIssue(
                doc.where, prefix + "OIDCCallbackURL", "not a URL", svc.OIDCCallbackURL, _FIX["OIDCCallbackURL"]
            ))
        return issues
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
    return issues


def _check_hosts(doc: RawDocument, svc: ServiceModel, seen_hosts: dict[tuple[str, int], str]) -> list[ConfigIssue]:
    """No two services of one enforcer serve the same host on the same exposedPort."""
    issues: list[ConfigIssue] = []
    for h in svc.hosts:
        other = seen_hosts.get((h, svc.exposedPort))
        if other is not None:
            issues.append(
                ConfigIssue(
                    doc.where,
                    f"service[{svc.name}].hosts",
                    f"host is already served by service {other!r} on the same exposedPort",
                    h,
                    "give each service its own hosts",
                )
            )
        seen_hosts[(h, svc.exposedPort)] = svc.name
    return issues


def _endpoints(
    svc: ServiceModel, specs: Sequence[tuple[RawDocument, HTTPResourceSpecModel]]
) -> tuple[list[policy.Endpoint], list[str]]:
    """The endpoints of the specs the service's exposedAPIs pick, then its bypassPaths; and those specs' names."""
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
                    allowed_scopes=ep.scopes(),
                    rule=f"{spec.name}#{i}",
                )
            )
    for i, p in enumerate(svc.bypassPaths):
        endpoints.append(
            policy.Endpoint(uri=p, methods=frozenset({"*"}), public=True, rule=f"{svc.name}.bypassPaths[{i}]")
        )
    return endpoints, spec_names


def redirect_uri(callback_url: str, callback_path: str) -> tuple[str, str]:
    """The redirect URI to register at the IdP and the path it arrives on.

    ``OIDCCallbackURL`` is the origin (or a prefix) the ``OIDCCallbackPath`` is appended to;
    one that already ends in the callback path is taken as the full redirect URI, never
    doubled into ``.../oauth2/callback/oauth2/callback``."""
    base = callback_url.rstrip("/")
    path = urllib.parse.urlsplit(base).path
    if path.endswith(callback_path):
        return base, path
    return base + callback_path, path + callback_path


def _resolve_service(
    svc: ServiceModel, secret: str, specs: Sequence[tuple[RawDocument, HTTPResourceSpecModel]]
) -> Service:
    """The runtime :class:`Service` of a validated service document."""
    endpoints, spec_names = _endpoints(svc, specs)
    cb = urllib.parse.urlsplit(svc.OIDCCallbackURL)
    origin = f"https://{svc.hosts[0]}" + ("" if svc.exposedPort == 443 else f":{svc.exposedPort}")
    if cb.scheme == "https" and cb.hostname:
        origin = f"https://{normalise_host(cb.hostname)}" + (f":{cb.port}" if cb.port and cb.port != 443 else "")
    callback_url, callback_path = redirect_uri(svc.OIDCCallbackURL, svc.OIDCCallbackPath)
    return Service(
        name=svc.name,
        client_id=svc.OIDCClientID,
        client_secret=secret,
        issuer=svc.OIDCProviderURL,
        callback_url=callback_url,
        callback_path=callback_path,
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
        selectors=tuple(tuple(clause) for clause in svc.selectors),
        secret_file=svc.OIDCClientSecret.file if isinstance(svc.OIDCClientSecret, SecretFile) else None,
        namespace=svc.namespace,
    )


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

