"""Definition sources: file watching, HTTP polling with ETag, validation as a set, last-known-good."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import yaml
from aiohttp import web

from enforcer.config import definitions, issues
from enforcer.config import settings as settings_mod
from enforcer.config.sources import (
    LKG_NAME,
    DefinitionsManager,
    FileSource,
    HTTPSource,
    SourceError,
    build_sources,
    parse_http_body,
)
from tests.harness.seed import SERVICE, SPEC


def _settings(tmp_path: Path, sources: list[dict[str, object]]) -> settings_mod.Settings:
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(yaml.safe_dump({"tags": ["app=frontend"], "stateDir": "state", "definitions": sources}))
    return settings_mod.load_settings(cfg)


def _spec_with(uri: str) -> dict[str, object]:
    return {**SPEC, "endpoints": [{"URI": uri, "methods": ["GET"], "allowedScopes": [["groups=a"]]}]}


class ControlPlane:
    """A real HTTP server on loopback serving definitions with ETag support."""

    def __init__(self) -> None:
        self.body = yaml.safe_dump_all([SERVICE, SPEC]).encode()
        self.requests: list[dict[str, str]] = []
        self.status = 200
        self.delay = 0.0
        self.port = 0
        self.content_type = "application/yaml"

    def etag(self) -> str:
        return '"' + hashlib.sha256(self.body).hexdigest()[:12] + '"'

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(dict(request.headers))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.Response(status=self.status)
        if request.headers.get("If-None-Match") == self.etag():
            return web.Response(status=304, headers={"ETag": self.etag()})
        return web.Response(body=self.body, headers={"ETag": self.etag(), "Content-Type": self.content_type})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/definitions.yaml"


@pytest_asyncio.fixture
async def plane() -> AsyncIterator[ControlPlane]:
    cp = ControlPlane()
    app = web.Application()
    app.router.add_get("/definitions.yaml", cp.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    cp.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield cp
    await runner.cleanup()


async def test_file_source_reads_only_when_the_file_changes(tmp_path: Path) -> None:
    """A file source returns documents on the first poll and after a change, None in between."""
    f = tmp_path / "d.yaml"
    f.write_text(yaml.safe_dump_all([SERVICE, SPEC]))
    src = FileSource(f)
    assert len(await src.poll() or []) == 2
    assert await src.poll() is None
    f.write_text(yaml.safe_dump_all([SERVICE, _spec_with("/x")]))
    docs = await src.poll()
    assert docs is not None
    assert docs[1].data["endpoints"][0]["URI"] == "/x"  # type: ignore[index]


async def test_directory_source_sees_new_files(tmp_path: Path) -> None:
    """A directory source picks up a file added to the directory."""
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(SERVICE))
    src = FileSource(tmp_path)
    assert len(await src.poll() or []) == 1
    (tmp_path / "b.yml").write_text(yaml.safe_dump(SPEC))
    assert len(await src.poll() or []) == 2


async def test_http_source_uses_etag_and_bearer_token(plane: ControlPlane, tmp_path: Path) -> None:
    """The HTTP source sends the token from its file and If-None-Match; a 304 means unchanged."""
    token = tmp_path / "token"
    token.write_text("t0k3n\n")
    async with aiohttp.ClientSession() as http:
        src = HTTPSource(plane.url, http, token_file=token)
        first = await src.poll()
        assert first is not None and len(first) == 2
        assert plane.requests[-1]["Authorization"] == "Bearer t0k3n"
        assert await src.poll() is None
        assert plane.requests[-1]["If-None-Match"] == plane.etag()
        token.write_text("rotated")
        plane.body = yaml.safe_dump_all([SERVICE, _spec_with("/y")]).encode()
        assert await src.poll() is not None
        assert plane.requests[-1]["Authorization"] == "Bearer rotated"


async def test_http_source_errors_are_source_errors(plane: ControlPlane) -> None:
    """A 5xx or a timeout becomes a SourceError naming the URL."""
    async with aiohttp.ClientSession() as http:
        plane.status = 503
        with pytest.raises(SourceError, match="HTTP 503"):
            await HTTPSource(plane.url, http).poll()
        plane.status, plane.delay = 200, 2.0
        with pytest.raises(SourceError, match=r"127\.0\.0\.1"):
            await HTTPSource(plane.url, http, timeout=0.3).poll()


def test_json_list_bodies_are_accepted() -> None:
    """A JSON list of objects is read as one document per object."""
    import json  # noqa: PLC0415

    docs = parse_http_body(json.dumps([SERVICE, SPEC]).encode(), "application/json", "u")
    assert [d.data["kind"] for d in docs] == ["service", "httpresourcespec"]  # type: ignore[index]


async def test_invalid_update_is_rejected_and_the_old_set_stays(tmp_path: Path) -> None:
    """An update that fails validation is rejected with its key path; the previous set remains current."""
    f = tmp_path / "d.yaml"
    f.write_text(yaml.safe_dump_all([SERVICE, SPEC]))
    settings = _settings(tmp_path, [{"file": str(f)}])
    outcomes: list[tuple[str, str]] = []
    applied: list[definitions.Definitions] = []

    async def on_change(defs: definitions.Definitions, reason: str) -> None:
        applied.append(defs)

    mgr = DefinitionsManager(
        settings,
        build_sources(settings, None),
        on_change=on_change,  # type: ignore[arg-type]
        on_outcome=lambda o, d: outcomes.append((o, d)),
    )
    first = await mgr.load_initial()
    f.write_text(yaml.safe_dump_all([{**SERVICE, "port": "eighty"}, SPEC]))
    assert await mgr.refresh() == "rejected"
    assert mgr.current is first
    assert outcomes[-1][0] == "rejected"
    assert "service[private-app].port" in outcomes[-1][1]
    f.write_text(yaml.safe_dump_all([SERVICE, _spec_with("/z")]))
    assert await mgr.refresh() == "success"
    assert applied[-1].services[0].endpoints[0].uri == "/z"


async def test_restart_with_the_source_down_uses_last_known_good(plane: ControlPlane, tmp_path: Path) -> None:
    """After one good start, a start while the control plane is down enforces the persisted set, then recovers."""
    settings = _settings(tmp_path, [{"url": plane.url, "interval": "1s"}])
    async with aiohttp.ClientSession() as http:
        mgr = DefinitionsManager(settings, build_sources(settings, http))
        await mgr.load_initial()
        assert (settings.state_dir / LKG_NAME).exists()
        assert oct((settings.state_dir / LKG_NAME).stat().st_mode & 0o777) == "0o600"
        plane.status = 500
        outcomes: list[str] = []
        restarted = DefinitionsManager(
            settings, build_sources(settings, http), on_outcome=lambda o, d: outcomes.append(o)
        )
        defs = await restarted.load_initial()
        assert restarted.using_lkg
        assert defs.services[0].name == "private-app"
        assert outcomes == ["last_known_good"]
        plane.status = 200
        assert await restarted.refresh() == "success"
        assert not restarted.using_lkg


async def test_first_start_without_any_set_is_a_clear_error(plane: ControlPlane, tmp_path: Path) -> None:
    """With the control plane down and no last-known-good set, start-up fails naming the source."""
    plane.status = 500
    settings = _settings(tmp_path, [{"url": plane.url}])
    async with aiohttp.ClientSession() as http:
        with pytest.raises(issues.ConfigError, match="no last-known-good"):
            await DefinitionsManager(settings, build_sources(settings, http)).load_initial()


async def test_hanging_source_never_blocks_the_event_loop(plane: ControlPlane, tmp_path: Path) -> None:
    """While a source hangs until its timeout, other work on the loop keeps running promptly."""
    settings = _settings(tmp_path, [{"url": plane.url, "timeout": "1s"}])
    async with aiohttp.ClientSession() as http:
        mgr = DefinitionsManager(settings, build_sources(settings, http))
        await mgr.load_initial()
        plane.delay = 5.0
        plane.body = yaml.safe_dump_all([SERVICE, _spec_with("/hang")]).encode()
        poll = asyncio.ensure_future(mgr.refresh())
        worst = 0.0
        for _ in range(20):
            t = time.monotonic()
            await asyncio.sleep(0.01)
            worst = max(worst, time.monotonic() - t)
        assert await poll == "source_unavailable" or mgr.current is not None
        assert worst < 0.5
        assert mgr.current is not None and mgr.current.services[0].endpoints[0].uri == "/*"


def test_source_config_needs_exactly_one_of_file_or_url(tmp_path: Path) -> None:
    """A source with both or neither of file/url is a config error at definitions[i]."""
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text("definitions: [{file: a.yaml, url: 'https://x/y'}]\n")
    with pytest.raises(issues.ConfigError) as exc:
        settings_mod.load_settings(cfg)
    assert exc.value.issues[0].path.startswith("definitions[0]")


def test_plain_http_sources_are_only_allowed_on_loopback(tmp_path: Path) -> None:
    """A control plane URL must be https unless it is on loopback."""
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text("definitions: [{url: 'http://cp.example.com/defs'}]\n")
    with pytest.raises(issues.ConfigError, match="https"):
        settings_mod.load_settings(cfg)


@dataclass
class WatchSource:
    """A source that pushes its documents (like a watch) and has nothing new when polled; can be down."""

    name: str
    docs: list[definitions.RawDocument]
    interval: float = 3600.0
    down: bool = False

    async def poll(self) -> list[definitions.RawDocument] | None:
        if self.down:
            raise SourceError(f"{self.name}: down")
        return self.docs

    def reset(self) -> None:
        return None


def _docs(*objects: dict[str, object], source: str = "watch") -> list[definitions.RawDocument]:
    return [definitions.RawDocument(source, i, o) for i, o in enumerate(objects)]


@pytest.mark.parametrize(
    ("pushed", "outcome", "uri"),
    [
        ([SERVICE, _spec_with("/pushed")], "success", "/pushed"),           # a change is applied
        ([{**SERVICE, "port": "eighty"}, SPEC], "rejected", "/*"),         # invalid: the old set stays
        ([SERVICE, SPEC], "unchanged", "/*"),                              # the same set: nothing to do
    ],
)
async def test_a_push_goes_through_validation_swap_and_last_known_good(
    tmp_path: Path, pushed: list[dict[str, object]], outcome: str, uri: str
) -> None:
    """A pushed set is validated, handed to on_change and persisted only if valid and new, like a poll."""
    settings = _settings(tmp_path, [{"file": "unused.yaml"}])
    applied: list[tuple[str, str]] = []
    outcomes: list[str] = []

    async def on_change(defs: definitions.Definitions, reason: str) -> None:
        applied.append((reason, defs.services[0].endpoints[0].uri))

    mgr = DefinitionsManager(settings, [WatchSource("watch", _docs(SERVICE, SPEC))], on_change=on_change,
                             on_outcome=lambda o, d: outcomes.append(o))
    first = await mgr.load_initial()
    assert await mgr.push(_docs(*pushed), "watch") == outcome
    assert mgr.current is not None and mgr.current.services[0].endpoints[0].uri == uri
    assert applied == ([("push from watch", uri)] if outcome == "success" else [])
    assert (mgr.current is first) == (outcome != "success")
    assert outcomes == ([] if outcome == "unchanged" else [outcome])
    saved = yaml.safe_load_all((settings.state_dir / LKG_NAME).read_text())
    assert [d for d in saved if d is not None][1]["endpoints"][0]["URI"] == uri


async def test_a_push_that_fails_to_apply_keeps_the_current_set(tmp_path: Path) -> None:
    """When on_change raises for a pushed set, the outcome is failed and the current set stays."""
    settings = _settings(tmp_path, [{"file": "unused.yaml"}])

    async def on_change(defs: definitions.Definitions, reason: str) -> None:
        raise RuntimeError("redirect refused")

    mgr = DefinitionsManager(settings, [WatchSource("watch", _docs(SERVICE, SPEC))], on_change=on_change)
    first = await mgr.load_initial()
    assert await mgr.push(_docs(SERVICE, _spec_with("/x")), "watch") == "failed"
    assert mgr.current is first


async def test_a_push_from_an_unknown_source_is_refused(tmp_path: Path) -> None:
    """Only a configured source may push; another origin is a ValueError."""
    mgr = DefinitionsManager(_settings(tmp_path, [{"file": "unused.yaml"}]), [WatchSource("watch", _docs(SERVICE, SPEC))])
    await mgr.load_initial()
    with pytest.raises(ValueError, match="elsewhere"):
        await mgr.push(_docs(SERVICE, SPEC), "elsewhere")


async def test_a_push_waits_for_the_other_sources_and_ends_last_known_good(tmp_path: Path) -> None:
    """Started from last-known-good, a push is held until every source was read, then applied, ending last-known-good."""
    settings = _settings(tmp_path, [{"file": "unused.yaml"}])
    await DefinitionsManager(settings, [WatchSource("watch", _docs(SERVICE, SPEC))]).load_initial()
    watch = WatchSource("watch", [], down=True)
    files = WatchSource("files", [], down=True)
    mgr = DefinitionsManager(settings, [files, watch])
    await mgr.load_initial()
    assert mgr.using_lkg
    assert await mgr.push(_docs(SERVICE, _spec_with("/new")), "watch") == "source_unavailable"
    assert mgr.current is not None and mgr.current.services[0].endpoints[0].uri == "/*"
    assert await mgr.push([], "files") == "success"
    assert mgr.current.services[0].endpoints[0].uri == "/new"
    assert not mgr.using_lkg
