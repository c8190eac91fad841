"""The attachment seam: the host attachment's socket, redirect swap, undo and stop, and the daemon's set."""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from enforcer.config import definitions
from enforcer.config import settings as settings_mod
from enforcer.config.definitions import parse_documents, resolve_definitions
from enforcer.http.tls import make_listen_socket
from enforcer.net import nftables
from enforcer.net.sockopt import SO_MARK
from enforcer.run.attach import Attachment, HostAttachment, SocketFactory, Undo, build_redirect
from enforcer.run.daemon import Daemon
from tests.harness.redirector import FakeRedirector
from tests.harness.seed import SERVICE, SPEC


def _settings(tmp_path: Path, redirect: dict[str, object]) -> settings_mod.Settings:
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(yaml.safe_dump({
        "tags": ["app=frontend"], "stateDir": "state", "logsDir": "logs", "definitions": [{"file": "d.yaml"}],
        "redirect": redirect,
    }))
    return settings_mod.load_settings(cfg)


def _definitions(*, port: int = 80) -> definitions.Definitions:
    parsed = parse_documents(yaml.safe_dump_all([{**SERVICE, "port": port}, SPEC]), "d.yaml")
    assert isinstance(parsed, list)
    return resolve_definitions(parsed, ("app=frontend",))


def _host(tmp_path: Path, redirect: dict[str, object], *, manages: bool = True) -> tuple[HostAttachment, FakeRedirector]:
    fake = FakeRedirector()
    attachment = HostAttachment(
        _settings(tmp_path, redirect), manages_redirect=manages,
        listen_socket=make_listen_socket("127.0.0.1", 0), redirector=fake,
    )
    attachment.open()
    return attachment, fake


def test_host_attachment_is_an_attachment(tmp_path: Path) -> None:
    """HostAttachment implements the Attachment protocol, named "host", adopting the socket it was given."""
    attachment: Attachment
    attachment, _ = _host(tmp_path, {"enabled": True})
    try:
        assert attachment.name == "host"
        assert attachment.listen_port == attachment.open().getsockname()[1] != 0
    finally:
        attachment.close()


async def test_apply_installs_then_replaces_only_on_change_and_undo_restores(tmp_path: Path) -> None:
    """The first apply installs the ruleset; the same set again is a no-op; a change replaces it; undo puts it back."""
    host, fake = _host(tmp_path, {"enabled": True})
    try:
        first = build_redirect(_definitions(), host.settings, host.listen_port)
        await host.apply(_definitions())
        assert fake.applied == [first] and host.ruleset == first
        await (await host.apply(_definitions()))()
        assert fake.applied == [first]
        undo = await host.apply(_definitions(port=81))
        second = build_redirect(_definitions(port=81), host.settings, host.listen_port)
        assert fake.applied == [first, second] and host.ruleset == second
        await undo()
        assert fake.applied == [first, second, first] and host.ruleset == first
    finally:
        host.close()


async def test_a_refused_ruleset_keeps_the_old_one(tmp_path: Path) -> None:
    """When nftables refuses the new ruleset, apply raises and the attachment still holds the old one."""
    host, fake = _host(tmp_path, {"enabled": True})
    try:
        await host.apply(_definitions())
        old = host.ruleset
        fake.refuse = True
        with pytest.raises(nftables.RedirectError):
            await host.apply(_definitions(port=81))
        assert host.ruleset is old
    finally:
        host.close()


@pytest.mark.parametrize(
    ("redirect", "manages"),
    [
        ({"enabled": False}, True),  # redirect off (development, tests)
        ({"enabled": True}, False),  # a worker process: the primary owns the redirect
    ],
)
async def test_no_redirect_work_without_the_redirect(tmp_path: Path, redirect: dict[str, object], manages: bool) -> None:
    """With the redirect off, or in a worker, apply and remove never touch nftables."""
    host, fake = _host(tmp_path, redirect, manages=manages)
    try:
        await (await host.apply(_definitions()))()
        await host.remove()
        assert (fake.applied, fake.removed, host.ruleset) == ([], [], None)
    finally:
        host.close()


def _flows(host: HostAttachment) -> list[dict[str, object]]:
    path = host.settings.flow_log
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize(
    ("redirect", "removed", "reason", "said"),
    [
        ({"enabled": True}, [], "ports_blocked", "kept: exposed port(s) 443; app port(s) 80"),  # the default
        ({"enabled": True, "keepBlockOnStop": True}, [], "ports_blocked", "kept"),
        ({"enabled": True, "keepBlockOnStop": False}, ["enforcer"], "ports_unblocked", "removed"),  # opt-in
    ],
)
async def test_stop_keeps_the_table_unless_opted_out_and_says_so(
    tmp_path: Path, redirect: dict[str, object], removed: list[str], reason: str, said: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A clean stop keeps the whole table by default (exposed ports refuse, app ports blocked) and removes it only with keepBlockOnStop: false; the log and one lifecycle flow record say which."""
    host, fake = _host(tmp_path, redirect)
    try:
        await host.apply(_definitions())
        fake.applied.clear()
        with caplog.at_level(logging.WARNING):
            await host.remove()
        assert (fake.applied, fake.removed) == ([], removed)
        [flow] = _flows(host)
        assert (flow["method"], flow["decision"], flow["reason"]) == ("STOP", "lifecycle", reason)
        assert said in str(flow["endpoint"])
        assert ("kept" if not removed else "removed at stop") in caplog.text
    finally:
        host.close()


async def test_remove_logs_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A stop whose table removal is refused logs an error and returns."""
    host, fake = _host(tmp_path, {"enabled": True, "keepBlockOnStop": False})
    try:
        await host.apply(_definitions())
        fake.refuse = True
        with caplog.at_level(logging.ERROR):
            await host.remove()
        assert "could not remove the redirect table" in caplog.text
        assert _flows(host) == []  # nothing was opened
    finally:
        host.close()


def test_outgoing_sockets_carry_the_mark_only_with_the_redirect(tmp_path: Path) -> None:
    """With the redirect on, outgoing sockets get SO_MARK (even in a worker); with it off there is no factory."""
    off, _ = _host(tmp_path, {"enabled": False})
    worker, _ = _host(tmp_path, {"enabled": True, "mark": 0x1234}, manages=False)
    try:
        assert off.socket_factory() is None
        make = worker.socket_factory()
        assert make is not None
        with make((socket.AF_INET, socket.SOCK_STREAM, 0, "", ("127.0.0.1", 1))) as sock:
            assert sock.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0x1234
    finally:
        off.close()
        worker.close()


@dataclass
class FakeAttachment:
    """An attachment that records its calls; refuses its apply when told to."""

    name: str
    refuse: bool = False
    calls: list[str] = field(default_factory=list)

    @property
    def listen_port(self) -> int:
        return 0

    def open(self) -> socket.socket:
        raise AssertionError("not opened in this test")

    async def apply(self, definitions: definitions.Definitions) -> Undo:
        if self.refuse:
            raise nftables.RedirectError(f"{self.name} refused")
        self.calls.append("apply")

        async def undo() -> None:
            self.calls.append("undo")

        return undo

    async def remove(self) -> None:
        self.calls.append("remove")

    def close(self) -> None:
        self.calls.append("close")

    def socket_factory(self) -> SocketFactory | None:
        return None


async def test_a_reload_refused_by_one_attachment_undoes_the_others(tmp_path: Path) -> None:
    """When one attachment refuses a new set, the daemon puts back those already replaced and the reload fails."""
    first, second = FakeAttachment("first"), FakeAttachment("second", refuse=True)
    daemon = Daemon(_settings(tmp_path, {"enabled": True}), attachments=[first, second])
    with pytest.raises(nftables.RedirectError, match="second refused"):
        await daemon._apply(_definitions(), "test")
    assert first.calls == ["apply", "undo"]
    assert second.calls == []
