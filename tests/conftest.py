"""Shared fixtures: the real end-to-end stack, started once per test session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.harness.e2e_stack import Stack, start_stack, stop_stack
from tests.harness.prereq import require_e2e


@pytest_asyncio.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """One OP + enforcer + upstream for the whole session."""
    require_e2e()
    s = await start_stack(tmp_path_factory.mktemp("e2e"))
    try:
        yield s
    finally:
        await stop_stack(s)


# The real Kubernetes cluster (tests/harness/kube.py): registered here so that every test file
# shares one session-scoped cluster.
from tests.harness.kube import kube_api  # noqa: E402, F401
