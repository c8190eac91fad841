"""One rule for a test whose prerequisite is missing: skip on a developer's machine, fail in CI.

CI (``CI`` set and not ``0``/``false``) installs everything through scripts/setup, so a missing
tool there is a broken environment that must turn the build red, never a silent skip.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def missing(why: str) -> NoReturn:
    """Stop the current test: ``pytest.fail`` in CI, ``pytest.skip`` elsewhere."""
    if in_ci():
        pytest.fail(f"prerequisite missing in CI: {why}")
    pytest.skip(f"prerequisite missing: {why} (run scripts/setup)")


def require(present: bool, why: str) -> None:
    """:func:`missing` unless ``present``."""
    if not present:
        missing(why)


REPO = Path(__file__).resolve().parents[2]


def _prerequisites_missing() -> list[str]:
    missing = []
    if shutil.which("node") is None:
        missing.append("node")
    if not (REPO / "scripts" / "op" / "node_modules" / "oidc-provider").exists():
        missing.append("scripts/op/node_modules (run scripts/setup)")
    return missing


def require_e2e() -> None:
    """Skip locally when the e2e prerequisites are absent; in CI that is a failure."""
    absent = _prerequisites_missing()
    if absent:
        missing(f"e2e: {', '.join(absent)}")
