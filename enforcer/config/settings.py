"""The daemon config (``enforcer.yaml``), owned by the host operator, → :class:`Settings`.

This enforcer's own tags, listener, state and log directories, definition sources, sessions,
redirect and limits. Unknown keys are errors (with a did-you-mean).

``include:`` names drop-in files (globs, relative to the config's folder) merged over the file
in order: mappings merge key by key, anything else (a list, a scalar) replaces. A problem with a
value that came from a drop-in names that drop-in (:func:`read_settings`). This lets kustomize
components each add one ConfigMap key (``enforcer.pod-mode.yaml``, ``enforcer.sessions.yaml``)
instead of rewriting the whole ``enforcer.yaml``.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from enforcer.config.cpus import MAX_WORKERS, resolve_workers
from enforcer.config.definitions import (
    Definitions,
    RawDocument,
    _https_url,
    load_documents,
    parse_documents,
    resolve_definitions,
)
from enforcer.config.fields import Duration, Tag, _Strict
from enforcer.config.issues import FIX_DAEMON, ConfigError, ConfigIssue, _issues_from_validation


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
    identityProviders: Literal["required", "reported"] = "required"
    """Whether ``/readyz`` waits for every service's IdP (discovery and keys): ``required``
    (one enforcer's own services), or ``reported``: named under ``degraded`` in a 200 answer
    (Kubernetes, where any namespace's custom resource may name an unreachable IdP, which must
    not hold back the node's readiness or a rolling update). Logins of such a service answer
    ``idp_unavailable`` either way."""

    @field_validator("address")
    @classmethod
    def _loopback(cls, v: str) -> str:
        try:
            if not ipaddress.ip_address(v).is_loopback:
                raise ValueError("the admin listener must bind a loopback address, e.g. 127.0.0.1")
        except ValueError as exc:
            raise ValueError(str(exc) if "loopback" in str(exc) else "an IP address, e.g. 127.0.0.1") from None
        return v


class MetricsModel(_Strict):
    """``metrics:``: a second listener serving only ``GET /metrics``, for a Prometheus that cannot
    reach the loopback admin listener (a hostNetwork pod's 127.0.0.1 is the node's). Off unless
    set; it exposes counts labelled by service, decision, reason and source, never a user, client
    or path, and has no ``/reload``."""

    address: str = "::"
    port: int = Field(default=9091, ge=0, le=65535)

    @field_validator("address")
    @classmethod
    def _ip(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError("an IP address, e.g. '::' (every address) or the node's 10.0.0.5") from None
        return v


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_SENTINEL = re.compile(r"^\[?[A-Za-z0-9.:-]+\]?:[0-9]{1,5}$")


class SentinelAuthModel(_Strict):
    """``sessions.redis.sentinelAuth: {username, passwordFile}``: the Sentinels' own credentials."""

    username: str | None = Field(default=None, pattern=r"^[!-~]{1,128}$")
    passwordFile: Path


class RedisModel(_Strict):
    """``sessions.redis``: where the Redis store is (``store: redis``), for a fleet of enforcers.

    Either ``url`` (``redis://host:6379``, ``rediss://`` for TLS, ``unix:///run/redis.sock``)
    or ``sentinels`` (``host:port`` entries) with ``sentinelMaster``. The password is read from
    ``passwordFile`` (never written in this file); ``username`` is the ACL user."""

    url: str | None = None
    sentinels: list[str] = Field(default_factory=list, max_length=16)
    sentinelMaster: str = Field(default="mymaster", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    tls: bool = False
    """TLS to the Sentinel-chosen master and the sentinels (with ``url`` the scheme says it)."""
    caFile: Path | None = None
    username: str | None = Field(default=None, pattern=r"^[!-~]{1,128}$")
    passwordFile: Path | None = None
    db: int = Field(default=0, ge=0, le=15)
    keyPrefix: str = Field(default="enforcer:", pattern=r"^[A-Za-z0-9:._-]{0,64}$")
    timeout: Duration = 0.5
    """Connect and command timeout: beyond it Redis counts as unreachable (fail closed)."""
    staleness: Duration = 1.0
    """How long a cached session may be served without a confirmed-fresh view of Redis: a
    logout or revocation on any enforcer is enforced by every enforcer within this bound."""
    sentinelAuth: Literal["same", "none"] | SentinelAuthModel = "same"
    """What the Sentinels are sent: ``same`` (``username``/``passwordFile``, for Sentinels with
    the same ACL user), ``none`` (Sentinels without authentication, Redis's default), or
    ``{username, passwordFile}`` of their own."""

    @field_validator("tls", "caFile")
    @classmethod
    def _tls_needs_rediss(cls, value: object, info: ValidationInfo) -> object:
        """``tls``/``caFile`` with a ``redis://`` or ``unix://`` URL: refused, not ignored (redis-py
        applies TLS options to ``rediss://`` only, so the connection would be plaintext)."""
        url = info.data.get("url")
        if not value or not isinstance(url, str) or not url.startswith(("redis://", "unix://")):
            return value
        shown = _url_shown(url)
        fix = (f"use url: rediss://{shown.removeprefix('redis://')} for TLS (the server needs a tls-port), "
               f"or remove {info.field_name} for plaintext") if url.startswith("redis://") else (
               f"remove {info.field_name} (a unix socket is local: no TLS), or use url: rediss://host:port")
        raise PydanticCustomError(
            "redis_tls_without_rediss",
            "is ignored with url {url}: the connection would be plaintext (TLS options apply to rediss:// only)",
            {"url": shown, "fix": fix},
        )

    @field_validator("db")
    @classmethod
    def _db_once(cls, value: int, info: ValidationInfo) -> int:
        """``db`` and a different database in the URL: refused, not ignored (redis-py lets the
        URL's win). Only a ``db`` given in the file is checked (a default is never validated)."""
        url = info.data.get("url")
        in_url = _url_db(url) if isinstance(url, str) else None
        if not isinstance(in_url, int) or in_url == value:
            return value
        shown = _url_shown(url) if isinstance(url, str) else ""
        raise PydanticCustomError(
            "redis_db_twice",
            "conflicts with database {in_url} of url {url}: the URL's database would be used, this one ignored",
            {"in_url": in_url, "url": shown,
             "fix": f"give the database once: remove db (database {in_url} of the URL is used), "
                    f"or take it out of the url and keep db: {value}"},
        )

    @model_validator(mode="after")
    def _one_place(self) -> RedisModel:
        if (self.url is None) == (not self.sentinels):
            raise ValueError("give exactly one of url: redis://... or sentinels: [host:port, ...]")
        if self.url is not None and not self.url.startswith(_REDIS_SCHEMES):
            raise ValueError("url must start with redis://, rediss:// or unix://")
        if self.url is not None and (options := sorted(set(urllib.parse.parse_qs(
                urllib.parse.urlsplit(self.url).query)) - {"db"})):
            # redis-py lets them win over these settings (ssl_cert_reqs=none, ssl_check_hostname=false, ...)
            raise ValueError(f"url options {', '.join(options)} are not taken: they would override "
                             "sessions.redis (TLS checks, timeout); give the keys of sessions.redis instead")
        if self.url is not None and isinstance(problem := _url_db(self.url), str):
            raise ValueError(problem)
        for entry in self.sentinels:
            if not _SENTINEL.match(entry):
                raise ValueError(f"sentinel {entry!r} is not host:port")
        if not 0.01 <= self.timeout <= 10:
            raise ValueError("timeout must be between 10ms and 10s")
        if not 0.1 <= self.staleness <= 60:
            raise ValueError("staleness must be between 100ms and 60s")
        return self


def _url_db(url: str) -> int | str | None:
    """The database a Redis URL names, as redis-py reads it (``?db=N``, else a ``redis(s)://``
    path ``/N``), None for none, or what is wrong with it."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query).get("db")
    if query:
        text, where = query[0], "?db="
    elif parts.scheme in ("redis", "rediss") and parts.path.strip("/"):
        text, where = urllib.parse.unquote(parts.path).replace("/", ""), "path /"
    else:
        return None
    if not text.isascii() or not text.isdigit():
        return f"url {where}{text} is not a database number: redis-py would ignore it (give /0 to /15, or none)"
    return int(text)


def _url_shown(url: str) -> str:
    """``url`` without a password, fit for a message."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + parts.netloc.rpartition("@")[2]).geturl()


class SessionsModel(_Strict):
    """Session store and lifetimes."""

    store: Literal["sqlite", "memory", "redis"] = "sqlite"
    redis: RedisModel | None = None
    """Required with ``store: redis``."""
    idleTimeout: Duration = 8 * 3600.0
    absoluteTimeout: Duration = 24 * 3600.0
    maxSessions: int = Field(default=100_000, ge=1)
    cacheSize: int = Field(default=10_000, ge=1, le=10_000_000)
    """Sessions the SQLite store keeps in memory (~0.3 KB each, the 256 most recently used
    ~3 KB): a request of a cached session needs no disk read; one beyond it costs a SQLite
    read (~0.3 ms of CPU) and enters the cache. The Redis store's cache is sized the same way."""
    refreshTokenKeyFile: Path | None = None
    """Secret file of AES-256 keys (base64, one a line, newest first) that seal refresh tokens
    at rest. Without it no refresh token is kept, even with ``offline_access``."""
    claimsLifetime: Duration = 300.0
    """With a refresh token: how long a session's claims are trusted before they are renewed."""
    refreshMargin: Duration = 60.0
    """A refresh starts this long before the claims' end, in the background (past the end: inline)."""

    @model_validator(mode="after")
    def _redis_needs_where(self) -> SessionsModel:
        if self.store == "redis" and self.redis is None:
            raise ValueError("store: redis needs a redis: section (url: or sentinels:)")
        return self


class OIDCSettingsModel(_Strict):
    """Settings shared by every service's OpenID Connect client."""

    leeway: Duration = 60.0
    maxIdTokenAge: Duration = 600.0
    loginTimeout: Duration = 600.0
    httpTimeout: Duration = 10.0
    jwksRefreshInterval: Duration = 60.0
    caFile: Path | None = None
    allowHttpLoopbackIssuer: bool = False


_K8S_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class KubernetesSourceModel(_Strict):
    """``kubernetes: {}``: EnforcerService / HTTPResourceSpec custom resources (and the Secrets
    they reference) watched through the API server (enforcer/config/kubernetes.py)."""

    namespaces: list[str] = Field(default_factory=list, max_length=256)
    """Watch only these namespaces (default: all namespaces)."""
    kubeconfig: Path | None = None
    """A kubeconfig file (default: the pod's in-cluster service account)."""

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, v: list[str]) -> list[str]:
        for ns in v:
            if not _K8S_NAME.match(ns):
                raise ValueError(f"{ns!r} is not a namespace name (lower-case letters, digits, '-')")
        if len(set(v)) != len(v):
            raise ValueError("a namespace is listed twice")
        return v


class SourceModel(_Strict):
    """A definitions source: a YAML file or directory (``file``), an HTTP(S) ``url``, or the
    Kubernetes API (``kubernetes: {}``)."""

    file: Path | None = None
    url: str | None = None
    kubernetes: KubernetesSourceModel | None = None
    tokenFile: Path | None = None
    caFile: Path | None = None
    interval: Duration = 30.0
    timeout: Duration = 10.0

    @model_validator(mode="after")
    def _one_kind(self) -> SourceModel:
        if [self.file, self.url, self.kubernetes].count(None) != 2:
            raise ValueError("give exactly one of file: /path, url: https://... or kubernetes: {}")
        if self.url is not None:
            problem = _https_url(self.url, allow_http_loopback=True)
            if problem:
                raise ValueError(f"url {problem} (plain http is accepted only on loopback)")
        if self.interval < 1:
            raise ValueError("interval must be at least 1s")
        return self


_K8S_LABEL_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
"""A DNS subdomain (RFC 1123): the name of a Node or of a DaemonSet."""


_CNI_SOCKET = re.compile(r"^/[A-Za-z0-9/._-]{1,105}$")
"""What the CNI plugin accepts as its socket path (enforcer/run/cni.py, deploy/cni/enforcer-cni.c)."""


class PodsModel(_Strict):
    """``kubernetes.pods``: pod mode (enforcer/run/pods.py). Each pod of this Node whose labels
    select a service is served inside its own network namespace: a listener on ``listenPort``
    there and the redirect table there. New pods come from the chained CNI plugin over
    ``cniSocket`` (before any of their containers runs); running ones from a ``/proc`` scan."""

    enabled: bool = False
    listenPort: int = Field(default=15443, ge=1, le=65535)
    """The listener's port inside every served pod (the same on every enforcer: an old and a
    new one overlap on it, and the rules left by one redirect to it). No app may use it."""
    probePort: int = Field(default=15021, ge=1, le=65535)
    """The probe gate's port inside every served pod (like Istio's 15021): the kubelet's plain-HTTP
    ``httpGet`` probes of a protected ``port`` are redirected there from the node's address, and
    only a ``GET``/``HEAD`` of a probe's own path reaches the app. Not ``listenPort``; no app may use it."""
    cniSocket: Path = Path("/var/run/enforcer/cni.sock")
    """Where the CNI plugin reaches the enforcer (the DaemonSet's hostPath)."""
    lookupWait: Duration = 5.0
    """How long a CNI ADD waits for the pod to appear in the watch of this Node's pods (it may
    lag the kubelet) before it fails the sandbox (fail closed; kubelet retries)."""

    @field_validator("cniSocket")
    @classmethod
    def _socket(cls, v: Path) -> Path:
        if not _CNI_SOCKET.match(str(v)):
            raise ValueError("an absolute path of letters, digits, '/', '.', '_', '-' (at most 106 bytes), "
                             "e.g. /var/run/enforcer/cni.sock")
        return v

    @model_validator(mode="after")
    def _bounded(self) -> PodsModel:
        if not 0.1 <= self.lookupWait <= 15:
            raise ValueError("lookupWait must be between 100ms and 15s (the plugin gives up after 30s)")
        if self.probePort == self.listenPort:
            raise ValueError("probePort must differ from listenPort (the probe gate has a listener of its own)")
        return self


class KubernetesModel(_Strict):
    """``kubernetes:``: this enforcer runs as a DaemonSet's pod on a Kubernetes node
    (enforcer/config/kubernetes.py). Its tags get one ``key=value`` tag per label of its
    Node, and a stop asks whether its DaemonSet is being deleted (then, and only then, the
    redirect table goes)."""

    nodeName: str | None = None
    """Its Node (default: the environment variable ``NODE_NAME``, which the shipped DaemonSet
    sets from ``spec.nodeName``)."""
    nodeLabelTags: bool = True
    """Add one ``key=value`` tag per label of the Node to ``tags`` (watched: a label change
    re-resolves the definitions)."""
    daemonSet: str | None = None
    """The DaemonSet this pod belongs to (e.g. ``enforcer``): at a stop it is asked for; gone,
    being deleted or no longer letting us read it is an uninstall (the table is removed);
    present or unreachable keeps the table. None: every stop keeps it (``redirect.keepBlockOnStop``)."""
    namespace: str | None = None
    """The DaemonSet's namespace (default: ``POD_NAMESPACE``, else the pod's service account's)."""
    kubeconfig: Path | None = None
    """A kubeconfig file (default: the pod's in-cluster service account)."""
    timeout: Duration = 4.0
    """How long one request to the API server may take: the Node's first read at start and
    the DaemonSet question at a stop (which must fit in the pod's grace period)."""
    pods: PodsModel = Field(default_factory=PodsModel)
    """Pod mode: protect the pods of this Node by label, inside their own network namespaces."""

    @field_validator("nodeName", "daemonSet")
    @classmethod
    def _object_name(cls, v: str | None) -> str | None:
        if v is not None and not _K8S_LABEL_NAME.match(v):
            raise ValueError(
                f"{v!r} is not a Kubernetes object name (lower-case letters, digits, '-', '.'), e.g. enforcer"
            )
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        if v is not None and not _K8S_NAME.match(v):
            raise ValueError(f"{v!r} is not a namespace name (lower-case letters, digits, '-'), e.g. enforcer-system")
        return v

    @model_validator(mode="after")
    def _bounded(self) -> KubernetesModel:
        if not 0.5 <= self.timeout <= 10:
            raise ValueError("timeout must be between 500ms and 10s (a stop must ask within the grace period)")
        return self


KUBE_MARK_BITS = 0x4000 | 0x8000
"""The packet-mark bits kubelet and kube-proxy use on every Kubernetes node (masquerade, drop)."""


class RedirectModel(_Strict):
    """The transparent redirect (nftables): exposed ports land on the listener.

    Off unless enabled, so that a development or test run never touches the host's
    firewall; ``scripts/install``'s sample config turns it on."""

    enabled: bool = False
    table: str = Field(default="enforcer", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    mark: int = Field(default=0x204E, ge=1, le=0xFFFFFFFF)
    """``SO_MARK`` of the enforcer's own sockets, which its ``output`` chain lets through."""
    blockAppPort: bool = True
    keepBlockOnStop: bool = True
    """Fail closed at a stop (SIGTERM, ``systemctl stop``, restart, upgrade): the table stays, so
    the exposed ports refuse and the app ports stay blocked until the enforcer serves again or
    ``enforcer unblock`` opens them. False (opt-in) removes the table at a clean stop."""

    @field_validator("mark")
    @classmethod
    def _not_kubernetes_bits(cls, v: int) -> int:
        if v & KUBE_MARK_BITS:
            raise ValueError(
                f"{v:#x} uses bit 0x4000 or 0x8000 (Kubernetes' KUBE-MARK-MASQ / KUBE-MARK-DROP): on a node the "
                "enforcer's own connections would be masqueraded or dropped; use e.g. 0x204E (the default)"
            )
        return v


_STRIP_ENTRY = re.compile(r"[A-Za-z0-9!#$%&'+.^_`|~-]{0,63}[A-Za-z0-9][A-Za-z0-9!#$%&'+.^_`|~-]{0,63}\*?")
"""A header name, or a prefix ending in ``*``, holding at least one letter or digit."""


class DenyPageModel(_Strict):
    """What the 403 page tells a signed-in user who is denied (the flow record keeps it all).

    ``show``: ``groups`` (default) names the rule and the tag sets made only of
    ``groupClaims`` tags (e.g. ``groups=admins``), never another person's ``email=`` or
    ``sub=``; ``all`` shows every tag set; ``none`` only the reason code and flow id."""

    show: Literal["none", "groups", "all"] = "groups"
    groupClaims: list[str] = Field(default_factory=lambda: ["groups", "roles"])


class LimitsModel(_Strict):
    """Bounds on what a client controls."""

    maxBodyBytes: int = Field(default=1 << 30, ge=0)
    maxHeadBytes: int = Field(default=64 << 10, ge=1024)
    """A request's whole header block (request line and every field) at most; a bigger one
    gets 431 ``header_too_large`` and the connection closes.  Each line is also capped at
    8 KiB and the fields at 100."""
    headerTimeout: Duration = 30.0
    idleTimeout: Duration = 75.0
    writeTimeout: Duration = 60.0
    """A client that takes none of our answer for this long (its window stays shut while we
    have bytes for it: a slow-read attack, X-LIM-08) is disconnected; 0 turns it off."""
    upstreamConnectTimeout: Duration = 5.0
    upstreamReadTimeout: Duration = 300.0
    maxConnections: int = Field(default=10_000, ge=1)
    maxConnectionsPerIP: int = Field(default=512, ge=1)
    bodyMinRate: int = Field(default=240, ge=0)
    """A request body must arrive at this many bytes per second on average, counted from its
    first ``bodyGrace`` seconds on (and not while the enforcer is not reading); a slower one is
    cut with 408 ``body_too_slow`` (slow POST, X-LIM-07).  0 turns it off (``idleTimeout``
    still cuts a body that stalls)."""
    bodyGrace: Duration = 10.0
    """Seconds a request body may stay below ``bodyMinRate`` first."""
    readMinRate: int = Field(default=2048, ge=0)
    """Once the enforcer's writing to a client has been held up (its TCP window shut) for
    ``readGrace`` seconds, the client must take at least this many bytes of the answer per
    second, measured over each following ``readGrace`` seconds; a slower one is cut
    (``read_too_slow``, 408 in the flow record): a slow reader cannot hold an app connection
    for hours while it trickles.  0 turns it off (``writeTimeout`` still cuts one that stalls)."""
    readGrace: Duration = Field(default=10.0, gt=0)
    """Seconds a held-up answer may be read below ``readMinRate`` first (and the window it is
    measured over)."""
    bodyBufferBytes: int = Field(default=64 << 10, ge=0, le=16 << 20)
    """A request body up to this size is read whole before an app connection is taken (a
    larger one once this much of it has come): a slow upload never holds one of the app's
    connections while it trickles (as nginx buffers bodies).  0: stream at once."""
    maxUploadsPerIP: int = Field(default=32, ge=1)
    """Request bodies arriving at once from one client address at most; one more is refused
    with 429 ``too_many_uploads``."""
    newConnectionsPerIP: float = Field(default=200.0, ge=0)
    """New connections per second one client address may open (after a burst of
    ``newConnectionsBurst``); more are closed before TLS (``connection_rate``).  0: no limit."""
    newConnectionsBurst: int = Field(default=1000, ge=1)
    backchannelPerIP: float = Field(default=20.0, ge=0)
    """Back-channel logout requests per second from one address (after a burst of
    ``backchannelBurst``); more get 429 ``backchannel_rate`` before any token is checked.
    Generous by default: an IdP that ends many sessions at once may not retry.  0: no limit."""
    backchannelBurst: int = Field(default=200, ge=1)
    rateLimitLoopback: bool = False
    """Whether the two per-address rates also count clients on the host itself (127.0.0.0/8,
    ::1): off, a benchmark or a local proxy in front -- one address for many clients -- is not
    throttled."""
    stripHeaders: list[str] = Field(default_factory=list, max_length=256)
    """More client headers the app never gets, on top of the built-in rule (README, *Headers the
    app never gets from the client*): a name (``X-Tenant``) or a prefix (``X-Tenant-*``), each
    in every spelling (case, ``-``/``_``/``.``)."""

    @field_validator("stripHeaders")
    @classmethod
    def _header_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _STRIP_ENTRY.fullmatch(name):
                raise ValueError(f"{name!r}: a header name (X-Tenant) or a prefix ending in * (X-Tenant-*)")
        return names


class DaemonModel(_Strict):
    """``enforcer.yaml``."""

    include: str | list[str] = Field(default_factory=list)
    """Drop-in files merged over this one, in order (globs relative to its folder); read by
    :func:`read_settings`, kept here so the key is known and documented."""
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
    kubernetes: KubernetesModel | None = None
    """Set when the enforcer runs as a DaemonSet's pod: tags from its Node's labels, the
    uninstall check at a stop."""
    denyPage: DenyPageModel = Field(default_factory=DenyPageModel)
    flowLog: Path | None = None  # default: <logsDir>/flows.jsonl
    flowLogStdout: bool = False
    """Also write each flow record, the same JSON line as in ``flowLog``, to standard output (a
    container's log): in the file's flush, never blocking (a stalled reader loses the oldest
    lines beyond the buffer's cap, counted). The daemon's own log goes to standard error."""
    metrics: MetricsModel | None = None
    """The metrics-only listener (:class:`MetricsModel`); None: /metrics only on ``admin``."""
    allowNoServices: bool = False
    """Whether running with no service for this enforcer is intended: else ``enforcer check``
    fails (exit 2) and the daemon logs an error and keeps ``/readyz`` not ready."""


@dataclass(frozen=True)
class Settings:
    """The daemon config, resolved (paths absolute, defaults filled in)."""

    path: Path
    model: DaemonModel
    node_tags: tuple[str, ...] = ()
    """The tags from the Node's labels (``kubernetes.nodeLabelTags``), set by the daemon."""

    @property
    def tags(self) -> tuple[str, ...]:
        """The configured tags, then the Node's (each once)."""
        if not self.node_tags:
            return tuple(self.model.tags)
        return tuple(dict.fromkeys((*self.model.tags, *self.node_tags)))

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
    """Read and validate ``enforcer.yaml``; relative paths are relative to its folder (or raise
    ConfigError with every problem)."""
    settings, issues = read_settings(path)
    if issues or settings is None:
        raise ConfigError(issues)
    return settings


def read_settings(path: Path) -> tuple[Settings | None, list[ConfigIssue]]:
    """Every problem of ``enforcer.yaml`` at once, and settings usable to go on to the
    definitions: when only some keys are bad, those are left at their defaults (an unreadable
    ``definitions`` entry is left out), so ``enforcer check`` reports the definitions' problems
    in the same run. None when nothing usable remains."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return None, [ConfigIssue(source, "", f"cannot read: {exc.strerror}", fix="pass -c /path/to/enforcer.yaml")]
    docs = parse_documents(text, source)
    if isinstance(docs, ConfigIssue):
        return None, [docs]
    if len(docs) != 1 or not isinstance(docs[0].data, Mapping):
        return None, [ConfigIssue(source, "", "must be one YAML mapping", fix="see README: enforcer.yaml")]
    data = dict(docs[0].data)
    data, provenance, issues = _with_includes(data, path)
    settings, more = _validated(data, path, source)
    issues.extend(more)
    return settings, [_attributed(i, source, provenance) for i in issues]


MAX_INCLUDES = 64
"""Drop-in files one config may pull in (a glob that matches a whole folder by mistake)."""


def _with_includes(
    data: dict[str, object], path: Path
) -> tuple[dict[str, object], dict[str, str], list[ConfigIssue]]:
    """``data`` with the files its ``include:`` names merged over it in order, which file set
    each merged key path (dotted, e.g. ``sessions.redis``), and the problems of the drop-ins."""
    source = str(path)
    patterns = data.get("include")
    if patterns is None:
        return data, {}, []
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
        return data, {}, []  # the model reports the bad value, with the key path
    base = path.parent.resolve()
    issues: list[ConfigIssue] = []
    provenance: dict[str, str] = {}
    seen: set[Path] = {path.resolve()}
    files: list[Path] = []
    for i, pattern in enumerate(patterns):
        full = pattern if os.path.isabs(pattern) else str(base / pattern)
        if glob.has_magic(pattern):
            matched = sorted(Path(m) for m in glob.glob(full) if os.path.isfile(m))
        elif os.path.isfile(full):
            matched = [Path(full)]
        else:
            issues.append(ConfigIssue(source, f"include[{i}]", "no such file", pattern,
                                      "name an existing file, or a glob such as enforcer.*.yaml (it may match none)"))
            continue
        for m in matched:
            if m.resolve() not in seen:  # the config itself, or a file two globs match: once
                seen.add(m.resolve())
                files.append(m)
    if len(files) > MAX_INCLUDES:
        issues.append(ConfigIssue(source, "include", f"matches {len(files)} files, more than {MAX_INCLUDES}",
                                  [str(f) for f in files[:3]], "narrow the glob"))
        return data, provenance, issues
    merged = dict(data)
    for f in files:
        drop_in = str(f)
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            issues.append(ConfigIssue(drop_in, "", f"cannot read: {getattr(exc, 'strerror', None) or exc}",
                                      fix=f"fix its permissions, or take it out of include in {source}"))
            continue
        docs = parse_documents(text, drop_in)
        if isinstance(docs, ConfigIssue):
            issues.append(docs)
            continue
        if not docs:
            continue  # an empty drop-in changes nothing
        if len(docs) != 1 or not isinstance(docs[0].data, Mapping):
            issues.append(ConfigIssue(drop_in, "", "must be one YAML mapping (keys of enforcer.yaml)",
                                      fix="see README: Configure it"))
            continue
        extra = dict(docs[0].data)
        if "include" in extra:
            issues.append(ConfigIssue(drop_in, "include", "a drop-in cannot include more files", extra["include"],
                                      f"list every drop-in in include of {source}"))
            extra.pop("include")
        merged = _merge(merged, extra, drop_in, "", provenance)
    return merged, provenance, issues


def _merge(
    into: Mapping[str, object], extra: Mapping[str, object], source: str, prefix: str, provenance: dict[str, str]
) -> dict[str, object]:
    """``into`` with ``extra`` over it: mappings merged key by key, anything else replaced;
    each replaced key path recorded as coming from ``source``."""
    out = dict(into)
    for key, value in extra.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        old = out.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            out[key] = _merge(old, value, source, where, provenance)
        else:
            out[key] = value
            for known in [k for k in provenance if k.startswith(where + ".")]:
                del provenance[known]  # a replaced mapping: every key below comes from here now
            provenance[where] = source
    return out


_INDEX = re.compile(r"\[\d+\]")


def _attributed(issue: ConfigIssue, main: str, provenance: Mapping[str, str]) -> ConfigIssue:
    """``issue`` naming the drop-in that set the value at its key path, if one did."""
    if issue.source != main or not issue.path or not provenance:
        return issue
    keys = _INDEX.sub("", issue.path).split(".")
    for n in range(len(keys), 0, -1):
        found = provenance.get(".".join(keys[:n]))
        if found is not None:
            return ConfigIssue(found, issue.path, issue.message, issue.value, issue.fix)
    return issue


def _validated(data: dict[str, object], path: Path, source: str) -> tuple[Settings | None, list[ConfigIssue]]:
    """The merged config validated and resolved (see :func:`read_settings`)."""
    issues: list[ConfigIssue] = []
    try:
        model = DaemonModel.model_validate(data)
    except ValidationError as exc:
        issues.extend(_issues_from_validation(exc, source, "", data, DaemonModel, fixes=FIX_DAEMON))
        try:
            model = DaemonModel.model_validate(_without_bad_keys(data, exc))
        except ValidationError:
            return None, issues
    model = _absolute_paths(model, path.parent.resolve())
    if model.sessions.idleTimeout > model.sessions.absoluteTimeout:
        issues.append(
            ConfigIssue(
                source,
                "sessions.idleTimeout",
                "is longer than sessions.absoluteTimeout",
                model.sessions.idleTimeout,
                "make idleTimeout <= absoluteTimeout",
            )
        )
    if model.kubernetes is not None:
        kube, kube_issues = _kubernetes_identity(model.kubernetes, source)
        model = model.model_copy(update={"kubernetes": kube})
        issues.extend(kube_issues)
    settings = Settings(path=path, model=model)
    try:
        check_workers(settings, model.listen.workers, "listen.workers")
    except ConfigError as exc:
        issues.extend(exc.issues)
    return settings, issues


SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
"""Where a pod's service account namespace is (the default namespace of its DaemonSet)."""


def _kubernetes_identity(kube: KubernetesModel, source: str) -> tuple[KubernetesModel, list[ConfigIssue]]:
    """``kubernetes:`` with the node name and the DaemonSet's namespace taken from the pod's
    environment when not given (``NODE_NAME``; ``POD_NAMESPACE``, else the service account's
    namespace file), and what is missing for what is asked of it."""
    issues: list[ConfigIssue] = []
    node = kube.nodeName or os.environ.get("NODE_NAME", "").strip() or None
    if node is not None and not _K8S_LABEL_NAME.match(node):
        issues.append(ConfigIssue(source, "kubernetes.nodeName", "NODE_NAME is not a Node name", node,
                                  "set NODE_NAME from the downward API (fieldRef spec.nodeName)"))
        node = None
    if node is None and kube.pods.enabled and not kube.nodeLabelTags:
        issues.append(ConfigIssue(
            source, "kubernetes.nodeName", "no Node name: pod mode (pods.enabled) watches the pods of one Node", None,
            "set env NODE_NAME from the downward API (fieldRef spec.nodeName), or kubernetes.nodeName",
        ))
    if node is None and kube.nodeLabelTags:
        issues.append(ConfigIssue(
            source, "kubernetes.nodeName", "no Node name: tags from its labels need one", None,
            "set env NODE_NAME from the downward API (fieldRef spec.nodeName, as deploy/kubernetes does), "
            "or kubernetes.nodeName, or nodeLabelTags: false",
        ))
    namespace = kube.namespace or os.environ.get("POD_NAMESPACE", "").strip() or None
    if namespace is None:
        try:
            namespace = SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip() or None
        except OSError:
            namespace = None
    if namespace is not None and not _K8S_NAME.match(namespace):
        issues.append(ConfigIssue(source, "kubernetes.namespace", "POD_NAMESPACE is not a namespace name", namespace,
                                  "set POD_NAMESPACE from the downward API (fieldRef metadata.namespace)"))
        namespace = None
    if namespace is None and kube.daemonSet is not None:
        issues.append(ConfigIssue(
            source, "kubernetes.namespace", "no namespace for the DaemonSet", None,
            "set env POD_NAMESPACE from the downward API (fieldRef metadata.namespace), or kubernetes.namespace",
        ))
    return kube.model_copy(update={"nodeName": node, "namespace": namespace}), issues


def _without_bad_keys(data: dict[str, object], exc: ValidationError) -> dict[str, object]:
    """``data`` without the top-level keys pydantic refused (for ``definitions``: without the
    refused entries only), so the rest can still be used."""
    out = dict(data)
    bad_sources: set[int] = set()
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        if not loc:
            continue
        key = loc[0]
        if key == "definitions" and len(loc) > 1 and isinstance(loc[1], int) and isinstance(out.get(key), list):
            bad_sources.add(loc[1])
        else:
            out.pop(str(key), None)
    sources = out.get("definitions")
    if bad_sources and isinstance(sources, list):
        out["definitions"] = [s for i, s in enumerate(sources) if i not in bad_sources]
    return out


def _absolute_paths(model: DaemonModel, base: Path) -> DaemonModel:
    """``model`` with every relative path made relative to ``base`` (the config's folder)."""

    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else base / p

    def maybe(p: Path | None) -> Path | None:
        return None if p is None else absolute(p)

    return model.model_copy(
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
                        "kubernetes": s.kubernetes.model_copy(update={"kubeconfig": absolute(s.kubernetes.kubeconfig)})
                        if s.kubernetes is not None and s.kubernetes.kubeconfig is not None
                        else s.kubernetes,
                    }
                )
                for s in model.definitions
            ],
            "kubernetes": model.kubernetes.model_copy(update={"kubeconfig": maybe(model.kubernetes.kubeconfig)})
            if model.kubernetes is not None else None,
            "oidc": model.oidc.model_copy(
                update={"caFile": absolute(model.oidc.caFile) if model.oidc.caFile else None}
            ),
            "sessions": model.sessions.model_copy(update={
                "refreshTokenKeyFile": maybe(model.sessions.refreshTokenKeyFile),
                "redis": model.sessions.redis.model_copy(update={
                    "caFile": maybe(model.sessions.redis.caFile),
                    "passwordFile": maybe(model.sessions.redis.passwordFile),
                    "sentinelAuth": model.sessions.redis.sentinelAuth.model_copy(
                        update={"passwordFile": absolute(model.sessions.redis.sentinelAuth.passwordFile)}
                    ) if isinstance(model.sessions.redis.sentinelAuth, SentinelAuthModel)
                    else model.sessions.redis.sentinelAuth,
                }) if model.sessions.redis is not None else None,
            }),
        }
    )


def check_workers(settings: Settings, workers: int, where: str) -> None:
    """Several serving processes must share sessions and pending logins (SQLite or Redis: each
    worker then has its own Redis client, cache and revocation watcher, like one enforcer of a
    fleet), and a kubernetes source runs in one process only (raises ConfigError)."""
    issues = []
    if workers > 1 and settings.model.sessions.store == "memory":
        issues.append(
            ConfigIssue(
                str(settings.path),
                where,
                f"{workers} workers cannot share the in-memory session store (sessions.store: memory)",
                workers,
                "use sessions.store: sqlite (the default) or redis, or a single worker",
            )
        )
    if workers > 1 and any(s.kubernetes is not None for s in settings.model.definitions):
        issues.append(
            ConfigIssue(
                str(settings.path),
                where,
                f"{workers} workers with a kubernetes: definitions source: each worker would list and watch "
                "the API server on its own (N watches, about 33 MB each)",
                workers,
                "set listen.workers: 1 (auto is one per CPU) while definitions come from custom resources",
            )
        )
    if issues:
        raise ConfigError(issues)


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
