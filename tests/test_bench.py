"""Smoke test of scripts/bench: the quick mode runs end to end and the enforcer columns are valid.

No speed is asserted: only that the benchmark works (a real login through the OP, wrk load
with the session cookie, every response a 200 with the upstream's body) and writes its files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.harness.prereq import require_e2e

REPO = Path(__file__).resolve().parents[1]


def _bench_module() -> ModuleType:
    """scripts/bench.py imported as a module (it is a script, not a package module)."""
    name = "enforcer_bench_script"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "bench.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.mark.e2e
def test_quick_bench_enforcer_column_is_valid(tmp_path: Path) -> None:
    """`scripts/bench --quick` measures the enforcer and bare columns with every answer checked and writes both reports."""
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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_quick_bench_redis_column_beside_sqlite(tmp_path: Path) -> None:
    """The enforcer-redis column runs against the bench's own redis-server, fills its sessions phase
    (misses, hits, Redis CPU and memory), is reported beside and against the SQLite column, and its
    redis-server is stopped at the end."""
    require_e2e()
    out = tmp_path / "results"
    proc = subprocess.run(
        [str(REPO / "scripts" / "bench"), "--quick", "--columns", "enforcer,enforcer-redis", "--duration", "1",
         "--newconn-duration", "1", "--logins", "1", "--sessions", "200", "--redis-sessions", "600",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False,
    )
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    reports = sorted(out.glob("bench-*-quick.json"))
    assert reports, "no JSON report written\n" + detail
    report = json.loads(reports[0].read_text())
    markdown = (out / reports[0].name.replace(".json", ".md")).read_text()

    assert proc.returncode == 0, detail
    assert set(report["columns"]) == {"enforcer", "enforcer-redis"}, detail
    assert report["settings"]["redis_sessions"] == 600
    redis_col, sqlite_col = report["columns"]["enforcer-redis"], report["columns"]["enforcer"]
    assert redis_col["summary"]["valid"], detail
    assert {run["mode"] for run in redis_col["runs"]} == {"keepalive", "newconn", "fullhs", "login", "sessions"}
    keepalive = next(run for run in redis_col["runs"] if run["mode"] == "keepalive")
    assert keepalive["store_cpu_us_per_req"] is not None  # the redis-server's CPU is measured beside
    sessions = {run["column"]: run for c in (redis_col, sqlite_col) for run in c["runs"] if run["mode"] == "sessions"}
    in_redis, in_sqlite = sessions["enforcer-redis"], sessions["enforcer"]
    assert (in_redis["store"], in_redis["sessions"], in_redis["ok"]) == ("redis", 600, 600)
    assert (in_sqlite["store"], in_sqlite["sessions"], in_sqlite["ok"]) == ("sqlite", 200, 200)
    assert in_redis["stored"] >= 600  # created in Redis by the enforcer's own store code
    assert in_redis["hits_ok"] == in_redis["hits"] > 0
    for field in ("cpu_us_per_touch", "cpu_us_per_hit", "store_cpu_us_per_touch", "store_cpu_us_per_hit",
                  "miss_extra_cpu_us", "store_rss_mib"):
        assert in_redis[field] is not None, field
    assert in_redis["store_rss_mib"] > 0
    assert in_sqlite["store_cpu_us_per_touch"] is None  # SQLite runs in the enforcer's own process
    ratio = report["ratios"]["enforcer-redis/enforcer"]
    assert ratio["ka_cpu_us"] is not None
    assert ratio["sess_touch_cpu_us"] is not None
    assert "| RSS with 200 (enforcer-redis: 600) live sessions, MiB |" in markdown
    assert "cost of a cache miss" in markdown
    # the redis-server the bench started is gone (stopped by its PID)
    started = re.search(r"started redis pid (\d+)", proc.stderr)
    assert started, detail
    with pytest.raises(ProcessLookupError):
        os.kill(int(started.group(1)), 0)


@pytest.mark.parametrize(
    ("argv", "sessions", "redis_sessions"),
    [([], 10_000, 100_000), (["--quick"], 1000, 5000), (["--quick", "--redis-sessions", "7"], 1000, 7),
     (["--redis-sessions", "0", "--sessions", "0"], 0, 0)],
)
def test_session_counts_default_per_store(argv: list[str], sessions: int, redis_sessions: int) -> None:
    """--redis-sessions defaults to 100,000 (quick 5,000) for the Redis column while --sessions keeps its own default."""
    args = _bench_module().parse_args(argv)
    assert (args.sessions, args.redis_sessions) == (sessions, redis_sessions)


def test_redis_column_is_a_default_enforcer_column() -> None:
    """enforcer-redis runs by default, right after the SQLite column, with one worker and its own OP client."""
    bench = _bench_module()
    columns = bench.parse_args([]).columns
    assert columns[columns.index("enforcer") + 1] == "enforcer-redis"
    assert bench.ENFORCER_WORKERS["enforcer-redis"] == 1


def test_redis_server_config_is_private_and_without_persistence(tmp_path: Path) -> None:
    """The bench's redis-server listens on loopback only, keeps nothing on disk and admits only the enforcer's ACL user."""
    conf = _bench_module().redis_conf(tmp_path, 6390, "pw").splitlines()
    for line in ("bind 127.0.0.1", "port 6390", f"dir {tmp_path}", 'save ""', "appendonly no", "user default off"):
        assert line in conf, line
    assert any(line.startswith("user enforcer on >pw ~enforcer:* ") for line in conf)


def test_redis_ratio_and_session_label_in_the_report() -> None:
    """The report divides the Redis column by the SQLite column of the same run and names both session counts."""
    bench = _bench_module()

    def summary(ka_cpu: float, miss_extra: float) -> dict[str, object]:
        return {"ka_cpu_us": {"median": ka_cpu}, "sess_miss_extra_us": {"median": miss_extra}}

    ratios = bench.ratios({"enforcer": summary(80.0, 100.0), "enforcer-redis": summary(88.0, 250.0)})
    assert ratios["enforcer-redis/enforcer"]["ka_cpu_us"] == 1.1
    assert ratios["enforcer-redis/enforcer"]["sess_miss_extra_us"] == 2.5
    assert ratios["enforcer-redis/enforcer"]["login_ms"] is None  # not measured: no ratio

    def report(columns: list[str]) -> dict[str, object]:
        return {"settings": {"sessions": 10_000, "redis_sessions": 100_000}, "columns": dict.fromkeys(columns)}

    assert bench.sessions_label(report(["enforcer", "enforcer-redis"])) == "10,000 (enforcer-redis: 100,000)"
    assert bench.sessions_label(report(["enforcer-redis"])) == "100,000"
    assert bench.sessions_label(report(["enforcer", "bare"])) == "10,000"
