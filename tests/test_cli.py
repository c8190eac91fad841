"""The command line: check, explain, certs export-ca and flows, run as real subprocesses."""

from __future__ import annotations

import os
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


def test_flows_before_the_first_request_is_empty_not_an_error(cfg: Path) -> None:
    """`enforcer flows` on a fresh install (log dir there, no request yet) says so and exits 0; without the log dir, 2."""
    out = _enforcer("flows", "-c", str(cfg))
    assert out.returncode == 2 and "logsDir" in out.stderr  # the cfg's logs dir does not exist yet
    (cfg.parent / "logs").mkdir()
    out = _enforcer("flows", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "no requests recorded yet" in out.stderr and "flows.jsonl" in out.stderr


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
        "print(sorted(m for m in sys.modules if m.startswith(('enforcer.run.', 'enforcer.http', 'pyroute2'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['enforcer.run.stores']"  # (the session store's connection check only)


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


def test_check_prints_the_redirect_uri_to_register_at_the_idp(cfg: Path) -> None:
    """`enforcer check` prints, per service, the exact redirect URI and client to register at the IdP."""
    defs = cfg.parent / "defs.yaml"
    defs.write_text(defs.read_text().replace("OIDCCallbackURL: https://app.example.com",
                                             "OIDCCallbackURL: https://app.example.com/oauth2/callback"))
    out = _enforcer("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "redirect URI https://app.example.com/oauth2/callback\n" in out.stdout
    assert "0oannpib3fQEeUWzD4x6" in out.stdout


def test_check_reports_config_and_definition_problems_in_one_run(cfg: Path) -> None:
    """A typo in enforcer.yaml and in a service hide neither a bad URL nor a missing secret file."""
    cfg.write_text(cfg.read_text() + "lisen: {port: 8443}\n")
    defs = cfg.parent / "defs.yaml"
    text = defs.read_text().replace("OIDCClientID", "OIDCClientId")
    text = text.replace("https://idp.example.com", "http://idp.example.com")
    text = text.replace("OIDCClientSecret: qcnc1ZFABmwmFwFZD_BAffNRFUn5aYQhvrx4XsxU",
                        f"OIDCClientSecret: {{file: {cfg.parent / 'nope'}}}")
    defs.write_text(text)
    out = _enforcer("check", "-c", str(cfg))
    assert out.returncode == 2
    assert "5 problem(s)" in out.stderr, out.stderr  # the renamed OIDCClientID is also missing
    for needle in ("unknown key 'lisen'", "unknown key 'OIDCClientId'", "OIDCProviderURL: must be an https",
                   "OIDCClientSecret.file: cannot read secret file"):
        assert needle in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("change", "path", "needle"),
    [
        ("tags", "tags", "bob wants"),                              # a typo in tags: selectors match nothing
        ("empty", "definitions", "hold no service"),                # an empty definitions folder
    ],
)
def test_check_fails_when_no_service_applies_unless_allowed(cfg: Path, change: str, path: str, needle: str) -> None:
    """No service for this enforcer is an error (exit 2) naming why and the fix; allowNoServices: true accepts it."""
    import yaml  # noqa: PLC0415

    if change == "tags":
        (cfg.parent / "defs.yaml").write_text(yaml.safe_dump_all([{**SERVICE, "name": "bob"}, SPEC]))
        cfg.write_text(cfg.read_text().replace("app=frontend", "app=fronted"))
    else:
        (cfg.parent / "defs.d").mkdir()
        cfg.write_text(cfg.read_text().replace("defs.yaml", "defs.d"))
    out = _enforcer("check", "-c", str(cfg))
    assert out.returncode == 2
    assert f"enforcer.yaml: {path}: " in out.stderr and needle in out.stderr, out.stderr
    assert "allowNoServices: true" in out.stderr
    cfg.write_text(cfg.read_text() + "allowNoServices: true\n")
    out = _enforcer("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("source", "named"),
    [
        ("{file: defs.d}", "defs.d"),
        ("{url: 'https://control.example.com/defs.yaml'}", "https://control.example.com/defs.yaml"),
        ("{kubernetes: {namespaces: [team-a, team-b]}}", "kubernetes (team-a,team-b)"),
        ("{kubernetes: {}}", "kubernetes (all namespaces)"),
    ],
)
def test_the_no_service_problem_names_each_source(tmp_path: Path, source: str, named: str) -> None:
    """With no service defined, check's problem names every source, a kubernetes one by its namespaces (not None)."""
    from enforcer.cli import check  # noqa: PLC0415
    from enforcer.config import definitions, settings  # noqa: PLC0415

    path = tmp_path / "enforcer.yaml"
    path.write_text(f"tags: [app=frontend]\nstateDir: state\ndefinitions: [{source}]\n")
    loaded = settings.load_settings(path)
    issue = check._no_service(loaded, definitions.resolve_definitions([], loaded.tags))
    assert issue is not None and issue.value == [named.replace("defs.d", str(tmp_path / "defs.d"))]
    assert "None" not in str(issue)
    assert ("EnforcerService" in str(issue)) == named.startswith("kubernetes")


SECRETS_GID = 54321
"""Stands for enforcer-secrets' gid in the permission table (root may chown to any gid)."""


@pytest.mark.root
@pytest.mark.parametrize(
    ("dir_mode", "dir_gid", "file_mode", "file_gid", "group", "needle"),
    [
        (0o750, SECRETS_GID, 0o640, SECRETS_GID, SECRETS_GID, None),   # what scripts/install makes
        (0o755, 0, 0o644, 0, SECRETS_GID, None),                       # world-readable works (not advised)
        (0o755, 0, 0o600, 0, SECRETS_GID, "chmod 0640"),               # root-only file
        (0o755, 0, 0o640, 0, SECRETS_GID, "chown root:enforcer-secrets"),  # group root, not enforcer-secrets
        (0o700, 0, 0o640, SECRETS_GID, SECRETS_GID, "not searchable"),  # the folder shuts the group out
        (0o755, 0, 0o640, SECRETS_GID, None, "chmod 0640"),             # the group does not exist
    ],
)
def test_a_secret_the_service_user_could_not_read_is_named_with_its_fix(
    dir_mode: int, dir_gid: int, file_mode: int, file_gid: int, group: int | None, needle: str | None
) -> None:
    """unreadable_by_service judges a secret as the shipped unit's user (group enforcer-secrets only) sees it."""
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from enforcer.cli.check import unreadable_by_service  # noqa: PLC0415

    top = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        top.chmod(0o755)
        folder = top / "secrets"
        folder.mkdir()
        secret = folder / "app"
        secret.write_text("s\n")
        os.chown(folder, 0, dir_gid)
        folder.chmod(dir_mode)
        os.chown(secret, 0, file_gid)
        secret.chmod(file_mode)
        why = unreadable_by_service(secret, group)
    finally:
        shutil.rmtree(top)
    if needle is None:
        assert why is None
    else:
        assert why is not None and needle in why, why


@pytest.mark.root
def test_check_as_root_warns_when_the_service_could_not_read_a_secret(cfg: Path) -> None:
    """`enforcer check` run as root warns, with the fix, about a secret file the service's user could not read."""
    secret = cfg.parent / "secret"
    secret.write_text("s\n")
    secret.chmod(0o600)
    defs = cfg.parent / "defs.yaml"
    defs.write_text(defs.read_text().replace("OIDCClientSecret: qcnc1ZFABmwmFwFZD_BAffNRFUn5aYQhvrx4XsxU",
                                             f"OIDCClientSecret: {{file: {secret}}}"))
    out = _enforcer("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "warning: service 'private-app': the enforcer service's user could not read its secret" in out.stdout
    assert "fix: " in out.stdout


def test_the_readme_definitions_example_passes_check(tmp_path: Path) -> None:
    """The service and httpresourcespec shown in README "Configure it" load as printed (secret path aside)."""
    import re  # noqa: PLC0415

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    match = re.search(r"```yaml\n# /etc/enforcer/definitions.d/private-app.yaml.*?\n(.*?)```", readme, re.S)
    assert match is not None
    (tmp_path / "secret").write_text("s\n")
    (tmp_path / "defs.yaml").write_text(match.group(1).replace("/etc/enforcer/secrets/private-app",
                                                               str(tmp_path / "secret")))
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text("tags: [app=frontend]\nstateDir: state\nlogsDir: logs\ndefinitions: [{file: defs.yaml}]\n")
    out = _enforcer("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "redirect URI https://app.example.com/oauth2/callback" in out.stdout
    assert "every signed-in user" not in out.stdout


def test_check_warns_about_a_secret_every_local_user_can_read(cfg: Path) -> None:
    """A world-readable secret file loads, with a warning naming the 0640 root:enforcer-secrets fix."""
    secret = cfg.parent / "secret"
    secret.write_text("s\n")
    secret.chmod(0o644)
    defs = cfg.parent / "defs.yaml"
    defs.write_text(defs.read_text().replace("OIDCClientSecret: qcnc1ZFABmwmFwFZD_BAffNRFUn5aYQhvrx4XsxU",
                                             f"OIDCClientSecret: {{file: {secret}}}"))
    out = _enforcer("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert f"its secret {secret} is readable by every local user" in out.stdout
    assert "chmod 0640" in out.stdout


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


# ------------------------------------------------------------------ the refresh-token key file

KEY_LINE = "q" * 43 + "="  # base64 of 32 bytes


@pytest.mark.parametrize(
    ("content", "mode", "code", "needles"),
    [
        (None, 0o600, 2, ["sessions.refreshTokenKeyFile: cannot read the key file: No such file or directory",
                          "fix: create it: (umask 077; head -c 32 /dev/urandom | base64 > "]),
        ("AAAA\n", 0o600, 2, ["sessions.refreshTokenKeyFile: the key file holds no usable key: line 1: a key must be "
                              "32 bytes, got 3", "fix: one base64 key of 32 bytes a line"]),
        ("# only a comment\n", 0o600, 2, ["the key file holds no usable key: no key in the file"]),
        ("not base64!\n", 0o600, 2, ["the key file holds no usable key: line 1: not base64"]),
        ("caf\u00e9\n", 0o600, 2, ["the key file holds no usable key: not ASCII text"]),
        (KEY_LINE + "\n", 0o644, 0, ["warning: ", "sessions.refreshTokenKeyFile: the key file is readable by every "
                                    "local user (", " 0644)", "fix: chown root:enforcer-secrets "]),
    ],
)
def test_check_validates_the_refresh_token_key_file(
    cfg: Path, content: str | None, mode: int, code: int, needles: list[str]
) -> None:
    """`enforcer check` names the key path, the file and the fix of a key file that is missing or
    holds no usable key (exit 2: the daemon would not start) or that every local user can read (a warning)."""
    keys = cfg.parent / "refresh.keys"
    if content is not None:
        keys.write_text(content, encoding="utf-8")
        keys.chmod(mode)
    cfg.write_text(cfg.read_text() + f"sessions: {{refreshTokenKeyFile: {keys}}}\n")
    out = _enforcer("check", "-c", str(cfg))
    assert out.returncode == code, (out.stdout, out.stderr)
    text = out.stderr if code else out.stdout
    for needle in needles:
        assert needle in text, text
    assert f"(got {str(keys)!r})" in text


def test_check_warns_when_offline_access_has_no_key_file(cfg: Path) -> None:
    """A service asking offline_access without sessions.refreshTokenKeyFile loads, with a warning
    that no refresh token will be kept and how to set the key file (or drop the scope)."""
    defs = cfg.parent / "defs.yaml"
    defs.write_text(defs.read_text().replace("- openid\n", "- openid\n- offline_access\n", 1))
    assert "offline_access" in defs.read_text()
    out = _enforcer("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert ("warning: " in out.stdout and "sessions.refreshTokenKeyFile: service 'private-app' asks offline_access, "
            "but no key file is set: no refresh token will be kept") in out.stdout, out.stdout
    assert "or drop offline_access from its OIDCScopes" in out.stdout


@pytest.mark.root
@pytest.mark.parametrize(
    ("mode", "gid", "root", "needle"),
    [
        (0o600, 0, False, None),
        (0o640, SECRETS_GID, False, None),  # what the service's user reads it as
        (0o640, 0, False, "readable by another group (root:root 0640)"),
        (0o604, SECRETS_GID, False, "readable by every local user"),
        (0o600, 0, True, "the enforcer service's user could not read the key file"),  # as root: the unit's view
        (0o640, SECRETS_GID, True, None),
    ],
)
def test_key_file_permissions(tmp_path: Path, mode: int, gid: int, root: bool, needle: str | None) -> None:
    """A usable key file others may read is a warning with the chown/chmod fix; as root, one the
    shipped unit's user (group enforcer-secrets) could not read is one too."""
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from enforcer.cli.check import refresh_key_findings  # noqa: PLC0415
    from enforcer.config import settings as settings_mod  # noqa: PLC0415

    top = Path(tempfile.mkdtemp(dir="/tmp"))  # searchable folders, as /etc/enforcer is
    try:
        top.chmod(0o755)
        keys = top / "refresh.keys"
        keys.write_text(KEY_LINE + "\n")
        os.chown(keys, 0, gid)
        keys.chmod(mode)
        model = settings_mod.DaemonModel.model_validate(
            {"definitions": [{"file": "/nonexistent"}], "sessions": {"refreshTokenKeyFile": str(keys)}})
        settings = settings_mod.Settings(path=tmp_path / "enforcer.yaml", model=model)
        errors, warnings = refresh_key_findings(settings, None, root=root, group=SECRETS_GID)
    finally:
        shutil.rmtree(top)
    assert errors == []
    if needle is None:
        assert warnings == [], warnings
    else:
        [warning] = warnings
        assert needle in warning.message and warning.path == "sessions.refreshTokenKeyFile"
        assert warning.value == str(keys) and f"chmod 0640 {keys}" in warning.fix
