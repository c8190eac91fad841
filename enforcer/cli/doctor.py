"""``enforcer doctor``: check, from this host, everything a working enforcer depends on.

Each check prints one line (``ok`` / ``warn`` / ``FAIL``) and what to do about a failure:
configuration, IdP discovery and JWKS (with clock skew against the IdP's ``Date``),
certificates and their expiry (in UTC), the listener and admin endpoint, the nftables
table read back over netlink, compared with the intended one and printed in nft syntax (with
packet counters), a Redis session store (``sessions.store: redis``) and the refresh-token key
file (``sessions.refreshTokenKeyFile``).
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

import aiohttp
from cryptography import x509

from enforcer.cli.check import KEY_FILE, load_all_definitions, refresh_key_findings
from enforcer.config import definitions as definitions_mod
from enforcer.config import settings as settings_mod
from enforcer.identity import crypto, oidc, tokens
from enforcer.net import nftables, ruleset
from enforcer.run.daemon import build_redirect
from enforcer.run.stores import check_session_store


@dataclass
class Report:
    """Check results, printed as they come."""

    out: TextIO
    failures: int = 0
    warnings: int = 0
    lines: list[str] = field(default_factory=list)

    def ok(self, what: str) -> None:
        self._say("ok  ", what)

    def warn(self, what: str, fix: str = "") -> None:
        self.warnings += 1
        self._say("warn", what, fix)

    def fail(self, what: str, fix: str = "") -> None:
        self.failures += 1
        self._say("FAIL", what, fix)

    def _say(self, level: str, what: str, fix: str = "") -> None:
        line = f"{level}  {what}" + (f"\n      fix: {fix}" if fix else "")
        self.lines.append(line)
        print(line, file=self.out, flush=True)


def expected_ruleset(settings: settings_mod.Settings, definitions: definitions_mod.Definitions) -> ruleset.Ruleset:
    """The table the daemon would install for this config."""
    return build_redirect(definitions, settings, settings.model.listen.port)


async def _check_idp(
    report: Report, settings: settings_mod.Settings, svc: definitions_mod.Service, http: aiohttp.ClientSession
) -> None:
    ca = svc.idp_ca_file or settings.model.oidc.caFile
    provider = oidc.Provider(
        issuer=svc.issuer,
        http=http,
        ssl_context=oidc.client_ssl_context(str(ca) if ca else None),
        timeout=settings.model.oidc.httpTimeout,
        allow_http_loopback=settings.model.oidc.allowHttpLoopbackIssuer,
    )
    started = time.monotonic()
    try:
        metadata = await provider.discover()
    except tokens.OIDCError as exc:
        report.fail(
            f"service {svc.name}: identity provider {svc.issuer}: {exc.code}: {exc.detail}",
            "check OIDCProviderURL, DNS, the firewall towards the IdP and oidc.caFile",
        )
        return
    ms = (time.monotonic() - started) * 1000
    keys = len(provider.keys)
    report.ok(f"service {svc.name}: discovery and JWKS of {metadata.issuer} ({keys} key(s), {ms:.0f} ms)")
    if metadata.end_session_endpoint is None:
        report.warn(f"service {svc.name}: the IdP has no end_session_endpoint; logout is local only")
    try:
        async with http.head(
            metadata.jwks_uri,
            ssl=provider.ssl_context or True,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=settings.model.oidc.httpTimeout),
        ) as resp:
            date = resp.headers.get("Date")
        if date:
            skew = time.time() - email.utils.parsedate_to_datetime(date).timestamp()
            leeway = settings.model.oidc.leeway
            if abs(skew) > leeway:
                report.fail(
                    f"clock skew against the IdP is {skew:+.0f} s (leeway {leeway:.0f} s)",
                    "synchronise this host's clock (chrony/systemd-timesyncd)",
                )
            else:
                report.ok(f"clock skew against the IdP {skew:+.1f} s (leeway {leeway:.0f} s)")
    except (aiohttp.ClientError, TimeoutError, ValueError, TypeError):
        pass


def _check_certs(report: Report, settings: settings_mod.Settings, definitions: definitions_mod.Definitions) -> None:
    now = datetime.now(UTC)
    for svc in definitions.services:
        path = svc.tls.cert if svc.tls else settings.state_dir / "certs" / f"{svc.name}.crt"
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            report.warn(f"service {svc.name}: no certificate yet at {path}", "it is created when the daemon starts")
            continue
        days = (cert.not_valid_after_utc - now).days
        until = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
        if days < 0:
            report.fail(f"service {svc.name}: certificate {path} expired {-days} day(s) ago ({until})",
                        "restart the daemon")
        elif days < 14:
            report.warn(f"service {svc.name}: certificate expires in {days} day(s) ({until})")
        else:
            report.ok(f"service {svc.name}: certificate valid for {days} more day(s), until {until}")


def _check_port(report: Report, what: str, host: str, port: int) -> None:
    target = "127.0.0.1" if host in ("::", "0.0.0.0") else host  # noqa: S104  (a bind address, compared)
    try:
        with socket.create_connection((target, port), timeout=2):
            report.ok(f"{what} is accepting connections on {target}:{port}")
    except OSError as exc:
        report.fail(
            f"{what} on {target}:{port}: {exc.strerror or exc}", "is the daemon running? journalctl -u enforcer"
        )


async def _check_redirect(
    report: Report, settings: settings_mod.Settings, definitions: definitions_mod.Definitions
) -> None:
    r = settings.model.redirect
    if not r.enabled:
        report.warn(
            "redirect is disabled: users must connect to the listener port directly",
            "set redirect: {enabled: true} in enforcer.yaml",
        )
        return
    expected = expected_ruleset(settings, definitions)
    try:
        live = await nftables.read_live(r.table)
    except (OSError, ruleset.RedirectError) as exc:
        report.fail(f"cannot read nftables: {exc}", "run doctor as root (CAP_NET_ADMIN)")
        return
    problems = nftables.diff(expected, live)
    if problems:
        report.fail(
            f"nftables table inet {r.table} differs from the configuration:\n        " + "\n        ".join(problems),
            "systemctl reload enforcer (or restart it)",
        )
    else:
        packets = sum(rule.packets or 0 for rule in live.rules)
        report.ok(
            f"nftables table inet {r.table} matches the configuration ({len(live.rules)} rules, "
            f"{packets} packets so far)"
        )
    print(f"live table (nft syntax; `nft list table inet {r.table}` shows the same):", file=report.out)
    print(live.render_nft(expected), file=report.out)


async def _check_sessions(report: Report, settings: settings_mod.Settings) -> None:
    """With ``sessions.store: redis``: connect, authenticate and use every right the daemon needs
    (probe keys, its scripts, its revocation channel), as the daemon would."""
    answer = await check_session_store(settings.model)
    if answer is None:
        return
    r = settings.model.sessions.redis
    where, prefix = ((r.url or ", ".join(r.sentinels)), r.keyPrefix) if r is not None else ("?", "")
    if answer == "ok":
        report.ok(f"session store Redis {where}: reachable; the ACL user has every right the daemon uses "
                  f"(keys {prefix}*, its commands and scripts, publish and subscribe on {prefix}revoked)")
    else:
        report.fail(f"session store Redis {where}: {answer}",
                    "check sessions.redis (url or sentinels, username, passwordFile, caFile) and Redis' ACL")


def _check_refresh_keys(report: Report, settings: settings_mod.Settings,
                        definitions: definitions_mod.Definitions) -> None:
    """``sessions.refreshTokenKeyFile``: readable, usable keys, not readable by others; and a
    key file for every service that asks ``offline_access`` (see :func:`refresh_key_findings`)."""
    errors, warnings = refresh_key_findings(settings, definitions)
    for issue in errors:
        report.fail(f"{issue.path} {issue.value}: {issue.message}", issue.fix)
    for issue in warnings:
        report.warn(f"{issue.path}" + (f" {issue.value}" if issue.value is not None else "") + f": {issue.message}",
                    issue.fix)
    path = settings.model.sessions.refreshTokenKeyFile
    if path is not None and not errors:
        keys = crypto.parse_keys(path.read_text(encoding="ascii"))
        report.ok(f"{KEY_FILE} {path}: {len(keys)} key(s), tokens are sealed with key {crypto.key_id(keys[0])}")


async def run(settings: settings_mod.Settings, definitions: definitions_mod.Definitions, out: TextIO) -> int:
    """All checks; exit code 1 if any failed."""
    report = Report(out)
    report.ok(f"configuration {settings.path}: {len(definitions.services)} service(s) for tags {list(settings.tags)}")
    for w in definitions.warnings:
        report.warn(w)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        await asyncio.gather(*(_check_idp(report, settings, svc, http) for svc in definitions.services))
    _check_certs(report, settings, definitions)
    _check_port(report, "TLS listener", settings.model.listen.address, settings.model.listen.port)
    _check_port(report, "admin endpoint", settings.model.admin.address, settings.model.admin.port)
    await _check_redirect(report, settings, definitions)
    await _check_sessions(report, settings)
    _check_refresh_keys(report, settings, definitions)
    print(f"\n{report.failures} failure(s), {report.warnings} warning(s)", file=out)
    return 1 if report.failures else 0


def rules(args: argparse.Namespace) -> int:
    """``enforcer rules`` (and ``doctor --rules``): the nftables ruleset this config installs, in nft syntax."""
    settings = settings_mod.load_settings(args.config)
    intended = expected_ruleset(settings, load_all_definitions(settings))
    if not settings.model.redirect.enabled:
        print("# redirect is disabled in this config (redirect: {enabled: false}); this is what it would install")
    sys.stdout.write(intended.render_nft())
    return 0


def command(args: argparse.Namespace) -> int:
    """``enforcer doctor``: check IdP, certificates, listener and nftables from this host."""
    if args.rules:
        return rules(args)
    if getattr(args, "pod", None) is not None:
        from enforcer.cli import doctor_pod  # noqa: PLC0415 (the Kubernetes client: only with --pod)

        return doctor_pod.command(args)
    settings = settings_mod.load_settings(args.config)
    return asyncio.run(run(settings, load_all_definitions(settings), sys.stdout))
