"""Talking to systemd: readiness and status notifications, and the watchdog interval."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

def sd_notify(message: str) -> bool:
    """Tell systemd about our state (Type=notify); a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)
        return False
    return True

def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec, if it is watching this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000

