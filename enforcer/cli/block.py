"""``enforcer block --from-state``: close the protected ports before any enforcer serves (boot).

Builds the ruleset of the last-known-good definitions the daemon keeps in its state directory
(``definitions.last-known-good.yaml``) and installs it in one atomic batch: each exposed port
redirects to the listener's port, which refuses until the daemon listens there, and each local
app port rejects all but loopback. ``enforcer-block.service`` runs it before
``network-pre.target``, so an app that starts at boot is never reachable without the enforcer.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from enforcer.cli import journal
from enforcer.config import definitions as definitions_mod
from enforcer.config import settings as settings_mod
from enforcer.config.issues import ConfigError, ConfigIssue
from enforcer.config.sources import LKG_NAME
from enforcer.errors import Reason
from enforcer.net.ruleset import RedirectError, Ruleset
from enforcer.run.attach import Netlink, build_redirect, note_ports, ruleset_ports


def last_known_good(settings: settings_mod.Settings) -> definitions_mod.Definitions | None:
    """The definitions the daemon last accepted (None if it never ran); raises ConfigError if unreadable."""
    path = settings.state_dir / LKG_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        issue = ConfigIssue(str(path), "definitions", f"cannot read the last-known-good set: {exc}")
        raise ConfigError([issue]) from None
    parsed = definitions_mod.parse_documents(text, str(path))
    if isinstance(parsed, ConfigIssue):
        raise ConfigError([parsed])
    return definitions_mod.resolve_definitions(
        parsed, settings.tags, allow_http_loopback_idp=settings.model.oidc.allowHttpLoopbackIssuer
    )


def command(args: argparse.Namespace) -> int:
    settings = settings_mod.load_settings(args.config)
    r = settings.model.redirect
    if not r.enabled:
        print("enforcer: redirect.enabled is off in the config: nothing to block")
        return 0
    definitions = last_known_good(settings)
    if definitions is None:
        journal.tell(
            logging.WARNING,
            f"no last-known-good definitions in {settings.state_dir} (the enforcer never ran): nothing to block",
        )
        return 0
    ruleset = build_redirect(definitions, settings, settings.model.listen.port)
    try:
        asyncio.run(_block(settings, ruleset))
    except RedirectError as exc:
        journal.tell(logging.ERROR, f"block failed: {exc}")
        return 1
    journal.tell(
        logging.INFO,
        f"redirect table inet {r.table} installed from the last-known-good definitions: "
        f"{ruleset_ports(ruleset)} refuse until the enforcer serves",
    )
    return 0


async def _block(settings: settings_mod.Settings, ruleset: Ruleset) -> None:
    await Netlink().apply(ruleset)
    await note_ports(
        settings, method="BLOCK", reason=Reason.PORTS_BLOCKED,
        detail=f"table inet {ruleset.table} from the last-known-good definitions: {ruleset_ports(ruleset)}",
    )
