"""One rule for a test whose prerequisite is missing: skip on a developer's machine, fail in CI.

CI (``CI`` set and not ``0``/``false``) installs everything through scripts/setup, so a missing
tool there is a broken environment that must turn the build red, never a silent skip.
"""

from __future__ import annotations

import os
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
