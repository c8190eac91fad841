"""What the end-to-end modules on the real cluster (tests/test_kube_daemonset.py,
tests/test_kube_pods.py) share: their figures printed past pytest's capture, polling, the
image build, the DaemonSet's host paths, and the checks on what reached the app."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Figures:
    """The measured figures of one module: each printed at once as ``[tag] name: s`` past
    pytest's capture (set :attr:`capture` from the module fixture), all kept for the summary."""

    tag: str
    timings: dict[str, float] = field(default_factory=dict)
    capture: Any = None
    """pytest's capture manager (``pytestconfig.pluginmanager.getplugin("capturemanager")``)."""

    def say(self, text: str) -> None:
        """Print past pytest's capture (as ``capsys.disabled()`` does), so the figures show in every run."""
        with self.capture.global_and_fixture_disabled() if self.capture is not None else contextlib.nullcontext():
            print(text, file=sys.__stderr__ or sys.stderr, flush=True)

    def report(self, name: str, seconds: float, note: str = "") -> None:
        """Keep a measured figure and print it at once."""
        self.timings[name] = seconds
        self.say(f"[{self.tag}] {name}: {seconds:.2f} s{' ' + note if note else ''}")

    def summary(self) -> None:
        self.say(f"[{self.tag}] summary: " + json.dumps({k: round(v, 2) for k, v in self.timings.items()}))


async def until(what: str, check: Callable[[], object], timeout: float = 60.0, interval: float = 0.2) -> float:
    """Poll ``check`` (in a thread) until it is true; the seconds it took."""
    start = time.monotonic()
    while True:
        with contextlib.suppress(Exception):
            if await asyncio.to_thread(check):
                return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


def is_login_at(issuer: str, status: int | None, location: str | None) -> bool:
    """A redirect to ``issuer``'s authorization endpoint (a login challenge)."""
    return status == 302 and (location or "").startswith(issuer + "/auth?")


def unauthenticated(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """App requests without an identity header (there must never be one: every path is protected)."""
    return [r for r in rows if not any(k.lower() == "x-forwarded-user" for k, _ in r["headers"])]


def fresh_host_dirs(*dirs: Path) -> list[Path]:
    """The DaemonSet's hostPaths, which the module will create; fail if they are there already."""
    there = [p for p in dirs if p.exists()]
    if there:
        pytest.fail(f"{', '.join(map(str, there))} exist(s) on this machine but were not made by this test: the "
                    "DaemonSet mounts them as hostPaths (the node is this machine). Move them away and run again.")
    return list(dirs)


def build_image(out: Path, name: str, figures: Figures) -> Path:
    """``scripts/image`` into ``out``, named ``name``; its time and size reported."""
    start = time.monotonic()
    done = subprocess.run(
        [str(REPO / "scripts" / "image"), "--output", str(out), "--name", name],
        cwd=out.parent, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, timeout=1500,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    figures.report("image build (scripts/image)", time.monotonic() - start, f"{out.stat().st_size / 2**20:.0f} MiB")
    return out


SYSTEM_NS = "enforcer-system"
SELECTOR = "app.kubernetes.io/name=enforcer"
"""The shipped DaemonSet's namespace and its pods' label."""


def enforcer_pods(kubectl: Callable[..., subprocess.CompletedProcess[str]]) -> list[dict[str, Any]]:
    """The DaemonSet's pods, as the API server has them."""
    out = kubectl("-n", SYSTEM_NS, "get", "pods", "-l", SELECTOR, "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def ready_enforcer(pods: list[dict[str, Any]], not_uid: str | None = None) -> dict[str, Any] | None:
    """A Ready enforcer pod (other than ``not_uid``), not being deleted."""
    for p in pods:
        conds = p.get("status", {}).get("conditions", [])
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conds)
        if ready and p["metadata"]["uid"] != not_uid and not p["metadata"].get("deletionTimestamp"):
            return p
    return None


def client_ssl_context(state_dir: Path, op_ca: bytes) -> ssl.SSLContext:
    """What the test's browsers trust: the enforcer's CA (in the node's state dir) and the OP's."""
    ca = (state_dir / "ca" / "ca.crt").read_text()
    return ssl.create_default_context(cadata=ca + op_ca.decode())
