"""``enforcer certs export-ca``: print the local CA certificate clients should trust."""

from __future__ import annotations

import argparse
import sys

from enforcer.config import settings as settings_mod
from enforcer.http.certs import CertStore


def command(args: argparse.Namespace) -> int:
    settings = settings_mod.load_settings(args.config)
    sys.stdout.write(CertStore(settings.state_dir).ca_pem().decode())
    return 0
