"""``enforcer check`` and ``explain``: validate the config and every definition as the daemon would."""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp

from enforcer import policy
from enforcer.config import definitions as definitions_mod
from enforcer.config import issues, sources
from enforcer.config import settings as settings_mod
from enforcer.errors import Outcome
from enforcer.flow import tags_fingerprint


def load_all_definitions(settings: settings_mod.Settings) -> definitions_mod.Definitions:
    """Every source, HTTP ones included, validated exactly as the daemon would."""

    async def load() -> definitions_mod.Definitions:
        async with aiohttp.ClientSession() as http:
            docs = []
            for src in sources.build_sources(settings, http):
                try:
                    docs.extend(await src.poll() or [])
                except sources.SourceError as exc:
                    raise issues.ConfigError(
                        [issues.ConfigIssue(str(settings.path), "definitions", f"source unreadable: {exc}")]
                    ) from None
            return definitions_mod.resolve_definitions(
                docs, settings.tags, allow_http_loopback_idp=settings.model.oidc.allowHttpLoopbackIssuer
            )

    return asyncio.run(load())


def command(args: argparse.Namespace) -> int:
    path = args.config
    settings = settings_mod.load_settings(path)
    definitions = load_all_definitions(settings)
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


def explain(args: argparse.Namespace) -> int:
    """``enforcer explain``: which rule decides a request for given tags (or, with ``--flow``,
    the replay of a logged flow: :func:`explain_flow`)."""
    settings = settings_mod.load_settings(args.config)
    if args.flow is not None:
        return explain_flow(args, settings)
    if args.service is None or args.method is None or args.path is None:
        print("enforcer explain: give --service, a method and a path, or --flow FLOW_ID", file=sys.stderr)
        return 2
    definitions = load_all_definitions(settings)
    service = definitions.get(args.service)
    if service is None:
        names = ", ".join(s.name for s in definitions.services) or "none"
        print(f"enforcer explain: no service {args.service!r} on this enforcer (services: {names})", file=sys.stderr)
        return 2
    try:
        path, _query = policy.canonical_path(args.path)
    except policy.PathError as exc:
        print(f"{args.method.upper()} {args.path}: rejected with {exc.status} ({exc.code}) before any rule")
        return 0
    tags = _tags_arg(args.tags)
    decision = policy.decide(args.method.upper(), path, tags, service.table)
    print(policy.explain(decision, args.method.upper(), path, tags))
    return 0


def _tags_arg(text: str | None) -> frozenset[str] | None:
    return None if text is None else frozenset(t.strip() for t in text.split(",") if t.strip())


POLICY_DECISIONS = frozenset({Outcome.ALLOW.value, Outcome.DENY.value, Outcome.LOGIN.value})
"""Decisions the policy made (the rest were answered before it, or by the login endpoints)."""


def explain_flow(args: argparse.Namespace, settings: settings_mod.Settings) -> int:
    """``enforcer explain --flow ID``: the flow's record as logged, then its decision replayed
    with today's definitions.  The record holds no tags, only a fingerprint: a deny is replayed
    for a user with none of the tags (which shows the rule and the tag sets it asks for), or with
    ``--tags``, checked against the fingerprint, for the user's own."""
    from enforcer.cli import flows as flows_mod  # noqa: PLC0415 (only this subcommand reads the log)

    path = args.file if args.file is not None else settings.flow_log
    if not path.exists():
        print(f"enforcer explain: {path}: no such flow log (check flowLog.path, or pass --file)", file=sys.stderr)
        return 2
    rows = list(flows_mod.read_flows(path, flows_mod.FlowFilter(flow_id=args.flow)))
    if not rows:
        print(f"enforcer explain: no flow {args.flow} in {path}", file=sys.stderr)
        return 1
    row = rows[-1]
    print(f"flow {args.flow} as recorded in {path}:")
    flows_mod.format_record(row, sys.stdout)
    print()
    decision, reason = row.get("decision"), row.get("reason")
    if decision not in POLICY_DECISIONS:
        print(f"not a policy decision: the enforcer answered it itself with reason {reason!r}; "
              "see README, Troubleshooting, Reason codes")
        return 0
    definitions = load_all_definitions(settings)
    service = definitions.get(str(row.get("service")))
    if service is None:
        print(f"service {row.get('service')!r} is no longer on this enforcer: nothing to replay")
        return 0
    method, flow_path = str(row.get("method")), str(row.get("path"))
    tags = _tags_arg(args.tags)
    recorded_fp = row.get("tags_fp")
    if tags is not None:
        given_fp = tags_fingerprint(tags)
        if recorded_fp is None:
            print("the record keeps no tags fingerprint: replaying with the tags given")
        elif given_fp == recorded_fp:
            print(f"the tags given are the user's tags at the time (fingerprint {recorded_fp})")
        else:
            print(f"warning: the tags given are NOT the user's tags at the time "
                  f"(fingerprint {given_fp}, recorded {recorded_fp})")
    elif decision == Outcome.LOGIN.value:
        tags = None  # anonymous, as it was
    else:
        tags = frozenset()
        print("replaying for a signed-in user with none of the tags (pass --tags to replay with the user's own)")
    replay = policy.decide(method, flow_path, tags, service.table)
    print(policy.explain(replay, method, flow_path, tags), end="")
    recorded_sets = row.get("would_allow")
    if isinstance(recorded_sets, list) and replay.would_allow:
        now_sets = sorted(sorted(s) for s in replay.would_allow)
        if now_sets == sorted(recorded_sets):
            print("policy:   unchanged since the flow: the same tag sets would allow it")
        else:
            print("policy:   CHANGED since the flow; it then asked for: "
                  + " or ".join("[" + ", ".join(s) + "]" for s in recorded_sets))
    return 0
