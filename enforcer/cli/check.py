"""``enforcer check`` and ``explain``: validate the config and every definition as the daemon would."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import os
import pwd
import stat
import sys
from pathlib import Path

import aiohttp

from enforcer import policy
from enforcer.config import definitions as definitions_mod
from enforcer.config import issues, kubernetes, sources
from enforcer.config import settings as settings_mod
from enforcer.errors import Outcome
from enforcer.flow import tags_fingerprint
from enforcer.identity import crypto
from enforcer.identity import login as login_rules
from enforcer.run import stores


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
        where = [_source_name(s) for s in settings.model.definitions]
        add = "a kind: service document to a source"
        if any(s.kubernetes is not None for s in settings.model.definitions):
            add += " or an EnforcerService custom resource (kubectl apply) where the kubernetes source watches"
        return issues.ConfigIssue(
            str(settings.path), "definitions", "the definitions hold no service: every request would be refused",
            where, f"add {add}, {allow}",
        )
    wanted = "; ".join(f"{s.name} wants {[list(c) for c in s.selectors]}" for s in definitions.catalog)
    return issues.ConfigIssue(
        str(settings.path), "tags",
        f"no service applies to this enforcer: its tags match no service's selectors ({wanted})",
        list(settings.tags), f"give this enforcer the tags of one selectors clause, {allow}",
    )


def _source_name(source: settings_mod.SourceModel) -> str:
    """A ``definitions:`` entry as the daemon's logs name it: the file, the URL, or the
    Kubernetes namespaces watched."""
    if source.kubernetes is not None:
        return kubernetes.source_name(source.kubernetes.namespaces)
    return str(source.file or source.url)


SECRETS = definitions_mod.SECRETS_GROUP


def unreadable_by_service(path: Path, group: int | None) -> str | None:
    """Why the shipped unit's user could not read ``path``, or None.

    That user is a systemd DynamicUser (it owns nothing here) whose only extra group is
    ``group`` (the gid of enforcer-secrets; None: the group does not exist): it needs search
    (x) on every directory above the file and read (r) on the file, as that group or as other."""

    def allows(st: os.stat_result, group_bit: int, other_bit: int) -> bool:
        as_group = group is not None and st.st_gid == group and bool(st.st_mode & group_bit)
        return as_group or bool(st.st_mode & other_bit)

    path = path.absolute()
    for directory in reversed(path.parents):
        try:
            st = directory.stat()
        except OSError:
            return None  # reported as unreadable already
        if not allows(st, stat.S_IXGRP, stat.S_IXOTH):
            return (f"directory {directory} ({_owner_mode(st)}) is not searchable by group {SECRETS}; "
                    f"fix: chgrp {SECRETS} {directory} && chmod g+x {directory}")
    try:
        st = path.stat()
    except OSError:
        return None
    if not allows(st, stat.S_IRGRP, stat.S_IROTH):
        return f"{path} is {_owner_mode(st)}; fix: chown root:{SECRETS} {path} && chmod 0640 {path}"
    return None


def _owner_mode(st: os.stat_result) -> str:
    """``root:root 0600``: the owner, group and mode of a stat result."""
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group} {stat.S_IMODE(st.st_mode):04o}"


def _secret_warnings(definitions: definitions_mod.Definitions) -> list[str]:
    """Each secret file every local user can read; as root also each one the shipped unit's user
    could not read (an unprivileged check cannot tell)."""
    out = []
    for svc in definitions.services:
        with contextlib.suppress(OSError):
            if svc.secret_file is not None and svc.secret_file.stat().st_mode & stat.S_IROTH:
                f = svc.secret_file
                out.append(f"service {svc.name!r}: its secret {f} is readable by every local user; "
                           f"fix: chown root:{SECRETS} {f} && chmod 0640 {f}")
    if os.geteuid() != 0:
        return out
    try:
        group: int | None = grp.getgrnam(SECRETS).gr_gid
    except KeyError:
        group = None
    for svc in definitions.services:
        if svc.secret_file is None:
            continue
        why = unreadable_by_service(svc.secret_file, group)
        if why:
            missing = "" if group is not None else f" (group {SECRETS} does not exist: scripts/install creates it)"
            out.append(f"service {svc.name!r}: the enforcer service's user could not read its secret{missing}: {why}")
    return out


KEY_FILE = "sessions.refreshTokenKeyFile"
NEW_KEY_FILE = "(umask 077; head -c 32 /dev/urandom | base64 > {path})"
"""The shell line that makes a key file of one fresh key (README, *Claims kept fresh*)."""


def _secrets_gid() -> int | None:
    try:
        return grp.getgrnam(SECRETS).gr_gid
    except KeyError:
        return None


def refresh_key_findings(
    settings: settings_mod.Settings, definitions: definitions_mod.Definitions | None, *, root: bool | None = None,
    group: int | None = None,
) -> tuple[list[issues.ConfigIssue], list[issues.ConfigIssue]]:
    """Problems of ``sessions.refreshTokenKeyFile``: (errors, warnings), each naming the key
    path, the value and the fix. Errors stop the daemon (it loads the file at start): a file
    that is missing, unreadable or holds no usable key. Warnings: a file other local users can
    read (every user, or a group other than enforcer-secrets); as root (``root``, default: the
    effective uid), one the shipped unit's user could not read (``group``: enforcer-secrets'
    gid, default: looked up); and a service asking ``offline_access`` with no key file set,
    whose refresh tokens are then dropped."""
    source, path = str(settings.path), settings.model.sessions.refreshTokenKeyFile
    errors: list[issues.ConfigIssue] = []
    warnings: list[issues.ConfigIssue] = []
    if path is None:
        for svc in definitions.services if definitions is not None else ():
            if login_rules.keeps_refresh_token(svc.scopes):
                warnings.append(issues.ConfigIssue(
                    source, KEY_FILE, f"service {svc.name!r} asks offline_access, but no key file is set: no refresh "
                    "token will be kept and its claims are never renewed", None,
                    f"set {KEY_FILE} to a 0640 root:{SECRETS} file made with {NEW_KEY_FILE.format(path='FILE')}, "
                    "or drop offline_access from its OIDCScopes",
                ))  # fmt: skip
        return errors, warnings
    fix_mode = f"chown root:{SECRETS} {path} && chmod 0640 {path}"
    try:
        crypto.parse_keys(path.read_text(encoding="ascii"))  # as TokenCipher.from_file reads it at start
    except OSError as exc:
        fix = (f"create it: {NEW_KEY_FILE.format(path=path)} && {fix_mode}" if isinstance(exc, FileNotFoundError)
               else f"make it a file root can read: {fix_mode}")
        errors.append(issues.ConfigIssue(source, KEY_FILE, f"cannot read the key file: {exc.strerror or exc}",
                                         str(path), fix))
        return errors, warnings
    except (UnicodeDecodeError, crypto.KeyFileError) as exc:
        why = "not ASCII text" if isinstance(exc, UnicodeDecodeError) else str(exc)
        errors.append(issues.ConfigIssue(
            source, KEY_FILE, f"the key file holds no usable key: {why}", str(path),
            "one base64 key of 32 bytes a line, newest first (# comments allowed); a new key: "
            "head -c 32 /dev/urandom | base64"))
        return errors, warnings
    with contextlib.suppress(OSError):
        st = path.stat()
        gid = _secrets_gid() if group is None else group
        if st.st_mode & stat.S_IROTH:
            warnings.append(issues.ConfigIssue(
                source, KEY_FILE, f"the key file is readable by every local user ({_owner_mode(st)})", str(path),
                fix_mode))
        elif st.st_mode & stat.S_IRGRP and st.st_gid != gid:
            warnings.append(issues.ConfigIssue(
                source, KEY_FILE, f"the key file is readable by another group ({_owner_mode(st)})", str(path),
                fix_mode))
        if (os.geteuid() == 0) if root is None else root:
            why_not = unreadable_by_service(path, gid)
            if why_not:
                what, _, fix = why_not.partition("; fix: ")
                warnings.append(issues.ConfigIssue(
                    source, KEY_FILE, f"the enforcer service's user could not read the key file (the daemon would "
                    f"not start under the shipped unit): {what}", str(path), fix))
    return errors, warnings


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
    key_errors, key_warnings = refresh_key_findings(settings, definitions) if settings is not None else ([], [])
    problems.extend(key_errors)
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
    for w in (*definitions.warnings, *_secret_warnings(definitions), *map(str, key_warnings)):
        print(f"  warning: {w}")
    store = asyncio.run(stores.check_session_store(settings.model))
    if store is not None and store != "ok":
        print(f"  FAIL sessions: Redis: {store}")
        return 1
    if store == "ok":
        print("  sessions: Redis reachable; the ACL user has every right the daemon uses (its keys and commands, "
              "its scripts, publish and subscribe on its revocation channel)")
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
