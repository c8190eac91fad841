"""``enforcer run``: start the daemon (one process or a master with workers) and report why it could not."""

from __future__ import annotations

import argparse
import logging
import sys

from enforcer.http.tls import PortInUseError
from enforcer.net.ruleset import RedirectError
from enforcer.run.main import run_forever


def command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run_forever(args.config, args.workers)
    except RedirectError as exc:
        print(f"enforcer: cannot install the redirect: {exc}", file=sys.stderr)
        return 1
    except PortInUseError as exc:
        print(f"enforcer: cannot start: {exc.strerror}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"enforcer: cannot start: {exc}", file=sys.stderr)
        return 1
