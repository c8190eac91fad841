"""Say what a one-shot command did to the protected ports, to its caller and to the system journal."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

SYSLOG_SOCKET = Path("/dev/log")
"""journald's syslog socket on a systemd host (and syslog's elsewhere)."""


def tell(level: int, message: str, *, syslog: Path = SYSLOG_SOCKET) -> None:
    """Print ``message`` on stderr; also send it to syslog (the journal) unless stderr is the
    journal already (``JOURNAL_STREAM``: run by a unit) or there is no syslog socket."""
    print(f"enforcer: {message}", file=sys.stderr)
    if os.environ.get("JOURNAL_STREAM") or not syslog.exists():
        return
    handler = logging.handlers.SysLogHandler(address=str(syslog))
    handler.ident = "enforcer: "
    try:
        handler.emit(logging.LogRecord("enforcer", level, __file__, 0, message, None, None))
    finally:
        handler.close()
