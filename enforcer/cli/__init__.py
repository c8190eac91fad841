"""The ``enforcer`` command line: parses arguments and calls the subcommand's module.

Each subcommand is a module of its own, loaded only when it is chosen (as git and pip do), so
``enforcer flows`` or ``check`` never load the daemon: ``run`` (the daemon), ``check`` (validate
config and definitions; ``explain`` beside it), ``flows`` (read the flow log), ``doctor`` (check a
running install; also ``rules``; ``--pod``: one pod of pod mode, ``doctor_pod``), ``reload``, ``block`` /
``unblock`` (close the protected ports at boot / open them without the daemon; ``journal`` tells
the system journal), ``certs``, ``demo`` (a local identity provider and app), ``localidp`` (the
node OpenID Provider the demo and tests use).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from enforcer import __version__
from enforcer.config import issues

DEFAULT_CONFIG = Path(os.environ.get("ENFORCER_CONFIG", "/etc/enforcer/enforcer.yaml"))


def _workers_arg(text: str) -> int | str:
    """``--workers``: a number, or ``auto`` (resolved and range-checked with the config)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'auto'") from None


def _pod_arg(text: str) -> tuple[str, str]:
    """``doctor --pod``: ``NAMESPACE/NAME``."""
    namespace, sep, name = text.strip().partition("/")
    if not (sep and namespace and name) or "/" in name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAMESPACE/NAME, e.g. shop/frontend-5d8c9-abcde")
    return namespace, name


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
    doctor.add_argument(
        "--pod", type=_pod_arg, default=None, metavar="NAMESPACE/NAME",
        help="pod mode: check one pod of this node (selection, its network namespace, its table, the listener "
        "and app port inside it)",
    )

    rules = sub.add_parser("rules", help="print the nftables ruleset this config installs (nft syntax)")
    with_config(rules)

    reload = sub.add_parser("reload", help="make the running daemon re-read its definitions now")
    with_config(reload)

    block = sub.add_parser(
        "block", help="close the protected ports without the daemon (boot: before the network is up)"
    )
    with_config(block)
    block.add_argument(
        "--from-state", action="store_true", required=True,
        help="from the last-known-good definitions in the state directory",
    )

    unblock = sub.add_parser(
        "unblock", help="remove the redirect table a stop or boot left: the app ports answer without the enforcer"
    )
    with_config(unblock)
    unblock.add_argument("--force", action="store_true", help="even while an enforcer is running")
    unblock.add_argument("--by", default="`enforcer unblock`", help=argparse.SUPPRESS)

    flows = sub.add_parser("flows", help="read the flow log")
    with_config(flows)
    flows.add_argument("--file", type=Path, help="flow log file (default: from the config)")
    flows.add_argument("--service")
    flows.add_argument("--user", help="sub or email")
    flows.add_argument("--id", help="only the record of this flow id (X-Enforcer-Flow, or the error page)")
    flows.add_argument(
        "--denied", action="store_true", help="only requests that were not served (login challenges not included)"
    )
    flows.add_argument("--logins", action="store_true", help="only login challenges (redirects to sign in, 401s)")
    flows.add_argument("--since", help="10m, 2h, 1d or an ISO-8601 time")
    flows.add_argument("--follow", "-f", action="store_true")
    flows.add_argument("--json", action="store_true", help="one JSON record per line")
    flows.add_argument("--summary", action="store_true", help="counts by service, decision and reason")

    explain = sub.add_parser(
        "explain", help="show which rule decides a request for given tags, or replay a logged flow (--flow)"
    )
    with_config(explain)
    explain.add_argument("--service", help="the service (not with --flow: the record names it)")
    explain.add_argument(
        "--tags", default=None, help="comma-separated tags, e.g. email=a@b.c,groups=admins; omit for an anonymous user"
    )
    explain.add_argument(
        "--flow", default=None, metavar="FLOW_ID",
        help="replay the decision of this flow record (the id on the page, X-Enforcer-Flow); with --tags, "
        "check them against the user's recorded tags fingerprint",
    )
    explain.add_argument("--file", type=Path, help="flow log file for --flow (default: from the config)")
    explain.add_argument("method", nargs="?")
    explain.add_argument("path", nargs="?")

    certs_p = sub.add_parser("certs", help="certificate tools")
    certs_sub = certs_p.add_subparsers(dest="certs_command", required=True)
    export = certs_sub.add_parser("export-ca", help="print the local CA certificate (PEM)")
    with_config(export)

    demo = sub.add_parser("demo", help="local OpenID Provider + sample app + enforcer")
    demo.add_argument("--port", type=int, default=8443, help="the enforcer's port (default 8443)")
    demo.add_argument(
        "--idp-port", type=int, default=9443, help="the identity provider's port on loopback (default 9443)"
    )
    demo.add_argument(
        "--kill-enforcer", action="store_true", help="SIGKILL a running demo's enforcer (it comes back)"
    )
    demo.add_argument(
        "--restart-after", type=float, default=30.0, help="seconds until a killed enforcer comes back (default 30)"
    )
    demo.add_argument("--state-dir", type=Path, default=None)
    demo.add_argument("--exit-after", type=float, default=None, help=argparse.SUPPRESS)
    demo.add_argument(
        "--no-netns",
        action="store_true",
        help="stay on loopback even as root (root's default: client and app network namespaces + nftables)",
    )
    demo.add_argument("--netns-child", action="store_true", help=argparse.SUPPRESS)
    demo.add_argument("--forward", action="append", help=argparse.SUPPRESS)
    return p


COMMANDS: dict[str, str] = {
    "run": "enforcer.cli.run:command",
    "check": "enforcer.cli.check:command",
    "explain": "enforcer.cli.check:explain",
    "flows": "enforcer.cli.flows:command",
    "doctor": "enforcer.cli.doctor:command",
    "rules": "enforcer.cli.doctor:rules",
    "reload": "enforcer.cli.reload:command",
    "block": "enforcer.cli.block:command",
    "unblock": "enforcer.cli.unblock:command",
    "certs": "enforcer.cli.certs:command",
    "demo": "enforcer.cli.demo:command",
}
"""Subcommand -> ``module:function`` that runs it with the parsed arguments."""


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    module, _, function = COMMANDS[name].partition(":")
    run: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), function)
    return run


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _command(args.command)(args)
    except issues.ConfigError as exc:
        print(f"enforcer: configuration error ({len(exc.issues)} problem(s)):", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
