"""The ``enforcer`` command line: parses arguments and calls the module that does the work.

Beside it: ``flows`` (read the flow log), ``doctor`` (check a running install), ``demo`` (a
local identity provider and app), ``localidp`` (the node OpenID Provider the demo and tests use).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from enforcer import __version__, policy
from enforcer.config import definitions as definitions_mod
from enforcer.config import issues
from enforcer.config import settings as settings_mod

DEFAULT_CONFIG = Path(os.environ.get("ENFORCER_CONFIG", "/etc/enforcer/enforcer.yaml"))


def _workers_arg(text: str) -> int | str:
    """``--workers``: a number, or ``auto`` (resolved and range-checked with the config)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'auto'") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="enforcer", description="Protect web apps with OpenID Connect and tag policies.")
    p.add_argument("--version", action="version", version=f"enforcer {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG, help="path to enforcer.yaml")

    run = sub.add_parser("run", help="run the daemon")
    with_config(run)
    run.add_argument("--log-level", default=os.environ.get("ENFORCER_LOG_LEVEL", "info"))
    run.add_argument(
        "--workers", type=_workers_arg, default=None,
        help="serving processes sharing the port, or 'auto' for one per usable CPU "
        "(overrides listen.workers; default 1)",
    )

    check = sub.add_parser("check", help="validate enforcer.yaml and every definition")
    with_config(check)

    doctor = sub.add_parser("doctor", help="check IdP, certificates, listener and nftables from this host")
    with_config(doctor)
    doctor.add_argument("--rules", action="store_true", help="only print the intended nftables ruleset")

    rules = sub.add_parser("rules", help="print the nftables ruleset this config installs (nft syntax)")
    with_config(rules)

    reload = sub.add_parser("reload", help="make the running daemon re-read its definitions now")
    with_config(reload)

    flows = sub.add_parser("flows", help="read the flow log")
    with_config(flows)
    flows.add_argument("--file", type=Path, help="flow log file (default: from the config)")
    flows.add_argument("--service")
    flows.add_argument("--user", help="sub or email")
    flows.add_argument("--denied", action="store_true", help="only requests that were not served")
    flows.add_argument("--since", help="10m, 2h, 1d or an ISO-8601 time")
    flows.add_argument("--follow", "-f", action="store_true")
    flows.add_argument("--json", action="store_true", help="one JSON record per line")
    flows.add_argument("--summary", action="store_true", help="counts by service, decision and reason")

    explain = sub.add_parser("explain", help="show which rule decides a request for given tags")
    with_config(explain)
    explain.add_argument("--service", required=True)
    explain.add_argument(
        "--tags", default=None, help="comma-separated tags, e.g. email=a@b.c,groups=admins; omit for an anonymous user"
    )
    explain.add_argument("method")
    explain.add_argument("path")

    certs_p = sub.add_parser("certs", help="certificate tools")
    certs_sub = certs_p.add_subparsers(dest="certs_command", required=True)
    export = certs_sub.add_parser("export-ca", help="print the local CA certificate (PEM)")
    with_config(export)

    demo = sub.add_parser("demo", help="local OpenID Provider + sample app + enforcer")
    demo.add_argument("--port", type=int, default=8443)
    demo.add_argument("--state-dir", type=Path, default=None)
    demo.add_argument("--exit-after", type=float, default=None, help=argparse.SUPPRESS)
    demo.add_argument(
        "--no-netns",
        action="store_true",
        help="stay on loopback even as root (root's default: client and app network namespaces + nftables)",
    )
    demo.add_argument("--netns-child", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except issues.ConfigError as exc:
        print(f"enforcer: configuration error ({len(exc.issues)} problem(s)):", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    match args.command:
        case "run":
            logging.basicConfig(
                level=args.log_level.upper(),
                stream=sys.stderr,
                format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            )
            from enforcer.run.main import run_forever  # noqa: PLC0415  (keep `check`/`flows` start-up light)

            try:
                return run_forever(args.config, args.workers)
            except OSError as exc:
                print(f"enforcer: cannot start: {exc}", file=sys.stderr)
                return 1
            except Exception as exc:
                redirect = sys.modules.get("enforcer.net.nftables")  # loaded only if the redirect is enabled
                if redirect is not None and isinstance(exc, redirect.RedirectError):
                    print(f"enforcer: cannot install the redirect: {exc}", file=sys.stderr)
                    return 1
                raise
        case "check":
            return _check(args.config)
        case "flows":
            return _flows(args)
        case "reload":
            return _reload(args.config)
        case "rules":
            return _rules(args.config)
        case "doctor":
            if args.rules:
                return _rules(args.config)
            return _doctor(args.config)
        case "explain":
            return _explain(args)
        case "certs":
            from enforcer.http import certs  # noqa: PLC0415

            settings = settings_mod.load_settings(args.config)
            sys.stdout.write(certs.CertStore(settings.state_dir).ca_pem().decode())
            return 0
        case "demo":
            from enforcer.cli import demo  # noqa: PLC0415

            return int(
                demo.main(
                    port=args.port,
                    state_dir=args.state_dir,
                    exit_after=args.exit_after,
                    netns=False if args.no_netns else None,
                    netns_child=args.netns_child,
                )
            )
    return 2


def _load_all_definitions(settings: settings_mod.Settings) -> definitions_mod.Definitions:
    """Every source, HTTP ones included, validated exactly as the daemon would."""
    import asyncio  # noqa: PLC0415

    import aiohttp  # noqa: PLC0415

    from enforcer.config import sources as definitions  # noqa: PLC0415

    async def load() -> definitions_mod.Definitions:
        async with aiohttp.ClientSession() as http:
            sources = definitions.build_sources(settings, http)
            docs = []
            for src in sources:
                try:
                    docs.extend(await src.poll() or [])
                except definitions.SourceError as exc:
                    raise issues.ConfigError(
                        [issues.ConfigIssue(str(settings.path), "definitions", f"source unreadable: {exc}")]
                    ) from None
            return definitions_mod.resolve_definitions(
                docs, settings.tags, allow_http_loopback_idp=settings.model.oidc.allowHttpLoopbackIssuer
            )

    return asyncio.run(load())


def _check(path: Path) -> int:
    settings = settings_mod.load_settings(path)
    definitions = _load_all_definitions(settings)
    print(f"{path}: OK")
    for svc in definitions.services:
        print(
            f"  service {svc.name}: hosts {', '.join(svc.hosts)}; exposedPort {svc.exposed_port} -> "
            f"{svc.upstream_host}:{svc.port}; {len(svc.endpoints)} endpoint(s) from {', '.join(svc.specs) or 'nothing'}"
        )
    for name in definitions.ignored:
        print(f"  service {name}: not for this enforcer (selectors do not match tags {list(settings.tags)})")
    for w in definitions.warnings:
        print(f"  warning: {w}")
    return 0


def _rules(path: Path) -> int:
    from enforcer.cli import doctor  # noqa: PLC0415

    settings = settings_mod.load_settings(path)
    ruleset = doctor.expected_ruleset(settings, _load_all_definitions(settings))
    if not settings.model.redirect.enabled:
        print("# redirect is disabled in this config (redirect: {enabled: false}); this is what it would install")
    sys.stdout.write(ruleset.render_nft())
    return 0


def _doctor(path: Path) -> int:
    import asyncio  # noqa: PLC0415

    from enforcer.cli import doctor  # noqa: PLC0415

    settings = settings_mod.load_settings(path)
    return asyncio.run(doctor.run(settings, _load_all_definitions(settings), sys.stdout))


def _reload(path: Path) -> int:
    import json  # noqa: PLC0415
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    admin = settings_mod.load_settings(path).model.admin
    host = f"[{admin.address}]" if ":" in admin.address else admin.address
    url = f"http://{host}:{admin.port}/reload"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=60) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read() or b"{}")
        print(f"enforcer reload: {body.get('outcome', exc.code)} (see the daemon's log for why)", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"enforcer reload: cannot reach the daemon at {url}: {exc}", file=sys.stderr)
        return 2
    print(f"reload: {body['outcome']}")
    return 0


def _flows(args: argparse.Namespace) -> int:
    from enforcer.cli import flows as flowlog  # noqa: PLC0415

    path = args.file
    if path is None:
        path = settings_mod.load_settings(args.config).flow_log
    try:
        since = flowlog.parse_since(args.since, datetime.now(UTC)) if args.since else None
    except ValueError as exc:
        print(f"enforcer flows: --since: {exc}", file=sys.stderr)
        return 2
    flt = flowlog.FlowFilter(service=args.service, user=args.user, denied=args.denied, since=since)
    return flowlog.flows_command(path, flt, follow=args.follow, as_json=args.json, summary=args.summary, out=sys.stdout)


def _explain(args: argparse.Namespace) -> int:
    settings = settings_mod.load_settings(args.config)
    definitions = _load_all_definitions(settings)
    service = definitions.get(args.service)
    if service is None:
        names = ", ".join(s.name for s in definitions.services) or "none"
        print(f"enforcer explain: no service {args.service!r} on this enforcer (services: {names})", file=sys.stderr)
        return 2
    try:
        path, _query = policy.canonical_path(args.path)
    except policy.PathError as exc:
        print(
            f"{args.method.upper()} {args.path}: rejected with {exc.status} ({exc.code}) before any rule",
            file=sys.stdout,
        )
        return 0
    tags = None if args.tags is None else frozenset(t.strip() for t in args.tags.split(",") if t.strip())
    decision = policy.decide(args.method.upper(), path, tags, service.table)
    print(policy.explain(decision, args.method.upper(), path, tags))
    return 0
