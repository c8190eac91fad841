"""``enforcer doctor``: every check against real parts on loopback.

A small OpenID Provider (discovery and JWKS over http://127.0.0.1, with a chosen ``Date``), a
TLS listener presenting a certificate from enforcer's own CertStore, an aiohttp admin endpoint
and a real config file.  Each test breaks one part of a healthy install and reads what doctor
prints.  The nftables read-back runs as root inside a network namespace of its own.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from aiohttp import web
from joserfc.jwk import RSAKey

from enforcer.cli import doctor
from enforcer.config import definitions as definitions_mod
from enforcer.config import settings as settings_mod
from enforcer.http import certs, tls
from enforcer.identity import crypto
from enforcer.net import nftables
from tests.harness.netns import NetnsLoop, ip, require_root
from tests.harness.seed import SERVICE, SPEC

SIGNING_KEY = RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig", "alg": "RS256"})
HOST = "app.example.com"  # the seed service's host
NAME = "private-app"  # the seed service's name


# ------------------------------------------------------------------ the parts doctor checks


@dataclass
class Idp:
    """Discovery and JWKS on http://127.0.0.1; ``date`` replaces the Date header of the JWKS answer."""

    date: str | None = None
    end_session: bool = True
    hang_head: bool = False
    port: int = 0
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _discovery(self, request: web.Request) -> web.Response:
        doc = {
            "issuer": self.issuer,
            "authorization_endpoint": self.issuer + "/authorize",
            "token_endpoint": self.issuer + "/token",
            "jwks_uri": self.issuer + "/jwks",
            "response_types_supported": ["code"],
        }
        if self.end_session:
            doc["end_session_endpoint"] = self.issuer + "/logout"
        return web.json_response(doc)

    async def _jwks(self, request: web.Request) -> web.Response:
        if request.method == "HEAD" and self.hang_head:
            await self._release.wait()
        headers = {"Date": self.date} if self.date is not None else {}
        return web.json_response({"keys": [SIGNING_KEY.as_dict(private=False)]}, headers=headers)


def free_port() -> int:
    """A loopback port nothing listens on (bound once, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mint_cert(state_dir: Path, *, issued: datetime, days: int = 90) -> certs.LeafPaths:
    """A leaf for the seed service from enforcer's own CA, as if issued at ``issued`` for ``days``."""
    store = certs.CertStore(state_dir, clock=lambda: issued, leaf_days=days, renew_before_days=0)
    return store.ensure_leaf(NAME, [HOST])


@dataclass
class Install:
    """A healthy install: IdP, TLS listener, admin endpoint, certificate and config in ``root``."""

    root: Path
    idp: Idp
    listen_port: int
    admin_port: int
    config: dict[str, Any] = field(default_factory=dict)
    service: dict[str, Any] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def write(self) -> Path:
        """Write enforcer.yaml and defs.yaml; return the path of enforcer.yaml."""
        (self.root / "defs.yaml").write_text(yaml.safe_dump_all([self.service, SPEC]))
        path = self.root / "enforcer.yaml"
        path.write_text(yaml.safe_dump(self.config))
        return path

    def load(self) -> tuple[settings_mod.Settings, definitions_mod.Definitions]:
        """The settings and definitions doctor would get from the CLI."""
        settings = settings_mod.load_settings(self.write())
        docs = definitions_mod.parse_documents((self.root / "defs.yaml").read_text(), "defs.yaml")
        assert isinstance(docs, list)
        return settings, definitions_mod.resolve_definitions(docs, settings.tags, allow_http_loopback_idp=True)

    async def doctor(self) -> tuple[int, str]:
        """Run every check; (exit code, what doctor printed)."""
        out = io.StringIO()
        settings, defs = self.load()
        code = await doctor.run(settings, defs, out)
        return code, out.getvalue()


def lines(output: str, level: str) -> list[str]:
    """The messages doctor printed at ``level`` (``ok``, ``warn`` or ``FAIL``)."""
    return [line[6:] for line in output.splitlines() if line.split("  ", 1)[0].strip() == level]


@pytest_asyncio.fixture
async def install(tmp_path: Path) -> AsyncIterator[Install]:
    """Everything up and configured; the redirect is off (its check is tested as root below)."""
    idp = Idp()
    await idp.start()
    state = tmp_path / "state"
    context = tls.server_ssl_context({NAME: mint_cert(state, issued=datetime.now(UTC))}, NAME)
    listener = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=context)
    admin_runner = web.AppRunner(web.Application(), access_log=None)
    await admin_runner.setup()
    admin_site = web.TCPSite(admin_runner, "127.0.0.1", 0)
    await admin_site.start()
    inst = Install(
        tmp_path,
        idp,
        listen_port=listener.sockets[0].getsockname()[1],
        admin_port=admin_site._server.sockets[0].getsockname()[1],  # type: ignore[union-attr]
    )
    inst.service = {**SERVICE, "OIDCProviderURL": idp.issuer}
    inst.config = {
        "tags": ["app=frontend"],
        "stateDir": str(state),
        "logsDir": str(tmp_path / "logs"),
        "definitions": [{"file": "defs.yaml"}],
        "listen": {"address": "127.0.0.1", "port": inst.listen_port},
        "admin": {"address": "127.0.0.1", "port": inst.admin_port},
        "oidc": {"allowHttpLoopbackIssuer": True, "leeway": "60s", "httpTimeout": "2s"},
    }
    try:
        yield inst
    finally:
        listener.close()
        await listener.wait_closed()
        await admin_runner.cleanup()
        await idp.stop()


# ------------------------------------------------------------------ the whole run


async def test_a_healthy_install_passes_with_only_the_redirect_warning(install: Install) -> None:
    """With IdP, certificate, listener and admin endpoint up, every check is ok and the exit code 0."""
    code, out = await install.doctor()
    assert code == 0, out
    ok = lines(out, "ok")
    assert ok[0] == f"configuration {install.root / 'enforcer.yaml'}: 1 service(s) for tags ['app=frontend']"
    assert f"service {NAME}: discovery and JWKS of {install.idp.issuer} (1 key(s)," in ok[1]
    # the IdP's Date header has a resolution of 1 s, so a loaded machine can measure up to about +-1 s
    skew = re.fullmatch(r"clock skew against the IdP ([+-]\d+\.\d) s \(leeway 60 s\)", ok[2])
    assert skew is not None and abs(float(skew.group(1))) <= 1.5, ok[2]
    assert ok[3].startswith(tuple(f"service {NAME}: certificate valid for {d} more day(s), until " for d in (89, 90)))
    assert ok[3].endswith(" UTC")
    assert ok[4:] == [
        f"TLS listener is accepting connections on 127.0.0.1:{install.listen_port}",
        f"admin endpoint is accepting connections on 127.0.0.1:{install.admin_port}",
    ]
    assert lines(out, "warn") == ["redirect is disabled: users must connect to the listener port directly"]
    assert lines(out, "FAIL") == []
    assert out.endswith("\n0 failure(s), 1 warning(s)\n")


async def test_the_cli_runs_the_same_checks_and_exits_1_on_a_failure(install: Install) -> None:
    """`enforcer doctor -c` prints the checks, a fix for each failure and exits 1 when the admin endpoint is down."""
    install.config["admin"]["port"] = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "enforcer", "doctor", "-c", str(install.write()),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    out = stdout.decode()
    assert proc.returncode == 1, (out, stderr.decode())
    assert f"admin endpoint on 127.0.0.1:{install.config['admin']['port']}: Connection refused" in out
    assert "fix: is the daemon running? journalctl -u enforcer" in out
    assert f"TLS listener is accepting connections on 127.0.0.1:{install.listen_port}" in out
    assert "\n1 failure(s), 1 warning(s)\n" in out


# ------------------------------------------------------------------ identity provider


def _http_date(offset: float) -> str:
    return email.utils.formatdate(time.time() + offset, usegmt=True)


async def test_an_unreachable_idp_fails_with_what_to_check(install: Install) -> None:
    """An IdP nobody answers for is a failure naming the error code and what to check."""
    install.service["OIDCProviderURL"] = f"http://127.0.0.1:{free_port()}"
    code, out = await install.doctor()
    assert code == 1
    [fail] = lines(out, "FAIL")
    assert fail.startswith(f"service {NAME}: identity provider {install.service['OIDCProviderURL']}: discovery_unreachable:")
    assert "fix: check OIDCProviderURL, DNS, the firewall towards the IdP and oidc.caFile" in out
    assert not any("clock skew" in line for line in lines(out, "ok"))


@pytest.mark.parametrize(("offset", "level", "pattern"), [
    (3600.0, "FAIL", r"clock skew against the IdP is \+360[01] s \(leeway 60 s\)"),
    (-3600.0, "FAIL", r"clock skew against the IdP is -(3599|3600) s \(leeway 60 s\)"),
    (-30.0, "ok", r"clock skew against the IdP -(29|30)\.\d s \(leeway 60 s\)"),
])
async def test_clock_skew_against_the_idp_date(install: Install, offset: float, level: str, pattern: str) -> None:
    """The IdP's Date header (whole seconds) is compared with this host's clock: beyond the leeway is a failure with a fix."""
    install.idp.date = _http_date(-offset)  # skew = our clock - the IdP's
    code, out = await install.doctor()
    assert any(re.fullmatch(pattern, line) for line in lines(out, level)), out
    assert code == (1 if level == "FAIL" else 0)
    if level == "FAIL":
        assert "fix: synchronise this host's clock (chrony/systemd-timesyncd)" in out


async def test_an_unreadable_idp_date_skips_the_skew_check(install: Install) -> None:
    """A Date header that is no HTTP date gives no skew line and no failure."""
    install.idp.date = "not a date"
    code, out = await install.doctor()
    assert code == 0, out
    assert "clock skew" not in out


async def test_an_idp_that_never_answers_head_does_not_hang_doctor(install: Install) -> None:
    """The skew check's HEAD request gives up after oidc.httpTimeout, so doctor still finishes."""
    install.idp.hang_head = True
    started = time.monotonic()
    code, out = await asyncio.wait_for(install.doctor(), 30)
    assert time.monotonic() - started < 15
    assert code == 0, out
    assert "clock skew" not in out


async def test_an_idp_without_end_session_is_a_warning(install: Install) -> None:
    """Without end_session_endpoint, logout can only be local: a warning, not a failure."""
    install.idp.end_session = False
    code, out = await install.doctor()
    assert code == 0
    assert f"service {NAME}: the IdP has no end_session_endpoint; logout is local only" in lines(out, "warn")


# ------------------------------------------------------------------ certificates


def _days_ago(days: int) -> datetime:
    """``days`` ago, plus an hour so whole days are not cut by the test's own run time."""
    return datetime.now(UTC) - timedelta(days=days) + timedelta(hours=1)


@pytest.mark.parametrize(("issued_days_ago", "level", "text"), [
    (85, "warn", f"service {NAME}: certificate expires in 5 day(s)"),
    (100, "FAIL", f"service {NAME}: certificate {{path}} expired 10 day(s) ago"),
])
async def test_certificates_close_to_or_past_their_end(
    install: Install, issued_days_ago: int, level: str, text: str
) -> None:
    """A 90-day certificate with under 14 days left is a warning; an expired one a failure."""
    old = mint_cert(install.root / "old", issued=_days_ago(issued_days_ago))
    path = install.state_dir / "certs" / f"{NAME}.crt"
    shutil.copyfile(old.cert, path)
    code, out = await install.doctor()
    [line] = [x for x in lines(out, level) if x.startswith(text.format(path=path) + " (")]
    assert line.endswith(" UTC)"), out
    assert code == (1 if level == "FAIL" else 0)


async def test_a_missing_certificate_is_a_warning(install: Install) -> None:
    """Before the daemon's first start there is no certificate: a warning saying it will be created."""
    path = install.state_dir / "certs" / f"{NAME}.crt"
    path.unlink()
    code, out = await install.doctor()
    assert code == 0
    assert f"service {NAME}: no certificate yet at {path}" in lines(out, "warn")


async def test_an_operator_certificate_is_the_one_checked(install: Install) -> None:
    """A service with TLSCertificate is checked against that file, not the self-issued one."""
    old = mint_cert(install.root / "old", issued=_days_ago(100))
    install.service["TLSCertificate"] = {"cert": str(old.cert), "key": str(old.key)}
    code, out = await install.doctor()
    assert code == 1
    [line] = lines(out, "FAIL")
    assert line.startswith(f"service {NAME}: certificate {old.cert} expired 10 day(s) ago (")


# ------------------------------------------------------------------ listener and admin endpoint


async def test_a_listener_that_is_down_fails_with_a_fix(install: Install) -> None:
    """Nothing on the listen port: a failure naming address, port and the error, with where to look."""
    port = free_port()
    install.config["listen"]["port"] = port
    code, out = await install.doctor()
    assert code == 1
    assert lines(out, "FAIL") == [f"TLS listener on 127.0.0.1:{port}: Connection refused"]
    assert "fix: is the daemon running? journalctl -u enforcer" in out


@pytest.mark.parametrize("address", ["0.0.0.0", "::"])
async def test_a_wildcard_listen_address_is_checked_on_loopback(install: Install, address: str) -> None:
    """A listener bound to every address is reached through 127.0.0.1."""
    install.config["listen"]["address"] = address
    code, out = await install.doctor()
    assert code == 0, out
    assert f"TLS listener is accepting connections on 127.0.0.1:{install.listen_port}" in lines(out, "ok")


# ------------------------------------------------------------------ the refresh-token key file


@pytest.mark.parametrize(
    ("content", "mode", "level", "needle", "fix"),
    [
        ("KEY\n", 0o600, "ok", "1 key(s), tokens are sealed with key ", None),
        (None, 0o600, "FAIL", "cannot read the key file: No such file or directory",
         "create it: (umask 077; head -c 32 /dev/urandom | base64 > "),
        ("AAAA\n", 0o600, "FAIL", "the key file holds no usable key: line 1: a key must be 32 bytes, got 3",
         "one base64 key of 32 bytes a line"),
        ("KEY\n", 0o644, "warn", "the key file is readable by every local user (", "chown root:enforcer-secrets "),
    ],
)
async def test_refresh_token_key_file(
    install: Install, content: str | None, mode: int, level: str, needle: str, fix: str | None
) -> None:
    """The key file is checked as the daemon loads it: missing or without a usable key is a
    failure, readable by every local user a warning, each naming the key path, the file and
    the fix; a good one is ok with its number of keys and the sealing key's id."""
    keys = install.root / "refresh.keys"
    if content is not None:
        keys.write_text(content.replace("KEY", crypto.new_key_line()))
        keys.chmod(mode)
    install.config["sessions"] = {"refreshTokenKeyFile": str(keys)}
    code, out = await install.doctor()
    [line] = [x for x in lines(out, level) if x.startswith(f"sessions.refreshTokenKeyFile {keys}: ") and needle in x]
    if fix is not None:
        assert f"fix: {fix}" in out.split(line, 1)[1].split("\n")[1], out
    assert code == (1 if level == "FAIL" else 0)


async def test_offline_access_without_a_key_file_is_a_warning(install: Install) -> None:
    """A service asking offline_access with no key file set: a warning that no refresh token is kept."""
    install.service["OIDCScopes"] = ["openid", "email", "offline_access"]
    code, out = await install.doctor()
    assert code == 0, out
    assert ("sessions.refreshTokenKeyFile: service 'private-app' asks offline_access, but no key file is set: "
            "no refresh token will be kept and its claims are never renewed") in lines(out, "warn")


# ------------------------------------------------------------------ nftables (root, own namespace)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, empty network namespace, deleted afterwards."""
    require_root()
    name = f"enf-doctor-{os.getpid()}"
    ip("netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


async def _check_redirect_in(netns: str, install: Install) -> tuple[doctor.Report, str]:
    """doctor's nftables check, run on a thread inside ``netns``."""
    install.config["redirect"] = {"enabled": True, "table": "enforcer"}
    settings, defs = install.load()
    out = io.StringIO()
    report = doctor.Report(out)
    loop = NetnsLoop(netns)
    try:
        await loop.run(doctor._check_redirect(report, settings, defs))
    finally:
        loop.close()
    return report, out.getvalue()


@pytest.mark.root
async def test_nftables_table_that_matches_is_ok_and_printed(install: Install, netns: str) -> None:
    """The table installed from this config reads back equal: ok, with rule and packet counts, and the table."""
    install.config["redirect"] = {"enabled": True, "table": "enforcer"}
    settings, defs = install.load()
    expected = doctor.expected_ruleset(settings, defs)
    await nftables.apply(expected, netns=netns)
    report, out = await _check_redirect_in(netns, install)
    assert report.failures == 0, out
    assert lines(out, "ok") == [
        f"nftables table inet enforcer matches the configuration ({len(expected.rules)} rules, 0 packets so far)"
    ]
    table = out.split("\n", 1)[1]
    assert "table inet enforcer {" in table
    for rule in expected.rules:  # nft syntax, counters filled in, not raw netlink expressions
        assert rule.text.replace("counter", "counter packets 0 bytes 0") in table
    assert "[ " not in table


@pytest.mark.root
async def test_nftables_table_missing_or_different_fails(install: Install, netns: str) -> None:
    """No table, or one built for another listener port, is a failure listing the differences and a fix."""
    report, out = await _check_redirect_in(netns, install)
    assert report.failures == 1
    assert "table inet enforcer is missing (the redirect is not installed)" in out
    assert "fix: systemctl reload enforcer (or restart it)" in out

    install.config["listen"]["port"] = install.listen_port + 1
    settings, defs = install.load()
    await nftables.apply(doctor.expected_ruleset(settings, defs), netns=netns)
    install.config["listen"]["port"] = install.listen_port
    report, out = await _check_redirect_in(netns, install)
    assert report.failures == 1
    assert "nftables table inet enforcer differs from the configuration" in out
    assert "differs" in out.split("configuration:", 1)[1]
    assert "# handle " in out and ", not from this configuration: [ " in out  # shown, never dressed as nft text
