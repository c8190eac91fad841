"""The command line: check, explain, certs export-ca and flows, run as real subprocesses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.seed import SERVICE, SPEC


def _enforcer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "enforcer", *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    import yaml  # noqa: PLC0415

    admin = {**SPEC, "name": "admin", "endpoints": [
        {"URI": "/admin/*", "methods": ["GET"], "allowedScopes": [["groups=admins"]]},
        {"URI": "/healthz", "methods": ["GET"], "public": True},
    ]}
    (tmp_path / "defs.yaml").write_text(yaml.safe_dump_all([SERVICE, SPEC, admin]))
    path = tmp_path / "enforcer.yaml"
    path.write_text("tags: [app=frontend]\nstateDir: state\nlogsDir: logs\ndefinitions: [{file: defs.yaml}]\n")
    return path


def test_check_accepts_a_valid_config_and_lists_services(cfg: Path) -> None:
    """`enforcer check` exits 0 and summarises each service."""
    out = _enforcer("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "service private-app" in out.stdout
    assert "3 endpoint(s)" in out.stdout


def test_check_rejects_a_broken_config_with_a_key_path(cfg: Path) -> None:
    """`enforcer check` exits 2 and names the file, key path, value and fix of each problem."""
    defs = cfg.parent / "defs.yaml"
    defs.write_text(defs.read_text().replace("port: 80", "port: eighty").replace("OIDCClientID", "OIDCClientId"))
    out = _enforcer("check", "-c", str(cfg))
    assert out.returncode == 2
    assert "service[private-app].port" in out.stderr
    assert "'eighty'" in out.stderr
    assert "unknown key 'OIDCClientId'" in out.stderr
    assert "did you mean 'OIDCClientID'" in out.stderr


def test_check_reports_a_missing_config_file(tmp_path: Path) -> None:
    """A missing config file is a clear error, not a traceback."""
    out = _enforcer("check", "-c", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert "cannot read" in out.stderr
    assert "Traceback" not in out.stderr


def test_explain_names_the_rule_and_the_missing_tags(cfg: Path) -> None:
    """`enforcer explain` prints the decision, the rule that decided and what is missing."""
    out = _enforcer("explain", "-c", str(cfg), "--service", "private-app", "--tags", "groups=staff", "GET", "/admin/x")
    assert out.returncode == 0, out.stderr
    assert "admin#0" in out.stdout
    assert "groups=admins" in out.stdout
    allowed = _enforcer("explain", "-c", str(cfg), "--service", "private-app", "GET", "/healthz")
    assert "public" in allowed.stdout.lower()


def test_explain_reports_a_rejected_path(cfg: Path) -> None:
    """A path the canonicaliser rejects is explained as a 400 before any rule."""
    out = _enforcer("explain", "-c", str(cfg), "--service", "private-app", "GET", "/a%2fb")
    assert "400" in out.stdout and "encoded_separator" in out.stdout


def test_explain_unknown_service_lists_the_known_ones(cfg: Path) -> None:
    """Asking about a service this enforcer does not serve exits 2 and lists the services."""
    out = _enforcer("explain", "-c", str(cfg), "--service", "nope", "GET", "/")
    assert out.returncode == 2
    assert "private-app" in out.stderr


def test_certs_export_ca_prints_a_pem_certificate(cfg: Path) -> None:
    """`enforcer certs export-ca` creates the CA on first use and prints it as PEM."""
    out = _enforcer("certs", "export-ca", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("-----BEGIN CERTIFICATE-----")
    again = _enforcer("certs", "export-ca", "-c", str(cfg))
    assert again.stdout == out.stdout


def test_flows_without_a_log_file_exits_2(cfg: Path) -> None:
    """`enforcer flows` on a host with no flow log yet says so and exits 2."""
    out = _enforcer("flows", "-c", str(cfg))
    assert out.returncode == 2
    assert "flows.jsonl" in out.stderr


def test_flows_bad_since_is_a_usage_error(cfg: Path) -> None:
    """An unparsable --since is rejected with the accepted forms."""
    out = _enforcer("flows", "-c", str(cfg), "--since", "yesterday-ish")
    assert out.returncode == 2
    assert "--since" in out.stderr


def test_run_refuses_a_workers_value_that_is_neither_number_nor_auto(capsys: pytest.CaptureFixture[str]) -> None:
    """`enforcer run --workers banana` stops at argument parsing (exit 2) and says what is accepted."""
    from enforcer import cli  # noqa: PLC0415

    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--workers", "banana"])
    assert exc.value.code == 2
    assert "neither a number nor 'auto'" in capsys.readouterr().err


def test_every_subcommand_names_a_function_that_exists() -> None:
    """Each entry of the dispatch table resolves to a callable in its subcommand module."""
    from enforcer import cli  # noqa: PLC0415

    for name in cli.COMMANDS:
        assert callable(cli._command(name)), name


def test_reading_flows_or_checking_a_config_does_not_load_the_daemon() -> None:
    """`check`, `explain` and `flows` load their own modules only: not the daemon, the data path or pyroute2."""
    code = (
        "import sys, enforcer.cli.check, enforcer.cli.flows; "
        "print(sorted(m for m in sys.modules if m.startswith(('enforcer.run', 'enforcer.http', 'pyroute2'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("setting", ["listen", "admin"])
def test_run_on_a_busy_port_says_so_in_one_line(cfg: Path, setting: str) -> None:
    """`enforcer run` on a taken listen or admin port exits 1 with one line naming the port and the setting to change."""
    import socket  # noqa: PLC0415

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        other = free.getsockname()[1]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = {"listen": port, "admin": 0} if setting == "listen" else {"listen": other, "admin": port}
        cfg.write_text(
            cfg.read_text()
            + f"listen: {{address: 127.0.0.1, port: {ports['listen']}}}\n"
            + f"admin: {{address: 127.0.0.1, port: {ports['admin']}}}\n"
            + "redirect: {enabled: false}\n"
        )
        out = _enforcer("run", "-c", str(cfg))
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.startswith("enforcer:")]
    assert lines == [f"enforcer: cannot start: port {port} on 127.0.0.1 is in use: choose another {setting}.port "
                     "(or stop what listens there)"], out.stderr
    assert "Traceback" not in out.stderr and "object at 0x" not in out.stderr


def _logged_deny(cfg: Path, tags: frozenset[str]) -> str:
    """Write a flow log holding one allowed request and one deny of GET /admin/x; the deny's flow id."""
    from enforcer.flow import FlowIds, FlowRecord  # noqa: PLC0415

    ids = FlowIds()
    records = []
    for decision, reason in (("allow", "allowed"), ("deny", "missing_tags")):
        rec = FlowRecord.begin(flow_id=ids(), client="192.0.2.1:4000", sni=None, host="app.example", method="GET",
                               path="/admin/x", now=1_800_000_000.0, service="private-app")
        rec.record(decision=decision, reason=reason, endpoint="admin", user="eve-sub", email="eve@example.com")
        if decision == "deny":
            rec.note_deny(would_allow=[frozenset({"groups=admins"})], missing={"groups=admins"}, tags=tags)
        records.append(rec.finish(now=1_800_000_000.5, status=403 if decision == "deny" else 200))
    (cfg.parent / "logs").mkdir(exist_ok=True)
    (cfg.parent / "logs" / "flows.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    return records[-1].flow_id


def test_flows_id_finds_the_one_record(cfg: Path) -> None:
    """`enforcer flows --id` prints only that flow's record, with its deny fields."""
    flow_id = _logged_deny(cfg, frozenset({"groups=staff"}))
    out = _enforcer("flows", "-c", str(cfg), "--id", flow_id)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("flow_id") == 1 and flow_id in out.stdout
    assert '[["groups=admins"]]' in out.stdout


@pytest.mark.parametrize(
    ("tags", "says", "verdict"),
    [
        ((), "replaying for a signed-in user with none of the tags", "DENY (missing_tags)"),
        (("--tags", "groups=staff"), "the tags given are the user's tags at the time", "DENY (missing_tags)"),
        (("--tags", "groups=admins"), "warning: the tags given are NOT the user's tags", "ALLOW (allowed)"),
    ],
)
def test_explain_flow_replays_a_deny(cfg: Path, tags: tuple[str, ...], says: str, verdict: str) -> None:
    """`enforcer explain --flow` shows the record, replays the decision and checks --tags against its fingerprint."""
    flow_id = _logged_deny(cfg, frozenset({"groups=staff"}))
    out = _enforcer("explain", "-c", str(cfg), "--flow", flow_id, *tags)
    assert out.returncode == 0, out.stderr
    assert f"flow {flow_id} as recorded" in out.stdout
    assert says in out.stdout
    assert "endpoint: /admin/*" in out.stdout
    assert f"verdict:  {verdict}" in out.stdout
    assert ("policy:   unchanged since the flow" in out.stdout) is verdict.startswith("DENY")


def test_explain_flow_of_an_unknown_id_says_so(cfg: Path) -> None:
    """`enforcer explain --flow` of an id the log does not hold exits 1 with a message."""
    _logged_deny(cfg, frozenset())
    out = _enforcer("explain", "-c", str(cfg), "--flow", "f" * 16)
    assert out.returncode == 1
    assert f"no flow {'f' * 16}" in out.stderr
