"""The shipped systemd units: `systemd-analyze verify` is silent and the exposure scores stay low."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness.prereq import missing

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "enforcer.service"
BLOCK_UNIT = REPO / "systemd" / "enforcer-block.service"
UNITS = (UNIT, BLOCK_UNIT)
MAX_EXPOSURE = {UNIT.name: 2.5, BLOCK_UNIT.name: 2.5}


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        missing("systemd-analyze (package systemd)")
    return tool


def _fake_root(tmp_path: Path) -> Path:
    """A root holding the units, stand-ins for their executables and the host's system units."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    for exe in ("opt/enforcer/venv/bin/enforcer", "bin/kill"):
        path = root / exe
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    return root


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_verifies_without_any_output(tmp_path: Path, unit: Path) -> None:
    """`systemd-analyze verify` prints nothing at all for each shipped unit (it exits 0 even on bad values)."""
    tool = _analyze()
    root = _fake_root(tmp_path)
    out = subprocess.run(
        [tool, "verify", f"--root={root}", f"/etc/systemd/system/{unit.name}"],
        capture_output=True, text=True, check=False,
    )
    assert out.returncode == 0
    assert out.stdout + out.stderr == ""


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_security_exposure_is_at_most_2_5(unit: Path) -> None:
    """`systemd-analyze security --offline=true` rates each unit at 2.5 or better."""
    tool = _analyze()
    limit = MAX_EXPOSURE[unit.name]
    out = subprocess.run([tool, "security", "--offline=true", str(unit)], capture_output=True, text=True, check=False)
    match = re.search(rf"Overall exposure level for {re.escape(unit.name)}: ([0-9.]+)", out.stdout + out.stderr)
    assert match, out.stdout[-500:]
    exposure = float(match.group(1))
    print(f"systemd-analyze security exposure of {unit.name}: {exposure}")
    assert exposure <= limit
    strict = subprocess.run(
        [tool, "security", "--offline=true", f"--threshold={int(limit * 10)}", str(unit)],
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


def test_block_unit_runs_before_the_network_and_the_daemon() -> None:
    """enforcer-block.service is an early one-shot ordered before sysinit.target (every ordinary service, the app too), network-pre.target and enforcer.service, which wants it."""
    block = BLOCK_UNIT.read_text()
    assert "DefaultDependencies=no" in block and "Type=oneshot" in block and "RemainAfterExit=yes" in block
    [before] = [ln for ln in block.splitlines() if ln.startswith("Before=")]
    assert {"sysinit.target", "network-pre.target", "enforcer.service"} <= set(before.split("=", 1)[1].split())
    assert "Wants=network-pre.target" in block and "WantedBy=sysinit.target" in block
    assert "enforcer block --from-state" in block
    daemon = UNIT.read_text()
    assert re.search(r"^Wants=.*\benforcer-block\.service\b", daemon, re.MULTILINE)
    assert re.search(r"^After=.*\benforcer-block\.service\b", daemon, re.MULTILINE)


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_documentation_names_a_page_that_install_ships(unit: Path) -> None:
    """Each unit's Documentation= is a file under /usr/share/doc/enforcer that scripts/install copies from the checkout."""
    [line] = [ln for ln in unit.read_text().splitlines() if ln.startswith("Documentation=")]
    install = (REPO / "scripts" / "install").read_text()
    for uri in line.split("=", 1)[1].split():
        assert uri.startswith("file:/usr/share/doc/enforcer/"), uri
        name = uri.removeprefix("file:/usr/share/doc/enforcer/")
        assert (REPO / name).is_file(), uri
        assert re.search(rf"^install -m 0644 .*\b{re.escape(name)}\b.*\"\$doc/\"$", install, re.MULTILINE), name
