"""The shipped systemd unit: `systemd-analyze verify` is silent and the exposure score stays low."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.harness.prereq import missing

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "enforcer.service"
MAX_EXPOSURE = 2.5


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        missing("systemd-analyze (package systemd)")
    return tool


def _fake_root(tmp_path: Path) -> Path:
    """A root holding the unit, stand-ins for its executables and the host's system units."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system/enforcer.service")
    for exe in ("opt/enforcer/venv/bin/enforcer", "bin/kill"):
        path = root / exe
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    return root


def test_unit_verifies_without_any_output(tmp_path: Path) -> None:
    """`systemd-analyze verify` prints nothing at all for the shipped unit (it exits 0 even on bad values)."""
    tool = _analyze()
    root = _fake_root(tmp_path)
    out = subprocess.run(
        [tool, "verify", f"--root={root}", "/etc/systemd/system/enforcer.service"],
        capture_output=True, text=True, check=False,
    )
    assert out.returncode == 0
    assert out.stdout + out.stderr == ""


def test_unit_security_exposure_is_at_most_2_5() -> None:
    """`systemd-analyze security --offline=true` rates the unit at 2.5 or better."""
    tool = _analyze()
    out = subprocess.run([tool, "security", "--offline=true", str(UNIT)], capture_output=True, text=True, check=False)
    match = re.search(r"Overall exposure level for enforcer.service: ([0-9.]+)", out.stdout + out.stderr)
    assert match, out.stdout[-500:]
    exposure = float(match.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= MAX_EXPOSURE
    strict = subprocess.run(
        [tool, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", str(UNIT)],
        capture_output=True, text=True, check=False,
    )
    assert strict.returncode == 0


def test_unit_holds_exactly_the_two_capabilities() -> None:
    """The unit grants CAP_NET_ADMIN and CAP_NET_BIND_SERVICE and nothing else, as ambient and bounding set."""
    text = UNIT.read_text()
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        [line] = [ln for ln in text.splitlines() if ln.startswith(key + "=")]
        assert set(line.split("=", 1)[1].split()) == {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"}
    assert "Type=notify" in text and "WatchdogSec=" in text and "ExecReload=" in text
