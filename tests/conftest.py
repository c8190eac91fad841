"""Shared fixtures: the real end-to-end stack, started once per test session."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.e2e_stack import Stack, start_stack, stop_stack
from tests.prereq import missing

REPO = Path(__file__).resolve().parents[1]


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


@pytest_asyncio.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """One OP + enforcer + upstream for the whole session."""
    require_e2e()
    s = await start_stack(tmp_path_factory.mktemp("e2e"))
    try:
        yield s
    finally:
        await stop_stack(s)
