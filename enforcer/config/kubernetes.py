"""Definitions from Kubernetes custom resources: ``EnforcerService`` and ``HTTPResourceSpec``
(group ``enforcer.dev``, version ``v1alpha1``) and the Secrets they reference, watched through
the API server, each custom resource judged on its own and told the verdict in its status.

The only module that imports the Kubernetes client (``kubernetes_asyncio``; an import-linter
contract keeps it so), and only once a ``kubernetes:`` source is configured: the import costs
about 35 MB of RSS (its generated models), which a host without it never pays.

How a set of custom resources becomes definitions:

* Each custom resource is one :class:`CRDocument` (``kind: service`` / ``kind: httpresourcespec``,
  ``name`` = ``metadata.name``, ``namespace`` = ``metadata.namespace``, the ``spec`` fields), its ``source`` naming it
  (``EnforcerService default/private-app``) so every :class:`ConfigIssue` points at it.  An
  ``OIDCClientSecret: {secretKeyRef: {name, key}}`` is replaced by that key of the Secret in the
  custom resource's namespace.
* :func:`judge` validates the set with the same code as every other source, in the cluster's view
  (every service selected, so that every enforcer of a cluster reaches the same verdict and their
  status writes converge).  An invalid custom resource, new or changed, is left out and its last
  accepted version (if any; after a restart the one in the last-known-good file, whose
  documents name their custom resources) stays in force; the others apply.  Issues naming a
  changed custom resource blame it; issues naming only unchanged ones (a cross-object clash
  reported on the other object) are attributed by adding the changed ones one at a time to the
  accepted set.
* :class:`KubernetesSource` lists and watches (resourceVersion, bookmarks, re-list on 410 Gone,
  jittered exponential backoff on errors, at most one watch start per stream per second, so an
  API server restart causes no storm; Secrets per namespace holding custom resources, never
  cluster-wide, as the RBAC grants them) and pushes each accepted set to
  :meth:`DefinitionsManager.push`.  A change of ``status`` only (``metadata.generation``, or a
  Secret's data, unchanged) is not judged again.
* One enforcer of the cluster reports: the holder of the Lease ``enforcer-status`` in its own
  namespace (:class:`StatusLease`; every node still judges and enforces on its own).  It writes
  the ``Accepted`` condition to the ``status`` subresource only when it differs, and an Event
  when a custom resource is rejected.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import functools
import json
import logging
import os
import random
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import aiohttp
import yaml

from enforcer import __version__
from enforcer.config.definitions import RawDocument, resolve_definitions
from enforcer.config.issues import ConfigError, ConfigIssue
from enforcer.config.settings import SERVICE_ACCOUNT_NAMESPACE
from enforcer.config.sources import LKG_SOURCE_MARK, SourceError

if TYPE_CHECKING:
    from enforcer.metrics import Metrics

log = logging.getLogger("enforcer.definitions.kubernetes")

GROUP = "enforcer.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CONDITION = "Accepted"
SECRET_FIELD_SELECTOR = "type!=kubernetes.io/service-account-token,type!=helm.sh/release.v1"  # noqa: S105
"""Secrets that never hold a client secret are not listed (nor kept in memory)."""
MESSAGE_LIMIT = 2000


@dataclass(frozen=True)
class Kind:
    """One custom resource kind and the definitions kind it carries."""

    kind: str
    plural: str
    definition: str


KINDS = (
    Kind("EnforcerService", "enforcerservices", "service"),
    Kind("HTTPResourceSpec", "httpresourcespecs", "httpresourcespec"),
)
KIND_BY_NAME = {k.kind: k for k in KINDS}


class Verdicts:
    """The condition reasons (CamelCase, as Kubernetes conditions spell them)."""

    ACCEPTED = "Accepted"
    INVALID = "Invalid"
    SECRET_NOT_FOUND = "SecretNotFound"  # noqa: S105
    SECRET_FORBIDDEN = "SecretForbidden"  # noqa: S105


@dataclass(frozen=True, order=True)
class CRKey:
    """Which custom resource: kind, namespace, name."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class CRDocument(RawDocument):
    """A definitions document made from a custom resource; ``where`` is the custom resource."""

    @property
    def where(self) -> str:
        return self.source


@dataclass(frozen=True)
class Verdict:
    """Whether a custom resource is accepted, why not (reason) and the text for the operator."""

    accepted: bool
    reason: str
    message: str


ACCEPTED = Verdict(True, Verdicts.ACCEPTED, "accepted")


@dataclass(frozen=True)
class Rendered:
    """A custom resource as a definitions document, or the problem that kept it from being one."""

    key: CRKey
    order: tuple[str, str, str, str]
    """(creationTimestamp, namespace, name, kind): document order, so that a clash is reported
    on the custom resource that came later."""
    data: dict[str, object] | None
    problem: Verdict | None = None


SecretState = Mapping[str, str] | str
"""A Secret's ``data`` (key -> base64), or why it cannot be read: ``missing`` / ``forbidden``."""


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def cr_key(kind: str, obj: Mapping[str, Any]) -> CRKey:
    meta = _meta(obj)
    return CRKey(kind, str(meta.get("namespace", "")), str(meta.get("name", "")))


def render(kind: Kind, obj: Mapping[str, Any], secrets: Mapping[tuple[str, str], SecretState]) -> Rendered:
    """One custom resource → its definitions document (``kind``, ``name`` = metadata.name, the
    spec, the client secret taken from the referenced Secret)."""
    key = cr_key(kind.kind, obj)
    order = (str(_meta(obj).get("creationTimestamp", "")), key.namespace, key.name, key.kind)
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return Rendered(key, order, None, Verdict(False, Verdicts.INVALID, "spec: required, a mapping"))
    for reserved, origin in (("kind", "kind"), ("name", "metadata.name"), ("namespace", "metadata.namespace")):
        if reserved in spec:
            message = f"spec.{reserved}: not allowed here; fix: remove it, the custom resource's {origin} says it"
            return Rendered(key, order, None, Verdict(False, Verdicts.INVALID, message))
    # the namespace travels with the definition: a service selects only pods of its own namespace
    data: dict[str, object] = {"kind": kind.definition, "name": key.name, "namespace": key.namespace, **spec}
    if kind.definition == "service" and "OIDCClientSecret" in spec:
        value = _secret_value(key, spec["OIDCClientSecret"], secrets)
        if isinstance(value, Verdict):
            return Rendered(key, order, None, value)
        data["OIDCClientSecret"] = value
    return Rendered(key, order, data)


def secret_ref(spec: object) -> tuple[str, str] | None:
    """``(name, key)`` of a well-formed ``OIDCClientSecret.secretKeyRef``, else None."""
    if not isinstance(spec, Mapping) or set(spec) != {"secretKeyRef"}:
        return None
    ref = spec["secretKeyRef"]
    if not isinstance(ref, Mapping) or set(ref) != {"name", "key"}:
        return None
    name, key = ref["name"], ref["key"]
    if not (isinstance(name, str) and isinstance(key, str) and name and key):
        return None
    return name, key


def _secret_value(key: CRKey, spec: object, secrets: Mapping[tuple[str, str], SecretState]) -> str | Verdict:
    ref = secret_ref(spec)
    if ref is None:
        return Verdict(
            False, Verdicts.INVALID,
            "spec.OIDCClientSecret: must be {secretKeyRef: {name: <Secret in this namespace>, key: <key>}} "
            "(no inline secrets in a custom resource); fix: kubectl create secret generic <name> "
            f"-n {key.namespace} --from-literal=<key>=<client secret>, then reference it",
        )
    name, item = ref
    state = secrets.get((key.namespace, name), "missing")
    where = f"spec.OIDCClientSecret.secretKeyRef: Secret {key.namespace}/{name}"
    if state == "forbidden":
        return Verdict(
            False, Verdicts.SECRET_FORBIDDEN,
            f"{where}: the enforcer may not read Secrets in namespace {key.namespace}; "
            "fix: grant its ServiceAccount get/list/watch on secrets there (deploy/kubernetes RBAC)",
        )
    if isinstance(state, str):
        return Verdict(
            False, Verdicts.SECRET_NOT_FOUND,
            f"{where} does not exist; fix: kubectl create secret generic {name} -n {key.namespace} "
            f"--from-literal={item}=<client secret>",
        )
    encoded = state.get(item)
    if encoded is None:
        return Verdict(
            False, Verdicts.SECRET_NOT_FOUND,
            f"{where} has no key {item!r} (it has: {', '.join(sorted(state)) or 'none'}); "
            "fix: name one of its keys in secretKeyRef.key, or add the key to the Secret",
        )
    try:
        value = base64.b64decode(encoded, validate=True).decode("utf-8").strip()
    except (binascii.Error, UnicodeDecodeError):
        value = ""
    if not value:
        return Verdict(False, Verdicts.SECRET_NOT_FOUND, f"{where} key {item!r} is empty or not UTF-8 text")
    return value


def cluster_tags(docs: Iterable[RawDocument]) -> list[str]:
    """Every tag any service's selectors name: with them every service is selected, so the
    verdict is the cluster's, the same on every enforcer (whatever its own tags)."""
    tags: set[str] = set()
    for d in docs:
        if isinstance(d.data, Mapping):
            sel = d.data.get("selectors")
            if isinstance(sel, list):
                tags.update(t for clause in sel if isinstance(clause, list) for t in clause if isinstance(t, str))
    return sorted(tags)


Validate = Callable[[Sequence[RawDocument]], list[ConfigIssue]]


def validator(*, allow_http_loopback_idp: bool = False) -> Validate:
    """The problems of a set in the cluster's view (the same checks as ``enforcer check``)."""

    def validate(docs: Sequence[RawDocument]) -> list[ConfigIssue]:
        try:
            resolve_definitions(docs, cluster_tags(docs), allow_http_loopback_idp=allow_http_loopback_idp)
        except ConfigError as exc:
            return list(exc.issues)
        return []

    return validate


def spec_path(issue: ConfigIssue) -> str:
    """A ConfigIssue's key path as the custom resource spells it: ``service[x].hosts`` → ``spec.hosts``."""
    path = issue.path
    for prefix in ("service[", "httpresourcespec["):
        if path.startswith(prefix) and "]" in path:
            rest = path[path.index("]") + 1 :].lstrip(".")
            if rest == "name":
                return "metadata.name"
            return f"spec.{rest}" if rest else "spec"
    return path or "spec"


def issue_text(issues: Sequence[ConfigIssue]) -> str:
    """The condition message: each issue's key path, problem, bad value and fix."""
    parts = []
    for i in issues:
        text = f"{spec_path(i)}: {i.message}"
        if i.value is not None:
            shown = repr(i.value)
            text += f" (got {shown[:77] + '...' if len(shown) > 80 else shown})"
        if i.fix:
            text += f"; fix: {i.fix}"
        parts.append(text)
    message = "; ".join(parts)
    return message if len(message) <= MESSAGE_LIMIT else message[: MESSAGE_LIMIT - 3] + "..."


def _doc(key: CRKey, data: Mapping[str, object]) -> CRDocument:
    return CRDocument(str(key), 0, dict(data))


def judge(
    current: Sequence[Rendered], accepted: Mapping[CRKey, Mapping[str, object]], validate: Validate
) -> tuple[list[CRDocument], dict[CRKey, Verdict]]:
    """The documents in force and a verdict for every current custom resource.

    A custom resource whose current version is valid with the rest is in force as it is; an
    invalid one is left out (its ``accepted`` version, if any, stays).  Issues that name a
    changed custom resource blame it; when they name none (a clash reported on an unchanged
    one, or a problem elsewhere) the changed ones are added to the accepted set one at a time
    and each is blamed for the issues its addition brings."""
    ordered = sorted(current, key=lambda r: r.order)
    verdicts: dict[CRKey, Verdict] = {}
    force: dict[CRKey, Mapping[str, object]] = {}
    candidates: dict[CRKey, Mapping[str, object]] = {}
    for r in ordered:
        if r.data is None:
            assert r.problem is not None
            verdicts[r.key] = r.problem
            if r.key in accepted:
                force[r.key] = accepted[r.key]
        else:
            force[r.key] = r.data
            if r.data != accepted.get(r.key):
                candidates[r.key] = r.data
    keys = [r.key for r in ordered]

    def docs_of(chosen: Mapping[CRKey, Mapping[str, object]]) -> list[CRDocument]:
        return [_doc(k, chosen[k]) for k in keys if k in chosen]

    def reject(k: CRKey, issues: Sequence[ConfigIssue]) -> None:
        verdicts[k] = Verdict(False, Verdicts.INVALID, issue_text(issues))
        candidates.pop(k)
        if k in accepted:
            force[k] = accepted[k]
        else:
            force.pop(k)

    while True:
        issues = validate(docs_of(force))
        if not issues:
            break
        culprits: dict[CRKey, list[ConfigIssue]] = {}
        by_source = {str(k): k for k in candidates}
        for i in issues:
            if i.source in by_source:
                culprits.setdefault(by_source[i.source], []).append(i)
        if culprits:
            for k, found in culprits.items():
                reject(k, found)
            continue
        base = {k: v for k, v in force.items() if k not in candidates}
        if validate(docs_of(base)):
            log.error("the accepted custom resources are invalid together with the other sources; not judging")
            break
        for k in [k for k in keys if k in candidates]:
            trial = {**base, k: candidates[k]}
            found = validate(docs_of(trial))
            if found:
                reject(k, found)
            else:
                base = trial
        break
    for k in candidates:
        verdicts[k] = ACCEPTED
    for r in ordered:
        verdicts.setdefault(r.key, ACCEPTED)
    return docs_of(force), verdicts


_LKG_DOCUMENT = re.compile(rf"^{re.escape(LKG_SOURCE_MARK)}(.*)$", re.MULTILINE)
_CR_SOURCE = re.compile(rf"^({'|'.join(KIND_BY_NAME)}) ([^/\s]+)/(\S+)$")


def accepted_from_lkg(path: Path) -> dict[CRKey, dict[str, object]]:
    """The custom resources' versions in a last-known-good file (each document names its source
    in a comment; documents of other sources, or of an older file without the names, are not
    custom resources' and are skipped): at start-up they are the last accepted versions, so a
    custom resource that is invalid by then keeps its version in force."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    parts = _LKG_DOCUMENT.split(text)
    out: dict[CRKey, dict[str, object]] = {}
    for source, body in zip(parts[1::2], parts[2::2], strict=True):
        found = _CR_SOURCE.match(source.strip())
        if found is None:
            continue
        key = CRKey(found[1], found[2], found[3])
        try:
            data = yaml.safe_load(body)
        except yaml.YAMLError:
            log.warning("%s: the saved version of %s is not YAML; not restored", path, key)
            continue
        if isinstance(data, dict) and data.get("kind") == KIND_BY_NAME[key.kind].definition and data.get(
            "name"
        ) == key.name:
            out[key] = data
    return out


def condition_for(verdict: Verdict, generation: int) -> dict[str, object]:
    """The ``Accepted`` condition of a verdict (without lastTransitionTime)."""
    return {
        "type": CONDITION,
        "status": "True" if verdict.accepted else "False",
        "reason": verdict.reason,
        "message": verdict.message,
        "observedGeneration": generation,
    }


def status_patch(obj: Mapping[str, Any], verdict: Verdict, now: str) -> dict[str, object] | None:
    """The merge patch of ``status`` that states ``verdict``, or None when it is already there
    (lastTransitionTime aside), so that several enforcers converge rather than fight."""
    generation = int(_meta(obj).get("generation", 0) or 0)
    wanted = condition_for(verdict, generation)
    status = obj.get("status")
    conditions = status.get("conditions") if isinstance(status, Mapping) else None
    old = next(
        (c for c in conditions or [] if isinstance(c, Mapping) and c.get("type") == CONDITION), None
    )
    if old is not None and all(old.get(k) == v for k, v in wanted.items()):
        return None
    since = old.get("lastTransitionTime") if old is not None and old.get("status") == wanted["status"] else None
    others = [c for c in conditions or [] if isinstance(c, Mapping) and c.get("type") != CONDITION]
    return {"status": {"conditions": [*others, {**wanted, "lastTransitionTime": since or now}]}}


def event_body(key: CRKey, obj: Mapping[str, Any], verdict: Verdict, now: str, host: str) -> dict[str, object]:
    """A core v1 Event on the custom resource saying why it was rejected."""
    meta = _meta(obj)
    return {
        "metadata": {"generateName": f"{key.name}.", "namespace": key.namespace},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": key.kind,
            "name": key.name,
            "namespace": key.namespace,
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "reason": verdict.reason,
        "message": verdict.message,
        "type": "Warning",
        "source": {"component": "enforcer", "host": host},
        "reportingComponent": "enforcer",
        "reportingInstance": host,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# list + watch


class KubernetesError(SourceError):
    """The API server could not be reached or refused a request."""

    def __init__(self, message: str, status: int = 0, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        """The answer's body (up to 4 KiB): a ``Status`` object when the API server refused."""


class Gone(KubernetesError):
    """410 Gone: the resourceVersion is too old; list again."""


@dataclass
class Backoff:
    """Jittered exponential backoff: ``base`` · 2^failures, at most ``cap``, times 0.5-1.0."""

    base: float = 0.5
    cap: float = 30.0
    failures: int = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2.0 ** self.failures)
        self.failures = min(self.failures + 1, 16)
        return delay * random.uniform(0.5, 1.0)  # noqa: S311

    def reset(self) -> None:
        self.failures = 0


GONE_AFTER_QUIET = 10.0
"""A watch that lasted longer than this without an event is a healthy quiet one (backoff reset)."""


async def keep_watching(
    min_gap: float,
    once: Callable[[], Awaitable[int]],
    *,
    gone: Callable[[Gone], None],
    failed: Callable[[KubernetesError, float], None],
) -> NoReturn:
    """The loop every list+watch here runs: ``once`` (a list when one is due, then one watch
    until the server ends it; returns how many events it saw) again and again, never starting
    more than one per ``min_gap`` (jittered 1-1.5x: many enforcers restarting with an API server
    do not start their watches in step). A watch the server ends at once without news backs
    off (a sick server); 410 Gone calls ``gone`` (which asks for a fresh list) and goes on at
    once; another API error calls ``failed`` with the backoff delay, then waits it. Any other
    exception ends the loop."""
    backoff = Backoff()
    last_start = -min_gap
    while True:
        wait = last_start + min_gap * random.uniform(1.0, 1.5) - time.monotonic()  # noqa: S311
        if wait > 0:
            await asyncio.sleep(wait)
        last_start = time.monotonic()
        try:
            seen = await once()
            if seen or time.monotonic() - last_start > GONE_AFTER_QUIET:
                backoff.reset()
            else:
                await asyncio.sleep(backoff.next())
        except Gone as exc:
            gone(exc)
        except KubernetesError as exc:
            delay = backoff.next()
            failed(exc, delay)
            await asyncio.sleep(delay)


def raise_watch_error(what: str, obj: Mapping[str, Any]) -> NoReturn:
    """A watch's ``ERROR`` event as an exception: :class:`Gone` for 410, else KubernetesError."""
    code = int(obj.get("code", 0) or 0)
    if code == 410:
        raise Gone(f"{what}: {obj.get('message', 'Gone')}", 410)
    raise KubernetesError(f"{what}: watch error {code}: {obj.get('message', '')}", code)


async def with_api(
    kubeconfig: Path | None,
    run: Callable[[_Api], Awaitable[NoReturn]],
    unreachable: Callable[[KubernetesError], None] | None = None,
) -> NoReturn:
    """Connect (retrying with backoff, ``unreachable`` told of each failure) and ``run`` with
    the client, closing it when ``run`` ends by an exception."""
    backoff = Backoff()
    while True:
        try:
            api = await connect(kubeconfig)
        except KubernetesError as exc:
            if unreachable is not None:
                unreachable(exc)
            log.error("%s", exc)
            await asyncio.sleep(backoff.next() * 10)
            continue
        try:
            await run(api)
        finally:
            await api.close()


@dataclass
class WatchStats:
    """What the source did (for tests, logs and metrics)."""

    lists: int = 0
    watches: int = 0
    errors: int = 0
    gone: int = 0
    events: int = 0
    pushes: int = 0
    judgements: int = 0
    """How often the custom resources were judged (a status-only change is not judged again)."""
    status_writes: int = 0
    events_created: int = 0


@dataclass
class Stream:
    """One list+watch: a custom resource kind or the Secrets, in one namespace or all."""

    resource: str  # a Kind's name or "Secret"
    namespace: str | None  # None: all namespaces
    resource_version: str | None = None
    synced: bool = False
    forbidden: bool = False
    relist: bool = False
    items: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    current_at: float = 0.0
    """Unix time of its last list, watch event or bookmark, or normal end of a watch."""

    def __str__(self) -> str:
        return f"{self.resource} in {self.namespace or 'all namespaces'}"


class _Api:
    """The calls the source makes, through kubernetes_asyncio (imported here, lazily)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes_asyncio import client  # noqa: PLC0415 (lazy: 35 MB only when configured)

        self.client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.api_exception: type[Exception] = client.ApiException

    def _call(self, stream: Stream, **kwargs: Any) -> Awaitable[Any]:
        kwargs["_preload_content"] = False
        if stream.resource == "Secret":
            kwargs["field_selector"] = SECRET_FIELD_SELECTOR
            if stream.namespace is None:
                return self.core.list_secret_for_all_namespaces(**kwargs)  # type: ignore[no-any-return]
            return self.core.list_namespaced_secret(stream.namespace, **kwargs)  # type: ignore[no-any-return]
        plural = KIND_BY_NAME[stream.resource].plural
        if stream.namespace is None:
            return self.custom.list_cluster_custom_object(GROUP, VERSION, plural, **kwargs)  # type: ignore[no-any-return]
        return self.custom.list_namespaced_custom_object(  # type: ignore[no-any-return]
            GROUP, VERSION, stream.namespace, plural, **kwargs
        )

    async def _open(self, stream: Stream | str, limit: Any, call: Callable[..., Awaitable[Any]] | None = None,
                    **kwargs: Any) -> Any:
        """The raw response of one request (``call``, else the stream's list/watch); raises
        :class:`Gone` on 410 and :class:`KubernetesError` (with the status) on any other failure."""
        try:
            if call is None:
                assert isinstance(stream, Stream)
                resp = await self._call(stream, _request_timeout=limit, **kwargs)
            else:
                resp = await call(_request_timeout=limit, _preload_content=False, **kwargs)
        except self.api_exception as exc:
            body = str(getattr(exc, "body", "") or "")[:4096]
            raise KubernetesError(f"{stream}: {exc}", getattr(exc, "status", 0) or 0, body) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise KubernetesError(f"{stream}: {type(exc).__name__}: {str(exc)[:200]}") from None
        if resp.status == 410:
            resp.release()
            raise Gone(f"{stream}: 410 Gone", 410)
        if resp.status >= 300:
            try:
                body = (await resp.content.read(4096)).decode("utf-8", "replace")
            except (aiohttp.ClientError, OSError, TimeoutError):
                body = ""
            finally:
                resp.release()
            raise KubernetesError(f"{stream}: HTTP {resp.status}: {body[:300]}", resp.status, body)
        return resp

    async def _events(
        self, what: Stream | str, rv: str, seconds: int, limit: float,
        call: Callable[..., Awaitable[Any]] | None = None, **kwargs: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """One watch (``call``, else the stream's) from ``rv``: its events, one JSON object a
        line, until the server ends it after ``seconds`` (a silent connection ends 30 s later)."""
        resp = await self._open(
            what, aiohttp.ClientTimeout(connect=limit, sock_connect=limit, sock_read=seconds + 30), call,
            watch=True, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=seconds, **kwargs,
        )
        try:
            async for line in resp.content:
                if line.strip():
                    yield json.loads(line)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise KubernetesError(f"{what}: watch: {type(exc).__name__}: {str(exc)[:200]}") from None
        finally:
            resp.close()  # a watch cut short leaves its connection in no state to be reused

    async def _json(self, what: str, resp: Any) -> dict[str, Any]:
        try:
            body = json.loads(await resp.read())
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise KubernetesError(f"{what}: {type(exc).__name__}: {str(exc)[:200]}") from None
        finally:
            resp.release()
        if not isinstance(body, dict):
            raise KubernetesError(f"{what}: not a JSON object")
        return body

    async def list_node(self, name: str, limit: float) -> tuple[dict[str, Any] | None, str]:
        """The Node named ``name`` (None if there is none) and the list's resourceVersion."""
        what = f"Node {name}"
        resp = await self._open(what, limit, self.core.list_node, field_selector=f"metadata.name={name}")
        body = await self._json(what, resp)
        items = [i for i in body.get("items") or [] if _meta(i).get("name") == name]
        return (items[0] if items else None), str((body.get("metadata") or {}).get("resourceVersion", ""))

    def watch_node(self, name: str, rv: str, seconds: int, limit: float) -> AsyncIterator[dict[str, Any]]:
        """The watch events of the Node named ``name`` from ``rv``, until the server ends the watch."""
        return self._events(f"Node {name}", rv, seconds, limit, self.core.list_node,
                            field_selector=f"metadata.name={name}")

    async def list_pods(self, field_selector: str, limit: float) -> tuple[list[dict[str, Any]], str]:
        """The pods of every namespace matching ``field_selector`` and the list's resourceVersion."""
        what = f"pods ({field_selector})"
        resp = await self._open(what, limit, self.core.list_pod_for_all_namespaces, field_selector=field_selector)
        body = await self._json(what, resp)
        return list(body.get("items") or []), str((body.get("metadata") or {}).get("resourceVersion", ""))

    async def find_pod(self, namespace: str, name: str, limit: float) -> dict[str, Any] | None:
        """The pod ``namespace/name`` (None if there is none), by a list in its namespace: the
        ``list`` the enforcer's ClusterRole grants for pods, no ``get`` needed."""
        what = f"pod {namespace}/{name}"
        resp = await self._open(what, limit, functools.partial(self.core.list_namespaced_pod, namespace),
                                field_selector=f"metadata.name={name}")
        body = await self._json(what, resp)
        items = [i for i in body.get("items") or [] if _meta(i).get("name") == name]
        return items[0] if items else None

    def watch_pods(self, field_selector: str, rv: str, seconds: int, limit: float) -> AsyncIterator[dict[str, Any]]:
        """The watch events of the pods matching ``field_selector`` from ``rv``."""
        return self._events(f"pods ({field_selector})", rv, seconds, limit, self.core.list_pod_for_all_namespaces,
                            field_selector=field_selector)

    async def read_daemon_set(self, namespace: str, name: str, limit: float) -> dict[str, Any]:
        """The DaemonSet ``namespace/name`` (raises KubernetesError with the status: 404, 403, ...)."""
        from kubernetes_asyncio import client  # noqa: PLC0415 (loaded with _Api already)

        what = f"DaemonSet {namespace}/{name}"
        apps = client.AppsV1Api(self.client)
        resp = await self._open(what, limit, functools.partial(apps.read_namespaced_daemon_set, name, namespace))
        return await self._json(what, resp)

    async def list(self, stream: Stream, limit: float) -> tuple[list[dict[str, Any]], str]:
        resp = await self._open(stream, limit)
        body = await self._json(f"{stream}: list", resp)
        items = body.get("items") or []
        return items, str((body.get("metadata") or {}).get("resourceVersion", ""))

    def watch(self, stream: Stream, rv: str, seconds: int, limit: float) -> AsyncIterator[dict[str, Any]]:
        """The watch events of ``stream`` from ``rv``."""
        return self._events(stream, rv, seconds, limit)

    async def patch_status(self, key: CRKey, body: Mapping[str, object]) -> None:
        await self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, key.namespace, KIND_BY_NAME[key.kind].plural, key.name, body,
            _content_type="application/merge-patch+json",
        )

    async def create_event(self, namespace: str, body: Mapping[str, object]) -> None:
        await self.core.create_namespaced_event(namespace, body)

    def _leases(self) -> Any:
        from kubernetes_asyncio import client  # noqa: PLC0415 (loaded with _Api already)

        return client.CoordinationV1Api(self.client)

    async def read_lease(self, namespace: str, name: str, limit: float) -> dict[str, Any] | None:
        """The Lease ``namespace/name``, or None when there is none (404)."""
        what = f"Lease {namespace}/{name}"
        try:
            read = functools.partial(self._leases().read_namespaced_lease, name, namespace)
            resp = await self._open(what, limit, read)
        except KubernetesError as exc:
            if exc.status == 404:
                return None
            raise
        return await self._json(what, resp)

    async def write_lease(self, namespace: str, body: Mapping[str, Any], limit: float) -> dict[str, Any]:
        """Create the Lease (``body`` without a resourceVersion) or replace it (with the one read:
        409 Conflict when another enforcer wrote it meanwhile); the Lease as written."""
        name = str(body["metadata"]["name"])
        leases = self._leases()
        if body["metadata"].get("resourceVersion"):
            call = functools.partial(leases.replace_namespaced_lease, name, namespace, body)
        else:
            call = functools.partial(leases.create_namespaced_lease, namespace, body)
        what = f"Lease {namespace}/{name}"
        return await self._json(what, await self._open(what, limit, call))

    async def close(self) -> None:
        await self.client.close()


async def connect(kubeconfig: Path | None) -> _Api:
    """An API client from a kubeconfig file, or the pod's service account (raises KubernetesError)."""
    from kubernetes_asyncio import client, config  # noqa: PLC0415

    configuration = client.Configuration()
    try:
        if kubeconfig is not None:
            await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        else:
            config.load_incluster_config(client_configuration=configuration)
    except (config.ConfigException, OSError, ValueError) as exc:
        where = kubeconfig or "the in-cluster service account"
        raise KubernetesError(f"cannot load the Kubernetes credentials from {where}: {exc}") from None
    return _Api(client.ApiClient(configuration))


# ---------------------------------------------------------------------------------------------
# one reporter per cluster: the holder of a Lease writes status and Events

LEASE_NAME = "enforcer-status"
VERSION_ANNOTATION = "enforcer.dev/version"
"""On the Lease: the holder's enforcer version (a newer version takes the Lease over at once)."""


def release_of(version: str) -> tuple[int, int, int] | None:
    """``major.minor.patch`` of a version string (``0.2.0``, ``1.4.2rc1``), None if it has none."""
    found = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", version.strip())
    return (int(found[1]), int(found[2]), int(found[3])) if found else None


def newer(mine: str, theirs: str) -> bool:
    """Whether ``mine`` is a strictly newer release than ``theirs`` (unknown versions never are)."""
    a, b = release_of(mine), release_of(theirs)
    return a is not None and b is not None and a > b


def _micro_now() -> str:
    """A Lease's MicroTime: RFC 3339 with microseconds."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class StatusLease:
    """Which of a cluster's enforcers writes the custom resources' status and Events: the holder
    of the ``coordination.k8s.io/v1`` Lease ``namespace/name`` (as client-go's leader election
    does). The holder renews it every third of ``duration``; another enforcer takes it over
    when the holder has not renewed it for ``duration`` by its own clock (no clock skew counts),
    when the holder released it at a stop, or at once when the holder runs an older enforcer
    version (the ``enforcer.dev/version`` annotation), so that during a rolling upgrade the new
    version's verdicts show.  The holder stops reporting when it could not renew within two
    thirds of ``duration``, before anyone may take over.  Judging and enforcing never depend on
    it: only reporting does."""

    namespace: str
    identity: str
    name: str = LEASE_NAME
    duration: float = 15.0
    version: str = field(default_factory=lambda: __version__)
    timeout: float = 5.0
    holder: str = ""
    """The holder as last read ("" when free or unknown)."""
    held_until: float = 0.0
    """time.monotonic() until which this enforcer holds it for sure."""
    acquired: int = 0
    """How often this enforcer took it (for tests and logs)."""
    _observed: tuple[str, str] | None = None
    _observed_at: float = 0.0

    @property
    def held(self) -> bool:
        return self.holder == self.identity and time.monotonic() < self.held_until

    def _body(self, old: Mapping[str, Any] | None, now: str) -> dict[str, Any]:
        spec = (old or {}).get("spec") or {}
        ours = spec.get("holderIdentity") == self.identity
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace,
                                "annotations": {VERSION_ANNOTATION: self.version}}
        if old is not None:
            meta["resourceVersion"] = _meta(old).get("resourceVersion")
        transitions = int(spec.get("leaseTransitions") or 0)
        return {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.duration)),
                "acquireTime": spec.get("acquireTime") if ours and spec.get("acquireTime") else now,
                "renewTime": now,
                "leaseTransitions": transitions if ours or old is None else transitions + 1,
            },
        }

    async def attempt(self, api: _Api) -> None:
        """Read the Lease once; renew it if ours, take it if free, expired or held by an older
        version (raises KubernetesError: the caller retries)."""
        started = time.monotonic()
        obj = await api.read_lease(self.namespace, self.name, self.timeout)
        if obj is not None:
            spec = obj.get("spec") or {}
            holder = str(spec.get("holderIdentity") or "")
            record = (holder, str(_meta(obj).get("resourceVersion", "")))
            if record != self._observed:
                self._observed, self._observed_at = record, started
            self.holder = holder
            duration = float(spec.get("leaseDurationSeconds") or self.duration)
            theirs = str((_meta(obj).get("annotations") or {}).get(VERSION_ANNOTATION, ""))
            why = ("ours" if holder == self.identity else "free" if not holder
                   else "expired" if started - self._observed_at > duration
                   else f"held by an older version ({theirs})" if newer(self.version, theirs) else None)
            if why is None:
                return
        else:
            why = "none yet"
        try:
            written = await api.write_lease(self.namespace, self._body(obj, _micro_now()), self.timeout)
        except KubernetesError as exc:
            if exc.status == 409:  # another enforcer wrote it first: it holds it
                self.holder = ""
                return
            raise
        if self.holder != self.identity or not self.held:
            self.acquired += 1
            log.warning("Lease %s/%s taken (%s): this enforcer (%s) writes the custom resources' status and "
                        "Events", self.namespace, self.name, why, self.identity)
        self.holder = self.identity
        self._observed, self._observed_at = (self.identity, str(_meta(written).get("resourceVersion", ""))), started
        self.held_until = started + self.duration * 2 / 3

    async def run(self, api: _Api, gained: Callable[[], None]) -> NoReturn:
        """Hold or wait for the Lease forever; ``gained`` is called each time it is taken."""
        while True:
            was = self.held
            try:
                await self.attempt(api)
            except KubernetesError as exc:
                log.warning("Lease %s/%s: %s", self.namespace, self.name, exc)
            if self.held and not was:
                gained()
            elif was and not self.held:
                log.warning("Lease %s/%s lost to %s: this enforcer stops reporting", self.namespace, self.name,
                            self.holder or "nobody yet")
            await asyncio.sleep(self.duration / 3 * random.uniform(0.8, 1.0))  # noqa: S311

    async def release(self, api: _Api) -> None:
        """At a stop: free the Lease if held, so another enforcer takes it over at once (never raises)."""
        if not self.held:
            return
        self.held_until = 0.0
        try:
            async with asyncio.timeout(2):
                obj = await api.read_lease(self.namespace, self.name, 2)
                if obj is None or (obj.get("spec") or {}).get("holderIdentity") != self.identity:
                    return
                body = self._body(obj, _micro_now())
                body["spec"].update(holderIdentity="", leaseDurationSeconds=1)
                await api.write_lease(self.namespace, body, 2)
        except Exception as exc:  # a stop must not fail on it: the Lease expires anyway
            log.warning("Lease %s/%s not released (%s: %s); it expires", self.namespace, self.name,
                        type(exc).__name__, exc)


def default_identity() -> str:
    """Who this enforcer is in the Lease: its pod (``POD_NAME``), else its node, else the host name."""
    for name in ("POD_NAME", "NODE_NAME"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return socket.gethostname()


def default_lease_namespace() -> str | None:
    """Where the Lease is: the enforcer's namespace (``POD_NAMESPACE``, else its service
    account's), None outside a pod."""
    namespace = os.environ.get("POD_NAMESPACE", "").strip()
    if namespace:
        return namespace
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


Push = Callable[[Sequence[RawDocument]], Awaitable[str]]


def source_name(namespaces: Sequence[str]) -> str:
    """How logs, metrics and ``enforcer check`` name a ``kubernetes:`` source."""
    return f"kubernetes ({','.join(namespaces) if namespaces else 'all namespaces'})"


@dataclass
class KubernetesSource:
    """Custom resources and their Secrets from the API server (see the module docstring)."""

    namespaces: tuple[str, ...] = ()
    kubeconfig: Path | None = None
    interval: float = 30.0
    timeout: float = 10.0
    allow_http_loopback_idp: bool = False
    name: str = ""
    last_known_good: Path | None = None
    """The manager's last-known-good file: the custom resources' versions in it are the last
    accepted ones when this process starts (read once, at the first judging)."""
    watch_seconds: tuple[int, int] = (240, 300)
    """The server ends each watch after a random time in this range (spreads reconnects)."""
    min_gap: float = 1.0
    """Seconds between two watch starts of one stream at least (no storm)."""
    settle: float = 0.2
    """Seconds events are gathered before the set is judged and pushed."""
    stats: WatchStats = field(default_factory=WatchStats)
    metrics: Metrics | None = None
    """Where the stats are also counted (``enforcer_kubernetes_*``), if anywhere."""
    lease_namespace: str | None = field(default_factory=default_lease_namespace)
    """Where the reporters' Lease is (the enforcer's own namespace); None (outside a pod, not
    given): no election, a reporting source always reports."""
    identity: str = field(default_factory=default_identity)
    lease_duration: float = 15.0
    lease: StatusLease | None = None
    """Made from the three above: the election of the one reporter of the cluster."""
    streams: list[Stream] = field(default_factory=list)
    _verdicts: dict[CRKey, tuple[Verdict, int]] = field(default_factory=dict)
    """The last judgement: each custom resource's verdict and the generation it judged."""
    _rejudge: bool = True
    _asked_to_report: bool = False
    _accepted: dict[CRKey, Mapping[str, object]] = field(default_factory=dict)
    _pending: dict[CRKey, Mapping[str, object]] = field(default_factory=dict)
    _watching: bool = False
    _restored: bool = False
    _last_error: str = ""
    _dirty: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.name = self.name or source_name(self.namespaces)
        if self.lease is None and self.lease_namespace:
            self.lease = StatusLease(self.lease_namespace, self.identity, duration=self.lease_duration,
                                     timeout=self.timeout)
        if self.namespaces:
            self.streams = [Stream(r, ns) for ns in self.namespaces for r in (*(k.kind for k in KINDS), "Secret")]
        else:
            # custom resources of every namespace; Secrets only of the namespaces that hold custom
            # resources, one stream each (_sync_secret_streams): the RBAC grants Secrets per
            # namespace with a Role, never cluster-wide
            self.streams = [Stream(k.kind, None) for k in KINDS]

    def _sync_secret_streams(self) -> tuple[list[Stream], list[Stream]]:
        """Watching every namespace: one Secret stream per namespace holding a custom resource
        (added, dropped); with a namespace list the streams are fixed."""
        if self.namespaces:
            return [], []
        wanted = {ns for s in self.streams if s.resource != "Secret" for (ns, _name) in s.items}
        have = {s.namespace: s for s in self.streams if s.resource == "Secret"}
        added = [Stream("Secret", ns) for ns in sorted(wanted - set(have))]
        dropped = [have[ns] for ns in sorted(set(have) - wanted, key=str)]
        if added or dropped:
            self.streams = [s for s in self.streams if all(s is not d for d in dropped)] + added
        return added, dropped

    # -- the Source interface ----------------------------------------------------------------

    def reset(self) -> None:
        """Forget the resourceVersions: the next poll (or the watch) lists everything again."""
        for s in self.streams:
            s.relist = True
            if not self._watching:
                s.resource_version, s.synced = None, False

    async def poll(self) -> list[RawDocument] | None:
        """The documents in force after one list (start-up, ``enforcer check``); while the watch
        runs, None (it pushes), or SourceError-like failure until it has listed once."""
        if self._watching:
            if all(s.synced for s in self.streams):
                return None
            raise KubernetesError(f"{self.name}: not listed yet: {self._last_error or 'connecting'}")
        try:
            api = await connect(self.kubeconfig)
        except KubernetesError:
            self._count_error("api")
            raise
        try:
            async with asyncio.timeout(self.timeout):
                for s in self.streams:
                    await self._list(api, s)
                added, _ = self._sync_secret_streams()
                for s in added:
                    await self._list(api, s)
        except KubernetesError:
            self._count_error("api")
            raise
        except TimeoutError:
            self._count_error("api")
            raise KubernetesError(f"{self.name}: no answer from the API server within {self.timeout:g}s") from None
        finally:
            await api.close()
        docs, _ = self.evaluate()
        self._commit()
        return list(docs)

    # -- judging -----------------------------------------------------------------------------

    def secrets(self) -> Mapping[tuple[str, str], SecretState]:
        """The listed Secrets by (namespace, name); every one in a scope we may not list: forbidden."""
        found: dict[tuple[str, str], SecretState] = {}
        forbidden: set[str | None] = set()
        for s in self.streams:
            if s.resource != "Secret":
                continue
            if s.forbidden:
                forbidden.add(s.namespace)
            for where, obj in s.items.items():
                data = obj.get("data")
                found[where] = data if isinstance(data, Mapping) else {}
        return SecretView(found, frozenset(forbidden))

    def rendered(self) -> list[Rendered]:
        secrets = self.secrets()
        return [
            render(KIND_BY_NAME[s.resource], obj, secrets)
            for s in self.streams if s.resource != "Secret" for obj in s.items.values()
        ]

    def evaluate(self) -> tuple[list[CRDocument], dict[CRKey, Verdict]]:
        """The documents in force and each custom resource's verdict, from what was listed."""
        current = self.rendered()
        if not self._restored:
            self._restored = True
            if self.last_known_good is not None:
                self._accepted = {**accepted_from_lkg(self.last_known_good), **self._accepted}
        docs, verdicts = judge(current, self._accepted, validator(allow_http_loopback_idp=self.allow_http_loopback_idp))
        self.stats.judgements += 1
        generations = {
            CRKey(s.resource, ns, name): _generation(obj)
            for s in self.streams if s.resource != "Secret" for (ns, name), obj in s.items.items()
        }
        self._verdicts = {k: (v, generations.get(k, 0)) for k, v in verdicts.items()}
        keys = {str(r.key): r.key for r in current}
        self._pending = {keys[d.source]: d.data for d in docs if isinstance(d.data, dict)}
        if self.metrics is not None:
            accepted = sum(v.accepted for v in verdicts.values())
            self.metrics.kube_resources.labels(self.name, "accepted").set(accepted)
            self.metrics.kube_resources.labels(self.name, "rejected").set(len(verdicts) - accepted)
        return docs, verdicts

    # -- counting ----------------------------------------------------------------------------

    def _count_error(self, kind: str) -> None:
        """A failed list or watch (``api``) or a resourceVersion too old (``gone``)."""
        if kind == "gone":
            self.stats.gone += 1
        else:
            self.stats.errors += 1
        if self.metrics is not None:
            self.metrics.kube_errors.labels(self.name, kind).inc()

    def _current(self, stream: Stream) -> None:
        """``stream`` just heard from the API server: the view is current up to its oldest stream."""
        stream.current_at = time.time()
        if self.metrics is not None and all(s.synced for s in self.streams):
            self.metrics.kube_last_sync.labels(self.name).set(min(s.current_at for s in self.streams))

    def _commit(self) -> None:
        """What was just pushed is accepted: the versions in force become the last accepted."""
        self._accepted = dict(self._pending)

    # -- watching ----------------------------------------------------------------------------

    @property
    def reporting(self) -> bool:
        """Whether this source writes status and Events now: asked to (``report``) and, with an
        election, the holder of the Lease."""
        return self._asked_to_report and (self.lease is None or self.lease.held)

    async def watch(self, push: Push, *, report: bool = True) -> None:
        """List, watch and push forever; with ``report``, stand for the Lease and, while holding
        it (or with no Lease namespace), write each custom resource's status and Events."""
        self._watching = True
        self._asked_to_report = report
        self._rejudge = True
        self._dirty.set()  # judge and report once what poll() listed
        if report and self.lease is None:
            log.warning("%s: no namespace for the status Lease (POD_NAMESPACE): reporting without an election, "
                        "as if this were the only enforcer", self.name)
        backoff = Backoff()
        try:
            while True:
                api: _Api | None = None
                try:
                    api = await connect(self.kubeconfig)
                except KubernetesError as exc:
                    self._count_error("api")
                    self._last_error = str(exc)
                    log.error("%s", exc)
                    await asyncio.sleep(backoff.next() * 10)
                if api is None:
                    continue
                try:
                    async with asyncio.TaskGroup() as group:
                        tasks = {id(s): group.create_task(self._run_stream(api, s)) for s in self.streams}
                        group.create_task(self._reconcile(api, push, group, tasks))
                        if report and self.lease is not None:
                            group.create_task(self.lease.run(api, self._dirty.set))  # taken: report
                finally:
                    try:
                        if self.lease is not None:
                            await self.lease.release(api)
                    finally:
                        await api.close()
        finally:
            self._watching = False

    async def _list(self, api: _Api, stream: Stream) -> None:
        self.stats.lists += 1
        if self.metrics is not None:
            self.metrics.kube_lists.labels(self.name).inc()
        try:
            items, rv = await api.list(stream, self.timeout)
        except KubernetesError as exc:
            if exc.status == 403 and stream.resource == "Secret":
                log.error("%s: forbidden; custom resources referencing Secrets there are rejected", stream)
                stream.forbidden, stream.synced, stream.items = True, True, {}
                stream.resource_version = None
                self._current(stream)
                return
            raise
        stream.forbidden = False
        stream.items = {(str(_meta(o).get("namespace", "")), str(_meta(o).get("name", ""))): o for o in items}
        stream.resource_version, stream.synced = rv, True
        self._current(stream)

    async def _run_stream(self, api: _Api, stream: Stream) -> None:
        async def once() -> int:
            if stream.relist or stream.resource_version is None:
                stream.relist = False
                await self._list(api, stream)
                self._rejudge = True
                self._dirty.set()
                if stream.forbidden:
                    await asyncio.sleep(self.interval)  # try again later
                    stream.synced = True
                    return 1
            return await self._watch_once(api, stream)

        def gone(exc: Gone) -> None:
            self._count_error("gone")
            log.info("%s: resourceVersion too old (410 Gone); listing again", stream)
            stream.resource_version = None

        def failed(exc: KubernetesError, delay: float) -> None:
            self._count_error("api")
            self._last_error = str(exc)
            log.warning("%s; retrying in %.1fs", exc, delay)

        await keep_watching(self.min_gap, once, gone=gone, failed=failed)

    async def _watch_once(self, api: _Api, stream: Stream) -> int:
        """One watch until the server ends it; returns how many events came."""
        self.stats.watches += 1
        if self.metrics is not None:
            self.metrics.kube_watches.labels(self.name).inc()
        seconds = random.randint(*self.watch_seconds)  # noqa: S311
        seen = 0
        assert stream.resource_version is not None
        async for event in api.watch(stream, stream.resource_version, seconds, self.timeout):
            seen += 1
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                raise_watch_error(str(stream), obj)
            rv = _meta(obj).get("resourceVersion")
            if rv:
                stream.resource_version = str(rv)
            self._current(stream)
            if kind == "BOOKMARK":
                continue
            self.stats.events += 1
            where = (str(_meta(obj).get("namespace", "")), str(_meta(obj).get("name", "")))
            if kind == "DELETED":
                stream.items.pop(where, None)
            elif kind in ("ADDED", "MODIFIED"):
                old = stream.items.get(where)
                stream.items[where] = obj
                if old is not None and _judged_part(stream, old) == _judged_part(stream, obj):
                    # a status-only change (ours, another enforcer's): nothing to judge again; the
                    # reporter checks that the status still says its verdict
                    if self.reporting:
                        self._dirty.set()
                    continue
            self._rejudge = True
            self._dirty.set()
        self._current(stream)  # the server ended the watch: nothing was missed
        return seen

    async def _reconcile(
        self, api: _Api, push: Push, group: asyncio.TaskGroup, tasks: dict[int, asyncio.Task[None]],
    ) -> None:
        """Judge and push when a custom resource or Secret changed; report when holding the Lease."""
        host = socket.gethostname()
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.settle)
            self._dirty.clear()
            added, dropped = self._sync_secret_streams()
            for stream in dropped:
                task = tasks.pop(id(stream), None)
                if task is not None:
                    task.cancel()
            for stream in added:  # not synced yet: judged once it has listed (it sets _dirty)
                tasks[id(stream)] = group.create_task(self._run_stream(api, stream))
            if not all(s.synced for s in self.streams):
                continue
            if self._rejudge:
                self._rejudge = False
                docs, _ = self.evaluate()
                self.stats.pushes += 1
                outcome = await push(docs)
                if outcome in ("success", "unchanged"):
                    self._commit()
                else:
                    log.error("%s: the manager did not take the custom resources (%s)", self.name, outcome)
            if self.reporting:
                await self._report(api, host)

    async def _report(self, api: _Api, host: str) -> None:
        """Write each verdict of the last judgement where the status does not say it yet, and an
        Event for each rejection written (a custom resource changed since is judged again first)."""
        now = now_rfc3339()
        objects = {
            CRKey(s.resource, ns, name): obj
            for s in self.streams if s.resource != "Secret" for (ns, name), obj in s.items.items()
        }
        for key, (verdict, generation) in list(self._verdicts.items()):
            obj = objects.get(key)
            if obj is None or _generation(obj) != generation:
                continue
            if not self.reporting:
                return  # the Lease was lost meanwhile
            patch = status_patch(obj, verdict, now)
            if patch is None:
                continue
            try:
                await api.patch_status(key, patch)
                self.stats.status_writes += 1
                obj["status"] = {**(obj.get("status") or {}), **patch["status"]}  # type: ignore[dict-item]
                if not verdict.accepted:
                    log.error("%s rejected (%s): %s", key, verdict.reason, verdict.message)
                    await api.create_event(key.namespace, event_body(key, obj, verdict, now, host))
                    self.stats.events_created += 1
            except api.api_exception as exc:
                log.warning("%s: cannot write its status or event: %s", key, str(exc)[:300])
            except Exception as exc:  # a dropped connection while reporting; the watch recovers
                log.warning("%s: cannot write its status or event: %s: %s", key, type(exc).__name__, exc)


def _generation(obj: Mapping[str, Any]) -> int:
    value = _meta(obj).get("generation")
    return value if isinstance(value, int) else 0


def _judged_part(stream: Stream, obj: Mapping[str, Any]) -> object:
    """What of an object a judgement reads: a Secret's type and data; a custom resource's
    ``metadata.generation`` (the API server raises it with each ``spec`` change, never for
    ``status``), or its spec when it has none."""
    if stream.resource == "Secret":
        return obj.get("type"), obj.get("data")
    generation = _meta(obj).get("generation")
    return ("generation", generation) if isinstance(generation, int) else ("spec", obj.get("spec"))


class SecretView(Mapping[tuple[str, str], SecretState]):
    """The listed Secrets; any name in a scope the enforcer may not list reads ``forbidden``
    (scope None: every namespace)."""

    def __init__(self, secrets: Mapping[tuple[str, str], SecretState], forbidden: frozenset[str | None]) -> None:
        self._secrets, self._forbidden = secrets, forbidden

    def __getitem__(self, key: tuple[str, str]) -> SecretState:
        if None in self._forbidden or key[0] in self._forbidden:
            return "forbidden"
        return self._secrets[key]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._secrets)

    def __len__(self) -> int:
        return len(self._secrets)


# ---------------------------------------------------------------------------------------------
# the enforcer's own Node (tags from its labels) and DaemonSet (uninstall or update at a stop)

NODE_LABELS_FILE = "node-labels.json"
"""In the state dir: the Node's labels as last read, so a start with the API server down keeps
the tags (and so the protections) it had."""


def label_tags(labels: Mapping[str, object]) -> tuple[str, ...]:
    """One ``key=value`` tag per label, ordered by key (``kubernetes.io/hostname=node-1``,
    ``node-role.kubernetes.io/control-plane=``); a label that could not be a tag is left out."""
    return tuple(
        f"{k}={v}" for k, v in sorted(labels.items())
        if isinstance(v, str) and k and "=" not in k and not any(c.isspace() for c in k + v)
    )


def save_labels(path: Path, node: str, labels: Mapping[str, str]) -> None:
    """Persist ``labels`` of ``node`` atomically (raises OSError)."""
    text = json.dumps({"node": node, "labels": dict(labels), "read": now_rfc3339()}, sort_keys=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_labels(path: Path, node: str) -> tuple[dict[str, str], str] | None:
    """The persisted labels of ``node`` and when they were read, or None (no file, another
    node's, unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("node") != node or not isinstance(data.get("labels"), dict):
        return None
    labels = {str(k): str(v) for k, v in data["labels"].items()}
    return labels, str(data.get("read", "?"))


OnLabels = Callable[[Mapping[str, str]], Awaitable[None]]


@dataclass
class NodeLabels:
    """The labels of this enforcer's Node: read once at start (or, with the API server down, the
    ones last read: fail closed), then listed and watched by name (``fieldSelector
    metadata.name=<node>``) with the same backoff and watch-start gap as the definitions."""

    node: str
    state_dir: Path
    kubeconfig: Path | None = None
    timeout: float = 4.0
    watch_seconds: tuple[int, int] = (240, 300)
    min_gap: float = 1.0
    labels: dict[str, str] | None = None
    resource_version: str | None = None
    stats: WatchStats = field(default_factory=WatchStats)

    @property
    def path(self) -> Path:
        return self.state_dir / NODE_LABELS_FILE

    @property
    def tags(self) -> tuple[str, ...]:
        return label_tags(self.labels or {})

    def _persist(self, labels: Mapping[str, str]) -> None:
        try:
            save_labels(self.path, self.node, labels)
        except OSError as exc:
            log.error("cannot persist the labels of Node %s to %s: %s", self.node, self.path, exc)

    async def _list(self, api: _Api) -> dict[str, str]:
        self.stats.lists += 1
        obj, rv = await api.list_node(self.node, self.timeout)
        if obj is None:
            raise KubernetesError(f"Node {self.node} not found", 404)
        labels = _labels(obj)
        self.resource_version = rv
        return labels

    async def first(self) -> str:
        """Read the labels now, else take the persisted ones; returns where they came from.
        Raises KubernetesError when neither can be had (the caller must not serve: fewer tags
        select fewer services, and fewer services leave app ports open)."""
        try:
            async with asyncio.timeout(self.timeout):
                api = await connect(self.kubeconfig)
                try:
                    labels = await self._list(api)
                finally:
                    await api.close()
        except (KubernetesError, TimeoutError) as exc:
            problem = str(exc) or f"no answer from the API server within {self.timeout:g}s"
            saved = load_labels(self.path, self.node)
            if saved is None:
                raise KubernetesError(
                    f"cannot read the labels of Node {self.node} ({problem}) and none were ever read here "
                    f"({self.path})", getattr(exc, "status", 0),
                ) from None
            self.labels, when = saved
            log.error(
                "cannot read the labels of Node %s (%s): using the ones read at %s from %s until it answers",
                self.node, problem, when, self.path,
            )
            return f"{self.path} (read at {when})"
        self.labels = labels
        self._persist(labels)
        return "the API server"

    async def watch(self, on_change: OnLabels) -> None:
        """List and watch the Node forever; each change of its labels is persisted, then handed
        to ``on_change``.  A deleted Node keeps the last labels (fail closed)."""

        async def watching(api: _Api) -> NoReturn:
            async def once() -> int:
                if self.resource_version is None:
                    await self._take(await self._list(api), on_change)
                return await self._watch_once(api, on_change)

            def gone(exc: Gone) -> None:
                self.stats.gone += 1
                self.resource_version = None

            def failed(exc: KubernetesError, delay: float) -> None:
                self.stats.errors += 1
                log.warning("Node %s: %s; the tags stay; retrying in %.1fs", self.node, exc, delay)

            await keep_watching(self.min_gap, once, gone=gone, failed=failed)

        await with_api(self.kubeconfig, watching)

    async def _watch_once(self, api: _Api, on_change: OnLabels) -> int:
        self.stats.watches += 1
        seen = 0
        assert self.resource_version is not None
        seconds = random.randint(*self.watch_seconds)  # noqa: S311
        async for event in api.watch_node(self.node, self.resource_version, seconds, self.timeout):
            seen += 1
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                raise_watch_error(f"Node {self.node}", obj)
            rv = _meta(obj).get("resourceVersion")
            if rv:
                self.resource_version = str(rv)
            if kind in ("ADDED", "MODIFIED"):
                self.stats.events += 1
                await self._take(_labels(obj), on_change)
            elif kind == "DELETED":
                log.error("Node %s was deleted: its last labels stay this enforcer's tags", self.node)
        return seen

    async def _take(self, labels: dict[str, str], on_change: OnLabels) -> None:
        if labels == self.labels:
            return
        old = self.tags
        self.labels = labels
        self._persist(labels)
        log.warning("Node %s: labels changed; tags %s -> %s", self.node, list(old), list(self.tags))
        self.stats.pushes += 1
        await on_change(labels)


def _labels(obj: Mapping[str, Any]) -> dict[str, str]:
    labels = _meta(obj).get("labels")
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {}


def refusal(status: int, body: str, name: str) -> str | None:
    """The ``reason`` of the API server's ``Status`` answer refusing a request for the object
    ``name`` when it tells that this pod's DaemonSet is gone for it: ``NotFound`` naming it (deleted)
    or ``Forbidden`` naming it (the pod's RBAC removed, which only an uninstall does). None for
    anything else: an answer from something else in the way (a proxy's bare 404), a ``Status``
    naming another object, and ``Unauthorized`` (401: the credentials themselves were refused, as
    when a token expires or its signing key is rotated during a rolling update, so it says nothing
    about the DaemonSet)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("kind") != "Status" or data.get("code") != status:
        return None
    reason = data.get("reason")
    details = data.get("details")
    named = isinstance(details, dict) and details.get("name") == name
    if named and (status, reason) in ((404, "NotFound"), (403, "Forbidden")):
        return str(reason)
    return None


CLEAN_UP_BY_HAND = ("if the enforcer is being removed, delete its DaemonSet first and wait (`kubectl -n {namespace} "
                    "delete daemonset {name} --cascade=foreground --wait`), or open this node's ports by hand: "
                    "`nft delete table inet enforcer` on the node")
"""What a kept verdict that is not "present" tells the operator (README *Run it on Kubernetes*, Remove)."""


@dataclass(frozen=True)
class StopVerdict:
    """At a stop: is this an uninstall (remove the redirect table) or not (keep it), and why:
    ``short`` for the flow record, ``why`` for the log."""

    uninstall: bool
    short: str
    why: str


def _expression_holds(expr: Mapping[str, Any], value: str | None) -> bool | None:
    """One ``matchExpressions``/``matchFields`` entry against the node's value for its key (None:
    no such label); None when the entry cannot be judged (an unknown operator, a bad number)."""
    op, values = expr.get("operator"), [str(v) for v in expr.get("values") or []]
    if op == "In":
        return value is not None and value in values
    if op == "NotIn":
        return value is None or value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt") and len(values) == 1:
        try:
            bound = int(values[0])
            have = int(value) if value is not None else None
        except ValueError:
            return None
        return have is not None and (have > bound if op == "Gt" else have < bound)
    return None


def excluded_by(template_spec: Mapping[str, Any], node: str, labels: Mapping[str, str]) -> str | None:
    """Why a DaemonSet whose pod template has ``template_spec`` clearly no longer runs on the
    Node ``node`` with ``labels``: its ``nodeSelector`` or its required node affinity (what the
    DaemonSet controller checks) excludes it. None when it targets the node, or when that cannot
    be told for sure (an unknown operator; taints are not judged): the caller keeps its rules."""
    selector = template_spec.get("nodeSelector")
    if isinstance(selector, Mapping):
        for key, want in selector.items():
            if labels.get(str(key)) != str(want):
                return f"its nodeSelector {key}={want} does not match this node"
    affinity = template_spec.get("affinity")
    node_affinity = affinity.get("nodeAffinity") if isinstance(affinity, Mapping) else None
    required = (node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
                if isinstance(node_affinity, Mapping) else None)
    if not isinstance(required, Mapping):
        return None
    terms = required.get("nodeSelectorTerms")
    if not isinstance(terms, list) or not terms:
        return None
    for term in terms:
        if not isinstance(term, Mapping):
            return None
        results: list[bool | None] = []
        for expr in term.get("matchExpressions") or []:
            results.append(_expression_holds(expr, labels.get(str(expr.get("key")))) if isinstance(expr, Mapping)
                           else None)
        for expr in term.get("matchFields") or []:
            if not isinstance(expr, Mapping) or expr.get("key") != "metadata.name":
                results.append(None)
            else:
                results.append(_expression_holds(expr, node))
        if not results or None in results or all(results):
            return None  # this term may select the node (an empty term selects none, but is not judged)
    return "its required node affinity does not select this node"


async def stop_verdict(
    namespace: str, name: str, kubeconfig: Path | None, limit: float, node: str | None = None
) -> StopVerdict:
    """Ask the API server for this pod's DaemonSet (Istio's ``ShouldStopCleanup``): gone (404
    naming it), being deleted (``deletionTimestamp``) or our RBAC removed (403 naming it) is an
    uninstall; a 401 is not (our credentials refused: an expired or rotated token during an
    update must not open the node's ports); present is an update or a restart, unless (with
    ``node``) its pod template clearly no longer runs on this Node (:func:`excluded_by`, against
    the Node as the API server has it now): then this node was taken out of it, an uninstall
    here. No answer within ``limit`` seconds keeps the table (fail closed), and so does any
    answer that is not the API server's (a 404 from a proxy in the way is no uninstall).  Never
    raises."""
    where = f"DaemonSet {namespace}/{name}"
    keep = f"keeping the table (fail closed); {CLEAN_UP_BY_HAND.format(namespace=namespace, name=name)}"
    try:
        api = await connect(kubeconfig)
    except KubernetesError as exc:
        return StopVerdict(False, f"{where} not asked", f"{exc}; {keep}")
    node_obj: dict[str, Any] | None = None
    try:
        async with asyncio.timeout(limit):
            obj = await api.read_daemon_set(namespace, name, limit)
            if node is not None and not _meta(obj).get("deletionTimestamp"):
                with contextlib.suppress(KubernetesError):  # the Node unreadable: judged present
                    node_obj, _ = await api.list_node(node, limit)
    except TimeoutError:
        return StopVerdict(False, f"{where} unknown",
                           f"no answer from the API server within {limit:g}s; {keep}")
    except KubernetesError as exc:
        reason = refusal(exc.status, exc.body, name)
        if reason == "NotFound":
            return StopVerdict(True, f"{where} deleted", f"{where} is gone: an uninstall")
        if reason == "Forbidden":
            return StopVerdict(True, f"{where}: access revoked",
                               f"the API server forbids this pod to read {where} (HTTP 403 Forbidden): the "
                               "uninstall removed this pod's RBAC")
        if exc.status == 401:
            return StopVerdict(False, f"{where} unknown",
                               f"the API server refuses this pod's credentials (HTTP 401): an expired or rotated "
                               f"token says nothing about {where}; {keep}")
        if exc.status in (403, 404):
            return StopVerdict(False, f"{where} unknown", f"HTTP {exc.status} without the API server's Status for "
                               f"{where} (a proxy's answer?); {keep}")
        return StopVerdict(False, f"{where} unknown", f"cannot ask for {where}: {exc}; {keep}")
    except Exception as exc:  # a stop must never fail on this question
        return StopVerdict(False, f"{where} unknown", f"cannot ask for {where}: {type(exc).__name__}: {exc}; "
                           f"{keep}")
    finally:
        with contextlib.suppress(Exception):
            await api.close()
    if obj.get("kind") != "DaemonSet" or _meta(obj).get("name") != name:
        return StopVerdict(False, f"{where} unknown", f"the answer is not {where}; {keep}")
    deleting = _meta(obj).get("deletionTimestamp")
    if deleting:
        return StopVerdict(True, f"{where} being deleted", f"{where} is being deleted (since {deleting}): an uninstall")
    template = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    if node is not None and node_obj is not None and isinstance(template, Mapping):
        why = excluded_by(template, node, _labels(node_obj))
        if why is not None:
            return StopVerdict(True, f"{where} left node {node}", f"{where} is present but {why} ({node}): "
                               "this node was taken out of it, an uninstall here")
    return StopVerdict(False, f"{where} present", f"{where} is present: an update or a restart")


# ---------------------------------------------------------------------------------------------
# the pods of this enforcer's Node (pod mode: enforcer/run/pods.py decides, this lists and watches)


@dataclass(frozen=True)
class Probe:
    """One kubelet probe of a pod's container that connects to the pod (``httpGet``, ``tcpSocket``
    or ``grpc``; exec probes and probes of another ``host`` never reach the pod's ports).

    ``port``: resolved (a named port through the container's ``ports``; None if it names none).
    ``target``: the request target the kubelet sends for an ``httpGet`` (``path``, ``/`` by default,
    with its query). ``headers``: the probe's ``httpHeaders``. Only :attr:`gated` probes (plain HTTP
    ``httpGet``) can pass the probe gate; the others cannot reach a protected port."""

    container: str
    kind: str
    """``liveness``, ``readiness`` or ``startup``."""
    handler: str
    """``httpGet``, ``tcpSocket`` or ``grpc``."""
    port: int | None
    target: str = "/"
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def gated(self) -> bool:
        """A plain-HTTP ``httpGet`` of a known port: what the probe gate lets through."""
        return self.handler == "httpGet" and self.scheme == "HTTP" and self.port is not None

    def __str__(self) -> str:
        what = f"{self.handler} {self.scheme} {self.target}" if self.handler == "httpGet" else self.handler
        return f"{self.kind}Probe of container {self.container} ({what} on port {self.port})"


_PROBE_KINDS = (("livenessProbe", "liveness"), ("readinessProbe", "readiness"), ("startupProbe", "startup"))


def _probe_port(value: object, ports: Mapping[str, int]) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 1 <= value <= 65535 else None
    if isinstance(value, str):
        if value.isdigit():
            return _probe_port(int(value), ports)
        return ports.get(value)
    return None


def _probe_target(path: object) -> str:
    """The request target the kubelet sends for ``httpGet.path`` (it prefixes a missing ``/``)."""
    text = path if isinstance(path, str) else ""
    return text if text.startswith("/") else f"/{text}"


def pod_probes(spec: Mapping[str, Any]) -> tuple[Probe, ...]:
    """Every container's (and restartable init container's) probes that connect to the pod."""
    out: list[Probe] = []
    containers = [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
    for container in containers:
        if not isinstance(container, Mapping):
            continue
        name = str(container.get("name") or "")
        ports = {
            str(p["name"]): int(p["containerPort"]) for p in container.get("ports") or []
            if isinstance(p, Mapping) and p.get("name") and isinstance(p.get("containerPort"), int)
        }
        for key, kind in _PROBE_KINDS:
            probe = container.get(key)
            if not isinstance(probe, Mapping):
                continue
            for handler in ("httpGet", "tcpSocket", "grpc"):
                action = probe.get(handler)
                if not isinstance(action, Mapping) or action.get("host"):
                    continue  # another host: the kubelet does not connect to the pod
                port = _probe_port(action.get("port"), ports)
                if handler != "httpGet":
                    out.append(Probe(name, kind, handler, port))
                    continue
                headers = tuple(
                    (str(h.get("name")), str(h.get("value") or "")) for h in action.get("httpHeaders") or []
                    if isinstance(h, Mapping) and h.get("name")
                )
                out.append(Probe(name, kind, handler, port, _probe_target(action.get("path")),
                                 str(action.get("scheme") or "HTTP").upper(), headers))
    return tuple(out)


@dataclass(frozen=True)
class PodInfo:
    """What pod mode needs of a pod object: who it is, its labels, whether it has its own
    network namespace (not ``hostNetwork``), its IPs, whether it is going away, and the kubelet
    probes that connect to it."""

    uid: str
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    service_account: str = "default"
    host_network: bool = False
    ips: tuple[str, ...] = ()
    node: str = ""
    deleting: bool = False
    """``metadata.deletionTimestamp`` is set (or the pod finished: Succeeded/Failed)."""
    probes: tuple[Probe, ...] = ()
    phase: str = field(default="", compare=False)
    """``status.phase``: ``Pending``, ``Running``, ``Succeeded``, ``Failed`` (``""``: not reported);
    for ``enforcer doctor --pod``, not compared."""

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def pod_info(obj: Mapping[str, Any]) -> PodInfo | None:
    """A pod object as :class:`PodInfo` (None when it has no UID, name or namespace)."""
    meta = _meta(obj)
    raw_spec, raw_status = obj.get("spec"), obj.get("status")
    spec: Mapping[str, Any] = raw_spec if isinstance(raw_spec, Mapping) else {}
    status: Mapping[str, Any] = raw_status if isinstance(raw_status, Mapping) else {}
    uid, namespace, name = (str(meta.get(k) or "") for k in ("uid", "namespace", "name"))
    if not (uid and namespace and name):
        return None
    ips: list[str] = []
    for entry in status.get("podIPs") or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("ip"), str) and entry["ip"] not in ips:
            ips.append(entry["ip"])
    if isinstance(status.get("podIP"), str) and status["podIP"] and status["podIP"] not in ips:
        ips.append(status["podIP"])
    return PodInfo(
        uid=uid, namespace=namespace, name=name, labels=_labels(obj),
        service_account=str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"),
        host_network=bool(spec.get("hostNetwork")), ips=tuple(ips), node=str(spec.get("nodeName") or ""),
        deleting=bool(meta.get("deletionTimestamp")) or status.get("phase") in ("Succeeded", "Failed"),
        probes=pod_probes(spec),
        phase=str(status.get("phase") or ""),
    )


async def read_pod(namespace: str, name: str, kubeconfig: Path | None, limit: float) -> PodInfo | None:
    """The pod ``namespace/name`` from the API server, with the daemon's credentials (``kubeconfig``,
    else the in-cluster service account); None if there is no such pod. Raises KubernetesError
    when the API server cannot be asked or refuses (within ``limit`` seconds)."""
    api = await connect(kubeconfig)
    try:
        async with asyncio.timeout(limit):
            obj = await api.find_pod(namespace, name, limit)
    except TimeoutError:
        raise KubernetesError(f"pod {namespace}/{name}: no answer from the API server within {limit:g}s") from None
    finally:
        with contextlib.suppress(Exception):
            await api.close()
    return pod_info(obj) if obj is not None else None


OnPod = Callable[[str, PodInfo], Awaitable[None]]
"""Called with ``ADDED``/``MODIFIED``/``DELETED`` and the pod (for DELETED: its last state)."""
OnSynced = Callable[[], Awaitable[None]]
"""Called after each complete list (start-up, and a re-list after 410 Gone or an error)."""


@dataclass
class NodePods:
    """The pods scheduled to this Node (``fieldSelector spec.nodeName=<node>``, every namespace),
    listed and watched with the same backoff and watch-start gap as the definitions. :attr:`pods`
    is the cache (UID -> :class:`PodInfo`); :attr:`synced` says it was listed at least once and
    :attr:`current` whether the last list or watch succeeded (pod mode fails a CNI ADD it cannot
    decide: the API server is down and the pod is not in the cache)."""

    node: str
    kubeconfig: Path | None = None
    timeout: float = 10.0
    watch_seconds: tuple[int, int] = (240, 300)
    min_gap: float = 1.0
    pods: dict[str, PodInfo] = field(default_factory=dict)
    resource_version: str | None = None
    synced: bool = False
    current: bool = False
    stats: WatchStats = field(default_factory=WatchStats)

    @property
    def selector(self) -> str:
        return f"spec.nodeName={self.node}"

    def find(self, namespace: str, name: str, uid: str = "") -> PodInfo | None:
        """The cached pod with this UID, else (no UID given) with this namespace and name."""
        if uid:
            return self.pods.get(uid)
        return next((p for p in self.pods.values() if p.namespace == namespace and p.name == name), None)

    async def watch(self, on_pod: OnPod, on_synced: OnSynced) -> None:
        """List and watch forever; each list replaces the cache (pods gone meanwhile are handed
        on as DELETED), then ``on_synced``; each watch event updates it, then ``on_pod``."""

        async def watching(api: _Api) -> NoReturn:
            async def once() -> int:
                if self.resource_version is None:
                    await self._list(api, on_pod)
                    await on_synced()
                return await self._watch_once(api, on_pod)

            def gone(exc: Gone) -> None:
                self.stats.gone += 1
                self.resource_version = None

            def failed(exc: KubernetesError, delay: float) -> None:
                self.stats.errors += 1
                self.current = False
                log.warning("pods of Node %s: %s; retrying in %.1fs", self.node, exc, delay)

            await keep_watching(self.min_gap, once, gone=gone, failed=failed)

        def unreachable(exc: KubernetesError) -> None:
            self.current = False

        await with_api(self.kubeconfig, watching, unreachable)

    async def _list(self, api: _Api, on_pod: OnPod) -> None:
        self.stats.lists += 1
        items, rv = await api.list_pods(self.selector, self.timeout)
        listed = {p.uid: p for p in map(pod_info, items) if p is not None}
        gone = [p for uid, p in self.pods.items() if uid not in listed]
        self.pods, self.resource_version, self.synced, self.current = listed, rv, True, True
        for pod in gone:
            await on_pod("DELETED", pod)

    async def _watch_once(self, api: _Api, on_pod: OnPod) -> int:
        self.stats.watches += 1
        seen = 0
        assert self.resource_version is not None
        seconds = random.randint(*self.watch_seconds)  # noqa: S311
        async for event in api.watch_pods(self.selector, self.resource_version, seconds, self.timeout):
            seen += 1
            self.current = True
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                raise_watch_error(f"pods of Node {self.node}", obj)
            rv = _meta(obj).get("resourceVersion")
            if rv:
                self.resource_version = str(rv)
            pod = pod_info(obj) if kind in ("ADDED", "MODIFIED", "DELETED") else None
            if pod is None:
                continue
            self.stats.events += 1
            if kind == "DELETED":
                self.pods.pop(pod.uid, None)
            else:
                self.pods[pod.uid] = pod
            await on_pod(str(kind), pod)
        return seen
