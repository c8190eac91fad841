"""Where definitions come from: sources polled for changes (or pushing them), validated as
one set, swapped atomically, and persisted as last-known-good so a restart without the
control plane still enforces.

Sources (any number, merged in configuration order):

* :class:`FileSource` — a YAML file or a directory of ``*.yaml``/``*.yml``; watched by
  comparing (inode, size, mtime) every ``interval`` and read only when that changes.
* :class:`HTTPSource` — an HTTP(S) URL serving YAML documents or a JSON list of objects;
  polled with ``If-None-Match`` (a ``304`` costs nothing), bearer token read from a file at
  every poll (rotation without restart), custom CA, bounded size and time, and a jittered
  exponential backoff while it fails.  Any static web server or object store is a control
  plane.
* ``KubernetesSource`` (enforcer/config/kubernetes.py, loaded only when configured) — custom
  resources listed and watched through the Kubernetes API; it pushes (a :class:`WatchingSource`).

:class:`DefinitionsManager` merges the latest documents of every source, validates the
whole set with the same code as ``enforcer check``, and only then hands it to the daemon.
A source that watches rather than polls hands its documents to
:meth:`DefinitionsManager.push`, which takes the same path.  An invalid update is logged
with the source and key path and the previous set stays in force.  Every accepted set is
written to ``stateDir/definitions.last-known-good.yaml``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import aiohttp
import yaml

from enforcer.config import definitions as definitions_mod
from enforcer.config import settings as settings_mod
from enforcer.config.definitions import Definitions, RawDocument
from enforcer.config.issues import ConfigError, ConfigIssue
from enforcer.errors import EnforcerError, Reason

log = logging.getLogger("enforcer.definitions")

LKG_NAME = "definitions.last-known-good.yaml"
MAX_HTTP_BYTES = 16 << 20


class SourceError(EnforcerError):
    """A source could not be read (unreachable, unreadable, bad syntax)."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.SOURCE_UNAVAILABLE, 503, message)


class Source(Protocol):
    """Something that yields definition documents."""

    name: str
    interval: float

    async def poll(self) -> list[RawDocument] | None:
        """The current documents, or None if unchanged since the last successful poll."""

    def reset(self) -> None:
        """Forget what was seen, so the next poll reads everything again."""


@runtime_checkable
class WatchingSource(Source, Protocol):
    """A source that also watches, pushing each new set to :meth:`DefinitionsManager.push`
    (the daemon runs :meth:`watch` as a task of its own)."""

    def watch(
        self, push: Callable[[Sequence[RawDocument]], Awaitable[str]], *, report: bool
    ) -> Coroutine[Any, Any, None]:
        """Watch forever; ``report``: also tell the control plane each object's verdict."""


@dataclass
class FileSource:
    """A YAML file or a directory of YAML files."""

    path: Path
    interval: float = 1.0
    name: str = ""
    _stamp: tuple[tuple[str, int, int, int], ...] | None = None

    def __post_init__(self) -> None:
        self.name = self.name or str(self.path)

    def _current_stamp(self) -> tuple[tuple[str, int, int, int], ...]:
        if self.path.is_dir():
            files = sorted(p for p in self.path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        else:
            files = [self.path]
        out = []
        for f in files:
            st = f.stat()
            out.append((str(f), st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def reset(self) -> None:
        self._stamp = None

    async def poll(self) -> list[RawDocument] | None:
        try:
            stamp = self._current_stamp()
        except OSError as exc:
            raise SourceError(f"{self.path}: {exc.strerror}") from None
        if stamp == self._stamp:
            return None
        try:
            docs = definitions_mod.load_documents(self.path)
        except ConfigError as exc:
            raise SourceError(str(exc)) from None
        self._stamp = stamp
        return docs


@dataclass
class HTTPSource:
    """An HTTP(S) URL polled with ETag/If-None-Match."""

    url: str
    http: aiohttp.ClientSession
    interval: float = 30.0
    timeout: float = 10.0
    token_file: Path | None = None
    ssl_context: ssl.SSLContext | None = None
    name: str = ""
    _etag: str | None = None
    failures: int = 0

    def __post_init__(self) -> None:
        self.name = self.name or self.url

    def reset(self) -> None:
        self._etag = None

    async def poll(self) -> list[RawDocument] | None:
        headers = {"Accept": "application/yaml, application/json;q=0.9, */*;q=0.1"}
        if self._etag:
            headers["If-None-Match"] = self._etag
        if self.token_file is not None:
            try:
                token = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise SourceError(f"{self.url}: cannot read tokenFile {self.token_file}: {exc.strerror}") from None
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with self.http.get(
                self.url,
                headers=headers,
                allow_redirects=False,
                ssl=self.ssl_context if self.ssl_context is not None else True,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                if resp.status == 304:
                    return None
                if resp.status != 200:
                    raise SourceError(f"{self.url}: HTTP {resp.status}")
                body = await _read_limited(resp)
                etag = resp.headers.get("ETag")
                ctype = resp.headers.get("Content-Type", "")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SourceError(f"{self.url}: {type(exc).__name__}: {str(exc)[:200]}") from None
        docs = parse_http_body(body, ctype, self.url)
        self._etag = etag
        return docs


async def _read_limited(resp: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    total = 0
    async for chunk in resp.content.iter_chunked(65536):
        total += len(chunk)
        if total > MAX_HTTP_BYTES:
            raise SourceError(f"{resp.url}: response larger than {MAX_HTTP_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_http_body(body: bytes, content_type: str, source: str) -> list[RawDocument]:
    """YAML documents, or a JSON list of objects (or one object)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SourceError(f"{source}: body is not UTF-8") from None
    if "json" in content_type:
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise SourceError(f"{source}: invalid JSON: {exc}") from None
        items = value if isinstance(value, list) else [value]
        return [RawDocument(source, i, item) for i, item in enumerate(items)]
    parsed = definitions_mod.parse_documents(text, source)
    if isinstance(parsed, ConfigIssue):
        raise SourceError(str(parsed))
    return parsed


def build_sources(settings: settings_mod.Settings, http: aiohttp.ClientSession) -> list[Source]:
    """The configured sources, in order."""
    out: list[Source] = []
    for s in settings.model.definitions:
        if s.url is not None:
            ctx: ssl.SSLContext | None = None
            if s.caFile is not None:
                ctx = ssl.create_default_context(cafile=str(s.caFile))
            out.append(
                HTTPSource(s.url, http, interval=s.interval, timeout=s.timeout, token_file=s.tokenFile, ssl_context=ctx)
            )
        elif s.file is not None:
            out.append(FileSource(s.file, interval=min(s.interval, 5.0)))
        elif s.kubernetes is not None:
            from enforcer.config import kubernetes  # noqa: PLC0415 (it imports this module)

            out.append(kubernetes.KubernetesSource(
                namespaces=tuple(s.kubernetes.namespaces), kubeconfig=s.kubernetes.kubeconfig,
                interval=s.interval, timeout=s.timeout,
                allow_http_loopback_idp=settings.model.oidc.allowHttpLoopbackIssuer,
            ))
    return out


def fingerprint(docs: Sequence[RawDocument]) -> str:
    """A digest of the merged documents (order-sensitive), to skip no-op updates."""
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps(d.data, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


OnChange = Callable[[Definitions, str], Awaitable[None]]


@dataclass
class DefinitionsManager:
    """Polls the sources (or takes what they push), validates merged sets and hands accepted
    ones to ``on_change``."""

    settings: settings_mod.Settings
    sources: list[Source]
    on_change: OnChange | None = None
    on_outcome: Callable[[str, str], None] | None = None  # (outcome, detail) for metrics/flows
    current: Definitions | None = None
    digest: str = ""
    using_lkg: bool = False
    _latest: dict[int, list[RawDocument]] = field(default_factory=dict)
    _failing: set[int] = field(default_factory=set)
    """The sources whose last read failed."""
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _in_force: list[RawDocument] = field(default_factory=list)
    """The documents of ``current``."""

    @property
    def lkg_path(self) -> Path:
        return self.settings.state_dir / LKG_NAME

    def _resolve(self, docs: Sequence[RawDocument]) -> Definitions:
        return definitions_mod.resolve_definitions(
            docs, self.settings.tags, allow_http_loopback_idp=self.settings.model.oidc.allowHttpLoopbackIssuer
        )

    async def load_initial(self) -> Definitions:
        """First set at start-up: every source, or the last-known-good if any is unreachable."""
        failures: list[str] = []
        for i, src in enumerate(self.sources):
            try:
                docs = await asyncio.wait_for(src.poll(), timeout=30)
            except (SourceError, TimeoutError) as exc:
                failures.append(f"{src.name}: {exc}")
                self._failing.add(i)
                continue
            self._latest[i] = docs or []
        if failures:
            lkg = self._load_lkg()
            if lkg is None:
                raise ConfigError(
                    [
                        ConfigIssue(
                            f,
                            "definitions",
                            "source unreachable and no last-known-good set exists",
                            fix="make the source reachable, or start once while it is",
                        )
                        for f in failures
                    ]
                )
            for f in failures:
                log.error("definitions source unavailable: %s", f)
            log.error(
                "ENFORCING THE LAST-KNOWN-GOOD DEFINITIONS from %s until every source is reachable again", self.lkg_path
            )
            self.using_lkg = True
            definitions = self._resolve(lkg)
            self.current, self.digest, self._in_force = definitions, fingerprint(lkg), lkg
            self._outcome("last_known_good", "; ".join(failures))
            return definitions
        docs = self._merged()
        definitions = self._resolve(docs)  # raises ConfigError: fatal at start-up
        self.current, self.digest, self._in_force = definitions, fingerprint(docs), docs
        self._save_lkg(docs)
        return definitions

    def _merged(self) -> list[RawDocument]:
        return [d for i in range(len(self.sources)) for d in self._latest.get(i, [])]

    def _load_lkg(self) -> list[RawDocument] | None:
        try:
            text = self.lkg_path.read_text(encoding="utf-8")
        except OSError:
            return None
        parsed = definitions_mod.parse_documents(text, str(self.lkg_path))
        return None if isinstance(parsed, ConfigIssue) else parsed

    def _save_lkg(self, docs: Sequence[RawDocument]) -> None:
        text = "# last-known-good definitions, written by the enforcer; do not edit\n" + yaml.safe_dump_all(
            [d.data for d in docs], sort_keys=False
        )
        tmp = self.lkg_path.with_suffix(".tmp")
        try:
            self.lkg_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.lkg_path)
        except OSError as exc:
            log.error("cannot persist last-known-good definitions to %s: %s", self.lkg_path, exc)

    def _outcome(self, outcome: str, detail: str) -> None:
        if self.on_outcome is not None:
            self.on_outcome(outcome, detail)

    def trigger(self) -> None:
        """Poll every source now (SIGHUP, `enforcer reload`)."""
        self._wake.set()

    async def refresh(self, *, reason: str = "poll") -> str:
        """Poll every source once and apply the merged set if it changed; returns the outcome."""
        async with self._lock:
            changed = False
            failures = []
            self._failing.clear()
            for i, src in enumerate(self.sources):
                if reason != "poll":
                    src.reset()  # an explicit reload re-reads even an unchanged-looking file
                try:
                    docs = await src.poll()
                except SourceError as exc:
                    failures.append(f"{src.name}: {exc}")
                    self._failing.add(i)
                    continue
                if docs is not None:
                    self._latest[i] = docs
                    changed = True
            if failures and len(self._latest) < len(self.sources):
                for f in failures:
                    log.warning("definitions source unavailable: %s", f)
                return "source_unavailable"
            recovering = self.using_lkg and not failures and len(self._latest) == len(self.sources)
            if not (changed or recovering) and reason == "poll":
                return "unchanged"
            return await self._accept(self._merged(), reason, force=reason != "poll" or recovering)

    async def push(self, docs: Sequence[RawDocument], origin: str) -> str:
        """Take new documents pushed by the source named ``origin`` (a watch, rather than a
        poll): the merged set goes through the same validation, swap and last-known-good as a
        poll, and the outcome is returned.  Until every other source has been read once, the
        documents are kept and the outcome is ``source_unavailable``."""
        index = next((i for i, src in enumerate(self.sources) if src.name == origin), None)
        if index is None:
            raise ValueError(f"no definitions source is named {origin!r}")
        async with self._lock:
            self._latest[index] = list(docs)
            self._failing.discard(index)
            if len(self._latest) < len(self.sources):
                log.warning("definitions pushed by %s wait until every other source has been read", origin)
                return "source_unavailable"
            # a push that completes the set while on the last-known-good one ends that state,
            # even when it holds the very same documents
            return await self._accept(self._merged(), f"push from {origin}", force=self.using_lkg)

    async def retag(self, settings: settings_mod.Settings, reason: str) -> str:
        """This enforcer's tags changed (its Node's labels): take ``settings`` and resolve the
        documents in force again, through the same validation, swap and last-known-good as an
        update; if that is rejected the set in force stays."""
        async with self._lock:
            self.settings = settings
            return await self._accept(self._in_force, reason, force=True)

    async def _accept(self, docs: Sequence[RawDocument], reason: str, *, force: bool) -> str:
        """Validate a merged set, hand it to ``on_change``, then make it current and persist
        it; the current set stays if any step fails.  Unless ``force``, an unchanged set is
        ``unchanged``."""
        digest = fingerprint(docs)
        if digest == self.digest and not force:
            return "unchanged"
        try:
            definitions = self._resolve(docs)
        except ConfigError as exc:
            log.error("definitions update rejected (%s); the current set stays in force:\n%s", reason, exc)
            self._outcome("rejected", str(exc.issues[0]) if exc.issues else "")
            return "rejected"
        if self.on_change is not None:
            try:
                await self.on_change(definitions, reason)
            except Exception as exc:
                log.exception("applying the new definitions failed; the current set stays in force")
                self._outcome("failed", str(exc))
                return "failed"
        self.current, self.digest, self._in_force = definitions, digest, list(docs)
        if self.using_lkg and not self._failing:
            log.warning("every definitions source is reachable again; no longer using the last-known-good set")
            self.using_lkg = False
        self._save_lkg(docs)
        self._outcome("success", f"{len(definitions.services)} service(s), {reason}")
        return "success"

    async def run(self) -> None:
        """Poll forever; a failing source backs off with jitter, others keep their pace."""
        interval = min((s.interval for s in self.sources), default=5.0)
        delay = interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            forced = self._wake.is_set()
            self._wake.clear()
            started = time.monotonic()
            outcome = await self.refresh(reason="signal" if forced else "poll")
            if outcome == "source_unavailable":
                delay = min(max(delay * 2, interval), 300.0) * random.uniform(0.8, 1.2)  # noqa: S311
            else:
                delay = interval
            log.debug("definitions poll: %s in %.1f ms", outcome, (time.monotonic() - started) * 1000)
