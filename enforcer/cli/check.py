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


def load_all_definitions(settings: settings_mod.Settings) -> definitions_mod.Definitions:
    """Every source, HTTP ones included, validated exactly as the daemon would."""

    async def load() -> definitions_mod.Definitions:
        async with aiohttp.ClientSession() as http:
            docs = []
            problems: list[issues.ConfigIssue] = []
            for src in sources.build_sources(settings, http):
                try:
                    docs.extend(await src.poll() or [])
                except sources.SourceError as exc:
                    problems.append(issues.ConfigIssue(str(settings.path), "definitions", f"source unreadable: {exc}"))
            resolved = None
            try:
                resolved = definitions_mod.resolve_definitions(
                    docs, settings.tags, allow_http_loopback_idp=settings.model.oidc.allowHttpLoopbackIssuer
                )
            except issues.ConfigError as exc:
                problems.extend(exc.issues)
            if problems or resolved is None:
                raise issues.ConfigError(problems)
            return resolved

    return asyncio.run(load())


def _no_service(settings: settings_mod.Settings, definitions: definitions_mod.Definitions) -> issues.ConfigIssue | None:
    """No service applies to this enforcer (an empty definitions folder, a typo in ``tags``): an
    issue unless ``allowNoServices: true`` says it is meant."""
    if definitions.services or settings.model.allowNoServices:
        return None
    allow = "or set allowNoServices: true if this host may run with no service"
    if not definitions.catalog:
        sources = [str(s.file or s.url) for s in settings.model.definitions]
        return issues.ConfigIssue(
            str(settings.path), "definitions", "the definitions hold no service: every request would be refused",
            sources, f"add a kind: service document to a source, {allow}",
        )
    wanted = "; ".join(f"{s.name} wants {[list(c) for c in s.selectors]}" for s in definitions.catalog)
    return issues.ConfigIssue(
        str(settings.path), "tags",
        f"no service applies to this enforcer: its tags match no service's selectors ({wanted})",
        list(settings.tags), f"give this enforcer the tags of one selectors clause, {allow}",
    )


def command(args: argparse.Namespace) -> int:
    """``enforcer check``: every problem of the config and the definitions in one run (exit 2),
    or what is served and what to register at the IdP."""
    path = args.config
    settings, problems = settings_mod.read_settings(path)
    definitions = None
    if settings is not None:  # bad keys left at their defaults: the definitions are checked too
        try:
            definitions = load_all_definitions(settings)
        except issues.ConfigError as exc:
            problems.extend(exc.issues)
    if settings is not None and definitions is not None:
        none = _no_service(settings, definitions)
        if none is not None:
            problems.append(none)
    if problems or settings is None or definitions is None:
        raise issues.ConfigError(problems)
    print(f"{path}: OK")
    for svc in definitions.services:
        print(
            f"  service {svc.name}: hosts {', '.join(svc.hosts)}; exposedPort {svc.exposed_port} -> "
            f"{svc.upstream_host}:{svc.port}; {len(svc.endpoints)} endpoint(s) from {', '.join(svc.specs) or 'nothing'}"
        )
        print(f"    register at the IdP (client {svc.client_id}): redirect URI {svc.callback_url}")
    for name in definitions.ignored:
        print(f"  service {name}: not for this enforcer (selectors do not match tags {list(settings.tags)})")
    for w in definitions.warnings:
        print(f"  warning: {w}")
    return 0


def explain(args: argparse.Namespace) -> int:
    """``enforcer explain``: which rule decides a request for given tags."""
    settings = settings_mod.load_settings(args.config)
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
    tags = None if args.tags is None else frozenset(t.strip() for t in args.tags.split(",") if t.strip())
    decision = policy.decide(args.method.upper(), path, tags, service.table)
    print(policy.explain(decision, args.method.upper(), path, tags))
    return 0
