"""Shared fixtures: the real end-to-end stack, started once per test session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

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


MACHINE_DIRS = (Path("/var/lib/enforcer"), Path("/var/log/enforcer"))
"""The shipped defaults of stateDir and logsDir: the DaemonSet's hostPaths on this machine (the
test node is this machine), so no test may leave them behind."""
MAKES_MACHINE_DIRS = frozenset({"test_kube_daemonset", "test_kube_pods"})
"""The modules that run the DaemonSet, which make those directories and remove them."""


@pytest.fixture(autouse=True)
def _no_machine_state_dirs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves /var/lib/enforcer or /var/log/enforcer on the machine (a settings
    without stateDir/logsDir in its tmp dir): they would be a real install's, and the DaemonSet
    tests refuse to run over them."""
    before = {d for d in MACHINE_DIRS if d.exists()}
    yield
    module = request.node.module.__name__.rsplit(".", 1)[-1] if request.node.module else ""
    made = [str(d) for d in MACHINE_DIRS if d.exists() and d not in before]
    if made and module not in MAKES_MACHINE_DIRS:
        pytest.fail(f"this test left {', '.join(made)} on the machine: give its settings a stateDir and "
                    "logsDir in its tmp dir")


# The real Kubernetes cluster (tests/harness/kube.py): registered here so that every test file
# shares one session-scoped cluster.
from tests.harness.kube import kube_api, kube_node  # noqa: E402, F401
