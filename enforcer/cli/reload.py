"""``enforcer reload``: ask the running daemon, through its admin endpoint, to re-read its definitions."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from enforcer.config import settings as settings_mod


def command(args: argparse.Namespace) -> int:
    admin = settings_mod.load_settings(args.config).model.admin
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
