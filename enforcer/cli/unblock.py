"""``enforcer unblock``: remove the redirect table a stop or a boot left, so the app ports open.

The one explicit way (with ``scripts/uninstall``, which calls it) to take the block away while
no enforcer serves: it refuses while a daemon answers on the admin endpoint (``--force``
overrides), and says what it opened in the journal and in the flow log (``ports_unblocked``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import urllib.request

from enforcer.cli import journal
from enforcer.config import settings as settings_mod
from enforcer.errors import Reason
from enforcer.net.ruleset import RedirectError
from enforcer.run.attach import Netlink, note_ports


def daemon_answers(settings: settings_mod.Settings, timeout: float = 2.0) -> bool:
    """True if an enforcer answers ``/healthz`` on this config's admin address."""
    admin = settings.model.admin
    host = f"[{admin.address}]" if ":" in admin.address else admin.address
    try:
        with urllib.request.urlopen(f"http://{host}:{admin.port}/healthz", timeout=timeout) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def command(args: argparse.Namespace) -> int:
    settings = settings_mod.load_settings(args.config)
    table = settings.model.redirect.table
    if not args.force and daemon_answers(settings):
        journal.tell(
            logging.ERROR,
            f"unblock refused: an enforcer is running (admin endpoint {settings.model.admin.port}) and owns "
            f"table inet {table}; stop it first (systemctl stop enforcer), or use --force",
        )
        return 1
    try:
        removed = asyncio.run(_unblock(settings, table, by=args.by))
    except RedirectError as exc:
        journal.tell(logging.ERROR, f"unblock failed: {exc}")
        return 1
    if not removed:
        print(f"enforcer: no table inet {table}: nothing was blocked")
        return 0
    journal.tell(
        logging.WARNING,
        f"redirect table inet {table} removed by {args.by}: the exposed ports and the app ports answer "
        "without the enforcer until it starts again",
    )
    return 0


async def _unblock(settings: settings_mod.Settings, table: str, *, by: str) -> bool:
    removed = await Netlink().remove(table)
    if removed:
        await note_ports(
            settings, method="UNBLOCK", reason=Reason.PORTS_UNBLOCKED, detail=f"table inet {table} removed by {by}"
        )
    return removed
