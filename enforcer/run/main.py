"""Entry point of ``enforcer run``: one daemon process, or a master with worker processes."""

from __future__ import annotations

from pathlib import Path

from enforcer.config import settings as config
from enforcer.run.daemon import Daemon, _run_loop
from enforcer.run.workers import Master


def run_forever(config_path: Path, workers: int | str | None = None) -> int:
    """Entry point of ``enforcer run`` (``workers``, a number or ``auto``, overrides ``listen.workers``)."""
    settings = config.load_settings(config_path)
    if workers is not None:
        settings = config.with_workers(settings, workers)
    if settings.model.listen.workers > 1:
        return Master(settings).run()
    return _run_loop(Daemon(settings).run())


