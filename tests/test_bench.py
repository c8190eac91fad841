"""Smoke test of scripts/bench: the quick mode runs end to end and the enforcer column is valid.

No speed is asserted: only that the benchmark works (a real login through the OP, wrk load
with the session cookie, every response a 200 with the upstream's body) and writes its files.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.harness.prereq import require_e2e

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


def test_quick_bench_enforcer_column_is_valid(tmp_path: Path) -> None:
    require_e2e()
    out = tmp_path / "results"
    proc = subprocess.run(
        [str(REPO / "scripts" / "bench"), "--quick", "--columns", "enforcer,bare", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL, check=False,
    )
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    reports = sorted(out.glob("bench-*-quick.json"))
    assert reports, "no JSON report written\n" + detail
    assert (out / reports[0].name.replace(".json", ".md")).exists(), detail
    report = json.loads(reports[0].read_text())

    assert set(report["columns"]) == {"enforcer", "bare"}, detail
    enforcer = report["columns"]["enforcer"]
    assert enforcer["summary"]["valid"], detail
    modes = {run["mode"] for run in enforcer["runs"]}
    assert modes == {"keepalive", "newconn", "fullhs", "login", "sessions"}, modes
    for run in enforcer["runs"]:
        assert run["valid"], run
        if run["mode"] == "login":
            assert run["ok"] == run["count"] > 0
        elif run["mode"] == "sessions":
            # --quick: 1,000 live sessions, each used once through the enforcer (200 + body)
            assert run["sessions"] == report["settings"]["sessions"] == 1000
            assert run["ok"] == 1000
            assert run["bad"] == run["errors"] == 0
            assert run["stored"] >= 1000
            assert run["rss_mib"] > 0
        else:
            assert run["requests"] > 0
            assert run["cpu_us_per_req"] is not None
            assert run["wrk"]["bad_status"] == run["wrk"]["bad_body"] == 0
    assert enforcer["summary"]["ka_rps"]["median"] > 0
    assert enforcer["summary"]["rss_mib"]["median"] > 0
    assert enforcer["summary"]["sess_rss_mib"]["median"] > 0
    assert "RSS with 1,000 live sessions, MiB" in (out / reports[0].name.replace(".json", ".md")).read_text()
    assert report["columns"]["bare"]["summary"]["valid"], detail
    assert "enforcer/bare" in report["ratios"]
    assert proc.returncode == 0, detail
    for key in ("nproc", "cpu", "kernel", "python"):
        assert report["machine"][key]


def test_floor_columns_serve_the_upstream_body(tmp_path: Path) -> None:
    """The opt-in floor-* reference servers start, answer every request with the upstream's body and are measured."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [str(REPO / "scripts" / "bench"), "--quick", "--columns", "floor-raw,floor-aiohttp,floor-proxy",
         "--newconn-duration", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL, check=False,
    )
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    reports = sorted(out.glob("bench-*-quick.json"))
    assert reports, "no JSON report written\n" + detail
    report = json.loads(reports[0].read_text())
    assert set(report["columns"]) == {"floor-raw", "floor-aiohttp", "floor-proxy"}, detail
    for name, column in report["columns"].items():
        assert column["summary"]["valid"], (name, detail)
        assert {run["mode"] for run in column["runs"]} == {"keepalive", "newconn", "fullhs"}, name
        assert column["summary"]["ka_cpu_us"]["median"] > 0, name
