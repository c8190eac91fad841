"""Config and definitions loading: resolution semantics and key-path error messages."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from enforcer import policy
from enforcer.config import cpus, definitions
from enforcer.config import issues as issues_mod
from enforcer.config import settings as settings_mod
from enforcer.config.definitions import parse_documents, resolve_definitions
from enforcer.config.fields import parse_duration
from enforcer.config.issues import ConfigError
from tests.harness.seed import SERVICE, SPEC


def _resolve(*docs: dict[str, object], tags: tuple[str, ...] = ("app=frontend",)) -> definitions.Definitions:
    text = yaml.safe_dump_all(list(docs))
    parsed = parse_documents(text, "defs.yaml")
    assert isinstance(parsed, list)
    return resolve_definitions(parsed, tags)


def _issues(*docs: dict[str, object], tags: tuple[str, ...] = ("app=frontend",)) -> list[issues_mod.ConfigIssue]:
    with pytest.raises(ConfigError) as exc:
        _resolve(*docs, tags=tags)
    return list(exc.value.issues)


def test_seed_objects_resolve_into_a_service_with_endpoints() -> None:
    """The service and httpresourcespec of the product guide load unchanged and link up."""
    defs = _resolve(SERVICE, SPEC)
    [svc] = defs.services
    assert svc.name == "private-app"
    assert svc.callback_url == "https://app.example.com/oauth2/callback"
    assert svc.origin == "https://app.example.com"
    assert [e.uri for e in svc.endpoints] == ["/*"]
    assert svc.specs == ("nginx",)
    assert svc.client_secret.startswith("qcnc")


def test_selectors_that_do_not_match_this_enforcer_ignore_the_service() -> None:
    """A service whose selectors do not match this enforcer's tags is not served here."""
    defs = _resolve(SERVICE, SPEC, tags=("app=backend",))
    assert defs.services == ()
    assert defs.ignored == ("private-app",)


def test_exposed_apis_pick_specs_by_associated_tags_or_of_ands() -> None:
    """Only httpresourcespecs whose associatedTags satisfy one exposedAPIs clause contribute endpoints."""
    other = {**SPEC, "name": "other", "associatedTags": ["httpresourcespec:name=other"]}
    defs = _resolve(SERVICE, SPEC, other)
    assert defs.services[0].specs == ("nginx",)


def test_service_without_matching_specs_warns_that_everything_is_denied() -> None:
    """A service whose exposedAPIs match nothing loads with a warning."""
    defs = _resolve(SERVICE)
    assert "match no httpresourcespec" in defs.warnings[0]


def test_secret_from_file_is_read(tmp_path: Path) -> None:
    """OIDCClientSecret: {file: ...} reads the secret from that file."""
    secret = tmp_path / "s"
    secret.write_text("from-file\n")
    defs = _resolve({**SERVICE, "OIDCClientSecret": {"file": str(secret)}}, SPEC)
    assert defs.services[0].client_secret == "from-file"


def test_missing_secret_file_names_key_and_fix(tmp_path: Path) -> None:
    """An unreadable secret file is an error naming the key path and what to do."""
    [issue] = _issues({**SERVICE, "OIDCClientSecret": {"file": str(tmp_path / "nope")}}, SPEC)
    assert issue.path == "service[private-app].OIDCClientSecret.file"
    assert "chown root:enforcer-secrets" in issue.fix and "chmod 0640" in issue.fix  # what the shipped unit reads


@pytest.mark.parametrize(
    ("patch", "path", "needle"),
    [
        ({"OIDCScopes": ["email"]}, "service[private-app].OIDCScopes", "openid"),
        ({"port": 70000}, "service[private-app].port", "less than or equal"),
        ({"OIDCProviderURL": "http://idp.example.com"}, "service[private-app].OIDCProviderURL", "https"),
        ({"OIDCCallbackURL": "https://other.example.com"}, "service[private-app].OIDCCallbackURL", "hosts"),
        ({"hosts": ["bad host"]}, "service[private-app].hosts", "DNS name"),
        ({"selectors": [["notatag"]]}, "service[private-app].selectors[0][0]", "key=value"),
        ({"name": "Private_App"}, "service[Private_App].name", "lower-case"),
        ({"OIDCClientSecrt": "x"}, "service[private-app].OIDCClientSecrt", "unknown key"),
    ],
)
def test_invalid_service_fields_name_the_key_path(patch: dict[str, object], path: str, needle: str) -> None:
    """Each invalid service field yields one issue with its key path and a message saying what is wrong."""
    issues = _issues({**SERVICE, **patch}, SPEC)
    assert any(i.path == path and needle in (i.message + i.fix) for i in issues), [str(i) for i in issues]


def test_unknown_key_suggests_the_close_match() -> None:
    """A misspelt key is reported with a did-you-mean suggestion."""
    [issue] = _issues({**SERVICE, "OIDCClientSecrt": "x"}, SPEC)
    assert "OIDCClientSecret" in issue.fix


def test_secret_values_are_never_echoed_in_errors() -> None:
    """An error about the client secret never prints the secret."""
    issues = _issues({**SERVICE, "OIDCClientSecret": 12345}, SPEC)
    assert all("12345" not in str(i) for i in issues)


@pytest.mark.parametrize("secret", [12345, ["a"], {"fil": "/x"}])
def test_a_bad_client_secret_is_one_clear_issue_per_key(secret: object) -> None:
    """A client secret that is neither a string nor {file: ...} is reported at the key itself
    (or at the mapping's own keys), never at pydantic's internal union-branch names."""
    issues = _issues({**SERVICE, "OIDCClientSecret": secret}, SPEC)
    assert issues
    for issue in issues:
        assert issue.path.startswith("service[private-app].OIDCClientSecret"), issue.path
        assert "[" not in issue.path.removeprefix("service[private-app]") and "lax" not in issue.path
    assert len({i.path for i in issues}) == len(issues)


def test_bad_endpoint_uri_is_reported_inside_the_spec() -> None:
    """A non-canonical endpoint URI is reported at endpoints[i].URI."""
    bad = {**SPEC, "endpoints": [{"URI": "/a/../b", "methods": ["GET"]}]}
    issues = _issues(SERVICE, bad)
    assert issues[0].path == "httpresourcespec[nginx].endpoints[0].URI"


def test_duplicate_hosts_across_services_are_rejected() -> None:
    """Two services may not claim the same host on the same exposed port."""
    second = {**SERVICE, "name": "second"}
    issues = _issues(SERVICE, second, SPEC)
    assert any("already served" in i.message for i in issues)


def _svc(name: str, selectors: list[list[str]]) -> dict[str, object]:
    """A valid service of its own host, served where ``selectors`` say."""
    return {**SERVICE, "name": name, "hosts": [f"{name}.example.com"], "OIDCCallbackURL": f"https://{name}.example.com",
            "selectors": selectors}


SELECTED = [_svc("everywhere", []), _svc("front", [["app=frontend"]]),
            _svc("back-or-prod", [["app=backend"], ["team=x", "env=prod"]])]


@pytest.mark.parametrize(
    ("tags", "names"),
    [
        ((), ["everywhere"]),
        (("app=frontend",), ["everywhere", "front"]),
        (("team=x",), ["everywhere"]),                        # one tag of an AND clause is not enough
        (("team=x", "env=prod"), ["everywhere", "back-or-prod"]),
        (("app=backend", "app=frontend"), ["everywhere", "front", "back-or-prod"]),
        (("app=frontend", "$identity=processingunit"), ["everywhere", "front"]),
    ],
)
def test_for_tags_selects_the_services_whose_selectors_match(tags: tuple[str, ...], names: list[str]) -> None:
    """for_tags returns, in document order, the services with no selectors or with one clause the tags satisfy."""
    defs = _resolve(*SELECTED, SPEC, tags=("app=frontend",))
    assert [s.name for s in defs.for_tags(tags)] == names
    assert [s.name for s in defs.catalog] == ["everywhere", "front", "back-or-prod"]


def test_services_are_the_selection_for_the_enforcers_own_tags() -> None:
    """An enforcer's services are for_tags(its tags); the others are listed as ignored."""
    defs = _resolve(*SELECTED, SPEC, tags=("team=x", "env=prod"))
    assert defs.services == defs.for_tags(("team=x", "env=prod"))
    assert [s.name for s in defs.services] == ["everywhere", "back-or-prod"]
    assert defs.ignored == ("front",)


@pytest.mark.parametrize(
    "problem",
    [
        {"OIDCClientSecret": {"file": "/nonexistent/secret"}},
        {"OIDCCallbackURL": "https://front.example.com:99999"},
        {"OIDCProviderURL": "http://idp.example.com"},
        {"OIDCCallbackURL": "https://everywhere.example.com"},  # not one of its hosts
    ],
)
def test_a_broken_service_selected_elsewhere_is_left_out_not_an_error(problem: dict[str, object]) -> None:
    """A service this enforcer does not select stays out of the catalog when broken, without failing the set."""
    defs = _resolve(SELECTED[0], {**SELECTED[1], **problem}, SPEC, tags=())
    assert [s.name for s in defs.services] == [s.name for s in defs.catalog] == ["everywhere"]
    assert defs.ignored == ("front",)


def test_a_callback_port_out_of_range_is_an_issue_not_a_crash() -> None:
    """An OIDCCallbackURL whose port is out of range is reported at its key path."""
    [issue] = _issues({**SERVICE, "OIDCCallbackURL": "https://app.example.com:99999"}, SPEC)
    assert issue.path == "service[private-app].OIDCCallbackURL"


TAG_UNIVERSE = ["app=a", "app=b", "env=prod", "$identity=processingunit"]
tag_sets = st.frozensets(st.sampled_from(TAG_UNIVERSE))
selector_lists = st.lists(st.lists(st.sampled_from(TAG_UNIVERSE), min_size=1, max_size=2), max_size=2)


@settings(max_examples=100, deadline=None)
@given(st.lists(selector_lists, min_size=1, max_size=4), tag_sets, tag_sets, tag_sets)
def test_selection_is_a_pure_monotone_function_of_the_tags(
    selectors: list[list[list[str]]], mine: frozenset[str], other: frozenset[str], more: frozenset[str]
) -> None:
    """Whoever resolved the set, for_tags(T) is what an enforcer with tags T serves, in catalog order, and more tags never select fewer services."""
    docs = [_svc(f"s{i}", sel) for i, sel in enumerate(selectors)]
    defs = _resolve(*docs, SPEC, tags=tuple(mine))
    assert defs.services == defs.for_tags(mine)
    assert _resolve(*docs, SPEC, tags=tuple(other)).services == defs.for_tags(other)
    picked = defs.for_tags(other)
    assert [s for s in defs.catalog if s in picked] == list(picked)
    assert set(picked) <= set(defs.for_tags(other | more))


def test_unknown_kind_is_an_error() -> None:
    """A document with an unknown kind is rejected with the allowed kinds."""
    [issue] = _issues({"kind": "networkpolicy", "name": "x"})
    assert issue.path.endswith("kind") and "service" in issue.fix


def test_invalid_yaml_reports_line_and_column() -> None:
    """A YAML syntax error names the line and column."""
    result = parse_documents("kind: service\nname: [unclosed\n", "x.yaml")
    assert isinstance(result, issues_mod.ConfigIssue)
    assert "line" in result.path


def test_daemon_config_resolves_relative_paths(tmp_path: Path) -> None:
    """Relative paths in enforcer.yaml are relative to its folder; defaults are filled in."""
    (tmp_path / "defs.yaml").write_text(yaml.safe_dump_all([SERVICE, SPEC]))
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text("tags: [app=frontend]\nstateDir: state\nlogsDir: logs\ndefinitions: [{file: defs.yaml}]\n")
    settings = settings_mod.load_settings(cfg)
    assert settings.state_dir == tmp_path / "state"
    assert settings.flow_log == tmp_path / "logs" / "flows.jsonl"
    defs = settings_mod.load_definitions(settings)
    assert defs.services[0].name == "private-app"


def test_session_secret_files_are_relative_to_the_config(tmp_path: Path) -> None:
    """The refresh-token key file and Redis's password and CA files, when relative, are relative to enforcer.yaml's folder (not the working directory)."""
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(
        "definitions: [{file: defs.yaml}]\n"
        "sessions: {store: redis, refreshTokenKeyFile: keys/refresh,\n"
        "           redis: {url: 'rediss://127.0.0.1:6379', passwordFile: secrets/redis, caFile: ca.pem}}\n"
    )
    sessions = settings_mod.load_settings(cfg).model.sessions
    assert sessions.refreshTokenKeyFile == tmp_path / "keys" / "refresh"
    assert sessions.redis is not None
    assert sessions.redis.passwordFile == tmp_path / "secrets" / "redis"
    assert sessions.redis.caFile == tmp_path / "ca.pem"


@pytest.mark.parametrize(
    ("redis", "key", "value", "fix"),
    [
        ("url: 'redis://h:6379', tls: true", "tls", True, "use url: rediss://h:6379"),
        ("url: 'redis://:pw@h:6379/1', caFile: ca.pem", "caFile", "ca.pem", "use url: rediss://:***@h:6379/1"),
        ("url: 'unix:///run/redis.sock', tls: true", "tls", True, "remove tls"),
        ("url: 'unix:///run/redis.sock', caFile: ca.pem", "caFile", "ca.pem", "remove caFile"),
    ],
)
def test_redis_tls_settings_without_rediss_are_refused(
    tmp_path: Path, redis: str, key: str, value: object, fix: str
) -> None:
    """sessions.redis.tls or caFile with a redis:// or unix:// URL (redis-py would connect in plaintext) is refused at its key path, with the value, the URL (password hidden) and the fix."""
    issue = _first_issue(tmp_path, f"sessions: {{store: redis, redis: {{{redis}}}}}\n")
    assert issue.path == f"sessions.redis.{key}" and issue.value == value
    assert "plaintext" in issue.message and "pw" not in str(issue)
    assert issue.fix.startswith(fix)


@pytest.mark.parametrize(
    "redis",
    ["url: 'rediss://h:6379', tls: true, caFile: ca.pem", "url: 'redis://h:6379', tls: false",
     "sentinels: ['10.0.0.1:26379'], tls: true, caFile: ca.pem"],
)
def test_redis_tls_settings_that_take_effect_are_accepted(tmp_path: Path, redis: str) -> None:
    """tls/caFile with a rediss:// URL or with Sentinels, and tls: false with redis://, are accepted."""
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(f"definitions: [{{file: d.yaml}}]\nsessions: {{store: redis, redis: {{{redis}}}}}\n")
    assert settings_mod.load_settings(cfg).model.sessions.redis is not None


@pytest.mark.parametrize("query", ["ssl_cert_reqs=none", "ssl_check_hostname=false", "socket_timeout=30&db=1"])
def test_redis_url_options_that_override_settings_are_refused(tmp_path: Path, query: str) -> None:
    """A sessions.redis.url query option other than db (redis-py lets it win over TLS checks and timeout) is refused at sessions.redis."""
    issue = _first_issue(tmp_path, f"sessions: {{store: redis, redis: {{url: 'rediss://h:6379/?{query}'}}}}\n")
    assert issue.path == "sessions.redis" and query.partition("=")[0] in issue.message


@pytest.mark.parametrize(
    ("redis", "in_url"),
    [("url: 'rediss://:pw@h:6379/0', db: 3", 0), ("url: 'redis://h/1?db=2', db: 1", 2),
     ("url: 'unix:///run/redis.sock?db=4', db: 2", 4)],
)
def test_redis_db_conflicting_with_the_url_is_refused(tmp_path: Path, redis: str, in_url: int) -> None:
    """sessions.redis.db with a different database in the URL (redis-py would use the URL's) is refused at sessions.redis.db, naming both values and the fix."""
    issue = _first_issue(tmp_path, f"sessions: {{store: redis, redis: {{{redis}}}}}\n")
    assert issue.path == "sessions.redis.db" and issue.value != in_url
    assert f"database {in_url} of url" in issue.message and "pw" not in str(issue)
    assert issue.fix.startswith("give the database once") and f"db: {issue.value}" in issue.fix


@pytest.mark.parametrize(
    ("redis", "db"),
    [("url: 'rediss://h:6379/5'", 0), ("url: 'rediss://h:6379/5', db: 5", 5), ("url: 'rediss://h:6379', db: 7", 7),
     ("url: 'rediss://h:6379/', db: 7", 7), ("url: 'unix:///run/redis.sock', db: 2", 2)],
)
def test_redis_db_given_once_is_accepted(tmp_path: Path, redis: str, db: int) -> None:
    """A database in the URL alone, in db alone, or the same in both, is accepted."""
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text(f"definitions: [{{file: d.yaml}}]\nsessions: {{store: redis, redis: {{{redis}}}}}\n")
    r = settings_mod.load_settings(cfg).model.sessions.redis
    assert r is not None and r.db == db


@pytest.mark.parametrize("url", ["rediss://h:6379/zero", "rediss://h:6379/?db=x"])
def test_redis_url_database_that_is_not_a_number_is_refused(tmp_path: Path, url: str) -> None:
    """A URL database that is not a number (redis-py ignores a path, fails on a query) is refused at sessions.redis."""
    issue = _first_issue(tmp_path, f"sessions: {{store: redis, redis: {{url: '{url}'}}}}\n")
    assert issue.path == "sessions.redis" and "not a database number" in issue.message


def _first_issue(tmp_path: Path, daemon_yaml: str) -> issues_mod.ConfigIssue:
    """The first issue load_settings reports for this daemon config (after a definitions line)."""
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text("definitions: [{file: d.yaml}]\n" + daemon_yaml)
    with pytest.raises(ConfigError) as exc:
        settings_mod.load_settings(cfg)
    return exc.value.issues[0]


def test_admin_listener_must_be_loopback(tmp_path: Path) -> None:
    """The admin address must be a loopback address; the error says so."""
    issue = _first_issue(tmp_path, "admin: {address: 0.0.0.0}\n")
    assert issue.path == "admin.address"
    assert "loopback" in issue.message


def test_idle_timeout_longer_than_absolute_is_rejected(tmp_path: Path) -> None:
    """sessions.idleTimeout may not exceed sessions.absoluteTimeout."""
    assert _first_issue(tmp_path, "sessions: {idleTimeout: 2d, absoluteTimeout: 1d}\n").path == "sessions.idleTimeout"


def test_session_cache_size_must_be_positive(tmp_path: Path) -> None:
    """sessions.cacheSize below 1 is refused, naming the key; the default is 10,000."""
    assert _first_issue(tmp_path, "sessions: {cacheSize: 0}\n").path == "sessions.cacheSize"
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text("definitions: [{file: d.yaml}]\n")
    assert settings_mod.load_settings(cfg).model.sessions.cacheSize == 10_000


def test_several_workers_need_the_sqlite_store(tmp_path: Path) -> None:
    """listen.workers > 1 with the in-memory session store is refused at listen.workers, with the fix."""
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text("definitions: [{file: d.yaml}]\nlisten: {workers: 2}\nsessions: {store: memory}\n")
    with pytest.raises(ConfigError) as exc:
        settings_mod.load_settings(cfg)
    issue = exc.value.issues[0]
    assert issue.path == "listen.workers" and issue.value == 2
    assert "sessions.store: sqlite" in issue.fix


@pytest.mark.parametrize("workers", [0, 65])
def test_workers_option_out_of_range_is_refused(tmp_path: Path, workers: int) -> None:
    """--workers outside 1..64 is a configuration error naming the option and the value."""
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text("definitions: [{file: d.yaml}]\n")
    with pytest.raises(ConfigError) as exc:
        settings_mod.with_workers(settings_mod.load_settings(cfg), workers)
    assert exc.value.issues[0].source == "--workers" and exc.value.issues[0].value == workers


def test_workers_auto_is_one_per_usable_cpu(tmp_path: Path) -> None:
    """listen.workers: auto and --workers auto both become the number of CPUs this process may use."""
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text("definitions: [{file: d.yaml}]\nlisten: {workers: auto}\n")
    expected = min(cpus.MAX_WORKERS, cpus.usable_cpus())
    assert settings_mod.load_settings(cfg).model.listen.workers == expected
    cfg.write_text("definitions: [{file: d.yaml}]\n")
    assert settings_mod.with_workers(settings_mod.load_settings(cfg), "auto").model.listen.workers == expected


def test_workers_neither_number_nor_auto_names_the_key(tmp_path: Path) -> None:
    """A listen.workers value that is neither a number nor auto is refused at listen.workers."""
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text("definitions: [{file: d.yaml}]\nlisten: {workers: lots}\n")
    with pytest.raises(ConfigError) as exc:
        settings_mod.load_settings(cfg)
    assert exc.value.issues[0].path == "listen.workers" and exc.value.issues[0].value == "lots"


@pytest.mark.parametrize(
    ("proc_cgroup", "files", "limit"),
    [
        # cgroup v2 in a container (cgroup namespace): the mount root is the pod's cgroup
        ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),  # a 1500m Kubernetes limit
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        ("0::/\n", {"cpu.max": "garbage\n"}, None),
        ("0::/\n", {}, None),  # no CPU controller
        # cgroup v2 on a host: systemd CPUQuota= on the unit, or on a parent slice
        ("0::/system.slice/enforcer.service\n", {"system.slice/enforcer.service/cpu.max": "50000 100000"}, 0.5),
        ("0::/system.slice/enforcer.service\n",
         {"system.slice/cpu.max": "100000 100000", "system.slice/enforcer.service/cpu.max": "max 100000"}, 1.0),
        ("0::/system.slice/enforcer.service\n",
         {"system.slice/cpu.max": "300000 100000", "system.slice/enforcer.service/cpu.max": "200000 100000"}, 2.0),
        # cgroup v1: Docker's bind mount (the host path does not exist inside), and a host unit
        ("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n",
         {"cpu,cpuacct/cpu.cfs_quota_us": "250000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 2.5),
        ("4:cpu,cpuacct:/system.slice/enforcer.service\n",
         {"cpu,cpuacct/system.slice/enforcer.service/cpu.cfs_quota_us": "100000",
          "cpu,cpuacct/system.slice/enforcer.service/cpu.cfs_period_us": "100000"}, 1.0),
        ("4:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, None),
        (None, {}, None),  # no /proc/self/cgroup (not Linux)
    ],
    ids=["v2-pod", "v2-max", "v2-junk", "v2-none", "v2-unit", "v2-parent-slice", "v2-smallest", "v1-docker",
         "v1-unit", "v1-unlimited", "no-cgroups"],
)
def test_cgroup_cpu_limit_reads_the_processs_own_cgroup(
    tmp_path: Path, proc_cgroup: str | None, files: dict[str, str], limit: float | None
) -> None:
    """The CPU quota is the smallest along the process's own cgroup and its parents, v2 or v1; none when unlimited."""
    proc = tmp_path / "proc-self-cgroup"
    if proc_cgroup is not None:
        proc.write_text(proc_cgroup)
    root = tmp_path / "sys-fs-cgroup"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert cpus.cgroup_cpu_limit(proc, root) == limit
    affinity = len(os.sched_getaffinity(0))
    expected = affinity if limit is None else max(1, min(affinity, math.ceil(limit)))
    assert cpus.usable_cpus(proc, root) == expected  # rounded up: 1.5 CPUs keep 2 processes busy


def test_workers_option_overrides_the_config(tmp_path: Path) -> None:
    """--workers replaces listen.workers and leaves every other setting alone."""
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text("definitions: [{file: d.yaml}]\nlisten: {port: 9443}\n")
    settings = settings_mod.with_workers(settings_mod.load_settings(cfg), 3)
    assert settings.model.listen.workers == 3 and settings.model.listen.port == 9443


@pytest.mark.parametrize(
    ("text", "seconds"), [("30", 30.0), (45, 45.0), ("10m", 600.0), ("8h", 28800.0), ("1d", 86400.0), ("250ms", 0.25)]
)
def test_durations_parse(text: object, seconds: float) -> None:
    """Durations accept plain seconds and s/m/h/d/ms suffixes."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1w", "-5", "ten", True, None, -1])
def test_bad_durations_are_rejected(text: object) -> None:
    """Anything else is a ValueError with an example of a valid duration."""
    with pytest.raises(ValueError, match="30s"):
        parse_duration(text)


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*SERVICE.keys(), "junk"]), yaml_values, max_size=12))
def test_loader_is_total_on_arbitrary_service_documents(doc: dict[str, object]) -> None:
    """Any document either resolves or raises ConfigError whose issues all have a source and a message."""
    doc = {"kind": "service", **doc}
    try:
        resolve_definitions([definitions.RawDocument("h.yaml", 0, doc)], ("app=frontend",))
    except ConfigError as exc:
        assert exc.issues
        assert all(i.source and i.message for i in exc.issues)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_yaml_parser_is_total(text: str) -> None:
    """parse_documents returns documents or one issue for any text; it never raises."""
    result = parse_documents(text, "t.yaml")
    assert isinstance(result, list | issues_mod.ConfigIssue)


# ---------------------------------------------------------------------------
# issue 18 item 3: `check` tells the whole truth


@pytest.mark.parametrize(
    ("daemon_yaml", "path", "needle"),
    [
        ("listen: {port: 0}\n", "listen.port", "listener"),
        ("admin: {port: -1}\n", "admin.port", "/readyz"),
        ("tags: [frontend]\n", "tags[0]", "selectors"),
    ],
)
def test_daemon_config_keys_have_their_own_fix_hints(tmp_path: Path, daemon_yaml: str, path: str, needle: str) -> None:
    """A bad daemon-config key gets a hint about that key, never the definitions' hint of a same-named key."""
    issue = _first_issue(tmp_path, daemon_yaml)
    assert issue.path == path
    assert needle in issue.fix, issue.fix
    assert "app's internal" not in issue.fix


@pytest.mark.parametrize(("method", "needle"), [("PSOT", "did you mean POST?"), ("FROB", "GET, POST")])
def test_unknown_http_methods_are_errors(method: str, needle: str) -> None:
    """An endpoint naming a method HTTP does not have is an error at its key path, with a suggestion."""
    bad = {**SPEC, "endpoints": [{"URI": "/*", "methods": ["GET", method]}]}
    [issue] = _issues(SERVICE, bad)
    assert issue.path == "httpresourcespec[nginx].endpoints[0].methods"
    assert method in issue.message and needle in issue.message


def test_known_methods_any_case_and_the_wildcard_are_accepted() -> None:
    """Registered methods in any case, WebDAV ones and ``*`` load, upper-cased."""
    spec = {**SPEC, "endpoints": [{"URI": "/*", "methods": ["get", "PROPFIND", "*"]}]}
    [svc] = _resolve(SERVICE, spec).services
    assert svc.endpoints[0].methods == frozenset({"GET", "PROPFIND", "*"})


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]"])
def test_an_ip_literal_host_is_rejected_with_a_fix(host: str) -> None:
    """A service host that is an IP literal is refused at load (no SNI for IPs), naming a DNS-name fix."""
    issues = _issues({**SERVICE, "hosts": [host], "OIDCCallbackURL": "https://app.example.com"}, SPEC)
    [issue] = [i for i in issues if i.path == "service[private-app].hosts"]
    assert "IP address" in issue.message and "/etc/hosts" in issue.message


@pytest.mark.parametrize(
    ("callback", "url", "path"),
    [
        ("https://app.example.com", "https://app.example.com/oauth2/callback", "/oauth2/callback"),
        ("https://app.example.com/", "https://app.example.com/oauth2/callback", "/oauth2/callback"),
        ("https://app.example.com/oauth2/callback", "https://app.example.com/oauth2/callback", "/oauth2/callback"),
        ("https://app.example.com/oauth2/callback/", "https://app.example.com/oauth2/callback", "/oauth2/callback"),
        ("https://app.example.com/x", "https://app.example.com/x/oauth2/callback", "/x/oauth2/callback"),
        ("https://app.example.com/x/oauth2/callback", "https://app.example.com/x/oauth2/callback", "/x/oauth2/callback"),
    ],
)
def test_a_callback_url_ending_in_the_callback_path_is_the_full_redirect_uri(callback: str, url: str, path: str) -> None:
    """OIDCCallbackURL is an origin (or prefix) the callback path is appended to, or already the
    full redirect URI; it never becomes .../oauth2/callback/oauth2/callback."""
    [svc] = _resolve({**SERVICE, "OIDCCallbackURL": callback}, SPEC).services
    assert (svc.callback_url, svc.callback_path) == (url, path)


def test_a_typo_in_a_service_does_not_hide_a_bad_url_or_a_missing_secret_file(tmp_path: Path) -> None:
    """A service with an unknown key still has its URLs and secret file checked: every problem in one pass."""
    doc = {**SERVICE, "OIDCClientSecrt": "x", "OIDCProviderURL": "http://idp.example.com",
           "OIDCClientSecret": {"file": str(tmp_path / "missing")}}
    paths = {i.path for i in _issues(doc, SPEC)}
    assert paths == {
        "service[private-app].OIDCClientSecrt",
        "service[private-app].OIDCProviderURL",
        "service[private-app].OIDCClientSecret.file",
    }


def test_a_typo_in_the_daemon_config_still_yields_usable_settings(tmp_path: Path) -> None:
    """read_settings reports every daemon-config problem and keeps the rest usable (bad keys at defaults)."""
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text("tags: [app=frontend]\nlisen: {port: 1}\nadmin: {address: 0.0.0.0}\n"
                   "sessions: {idleTimeout: 2d}\ndefinitions: [{file: defs.yaml}, {url: ftp://x}]\n")
    settings, problems = settings_mod.read_settings(cfg)
    assert {p.path for p in problems} == {"lisen", "admin.address", "definitions[1]", "sessions.idleTimeout"}
    assert settings is not None
    assert settings.sources == (tmp_path / "defs.yaml",)
    assert settings.model.admin.address == "127.0.0.1"
    with pytest.raises(ConfigError) as exc:
        settings_mod.load_settings(cfg)
    assert len(exc.value.issues) == 4


@pytest.mark.parametrize(
    ("scopes", "warned"),
    [
        ([[]], True),                                     # a bare empty clause: easily a slip
        ([["groups=staff"], []], True),
        ("any-signed-in-user", False),                    # the documented, explicit form
        ([["groups=staff"]], False),
    ],
)
def test_every_signed_in_user_is_allowed_only_when_written_explicitly(scopes: object, warned: bool) -> None:
    """An empty allowedScopes clause lets every signed-in user in but warns; ``any-signed-in-user`` does
    the same silently."""
    spec = {**SPEC, "endpoints": [{"URI": "/*", "methods": ["GET"], "allowedScopes": scopes}]}
    defs = _resolve(SERVICE, spec)
    assert any("every signed-in user" in w for w in defs.warnings) is warned
    decision = policy.decide("GET", "/x", frozenset({"email=bob@example.com"}), defs.services[0].table)
    assert (decision.verdict is policy.Verdict.ALLOW) is (scopes != [["groups=staff"]])


def test_a_bad_allowed_scopes_value_is_one_issue_naming_both_forms() -> None:
    """A value that is neither a tag expression nor any-signed-in-user is reported once, at the key."""
    spec = {**SPEC, "endpoints": [{"URI": "/*", "methods": ["GET"], "allowedScopes": "everyone"}]}
    [issue] = _issues(SERVICE, spec)
    assert issue.path == "httpresourcespec[nginx].endpoints[0].allowedScopes"
    assert "any-signed-in-user" in issue.fix


def test_a_bad_tag_in_allowed_scopes_is_reported_at_the_tag_only() -> None:
    """A malformed tag inside allowedScopes is one issue at the tag, not also a complaint about the keyword."""
    spec = {**SPEC, "endpoints": [{"URI": "/*", "methods": ["GET"], "allowedScopes": [["bad"]]}]}
    [issue] = _issues(SERVICE, spec)
    assert issue.path == "httpresourcespec[nginx].endpoints[0].allowedScopes[0][0]"


@pytest.mark.parametrize("mark", ["0x4000", "0x8000", "0x454E", "0xC001"])
def test_redirect_mark_with_kubernetes_bits_is_refused(tmp_path: Path, mark: str) -> None:
    """A redirect.mark with Kubernetes' KUBE-MARK-MASQ or KUBE-MARK-DROP bit is refused, naming the key and the default to use (on a node such connections are masqueraded or dropped)."""
    issue = _first_issue(tmp_path, f"redirect: {{enabled: true, mark: {mark}}}\n")
    assert issue.path == "redirect.mark"
    assert "KUBE-MARK-MASQ" in issue.message and "0x204E" in issue.message


def test_default_redirect_mark_avoids_the_bits_node_networks_use() -> None:
    """The default SO_MARK shares no bit with Kubernetes' (0xC000), Cilium's (0x0F00) or Calico's (0xFFFF0000) marks."""
    from enforcer.net.ruleset import DEFAULT_MARK  # noqa: PLC0415

    assert settings_mod.RedirectModel().mark == DEFAULT_MARK
    assert DEFAULT_MARK & (0xC000 | 0x0F00 | 0xFFFF0000) == 0


# ---------------------------------------------------------------------------
# flows in the container log (flowLogStdout), metrics a Prometheus can scrape (metrics:)


def _settings(tmp_path: Path, daemon_yaml: str) -> settings_mod.Settings:
    cfg = tmp_path / "enforcer.yaml"
    cfg.write_text("definitions: [{file: d.yaml}]\n" + daemon_yaml)
    return settings_mod.load_settings(cfg)


@pytest.mark.parametrize(("daemon_yaml", "stdout"), [("", False), ("flowLogStdout: true\n", True),
                                                      ("flowLogStdout: false\n", False)])
def test_flow_log_stdout_is_off_unless_set_and_keeps_the_file(tmp_path: Path, daemon_yaml: str, stdout: bool) -> None:
    """flowLogStdout is off by default; on or off, the flow log file stays where flowLog/logsDir say."""
    settings = _settings(tmp_path, daemon_yaml + f"logsDir: {tmp_path}/logs\n")
    assert settings.model.flowLogStdout is stdout
    assert settings.flow_log == tmp_path / "logs" / "flows.jsonl"


def test_flow_log_stdout_must_be_a_boolean(tmp_path: Path) -> None:
    """A flowLogStdout that is not true/false is an error at its key with its own hint."""
    issue = _first_issue(tmp_path, "flowLogStdout: sometimes\n")
    assert issue.path == "flowLogStdout"
    assert "standard output" in issue.fix


@pytest.mark.parametrize(
    ("daemon_yaml", "expected"),
    [
        ("", None),
        ("metrics: {}\n", ("::", 9091)),
        ("metrics: {address: 0.0.0.0, port: 9100}\n", ("0.0.0.0", 9100)),
        ("metrics: {address: 10.0.0.5}\n", ("10.0.0.5", 9091)),
        ("metrics: {address: 127.0.0.1, port: 0}\n", ("127.0.0.1", 0)),
    ],
)
def test_metrics_listener_is_opt_in_and_may_bind_any_address(
    tmp_path: Path, daemon_yaml: str, expected: tuple[str, int] | None
) -> None:
    """Without metrics: there is no metrics-only listener; with it, any IP address (not only loopback) and port 9091 by default."""
    metrics = _settings(tmp_path, daemon_yaml).model.metrics
    assert (None if metrics is None else (metrics.address, metrics.port)) == expected


@pytest.mark.parametrize(
    ("daemon_yaml", "path", "needle"),
    [
        ("metrics: {address: node-1}\n", "metrics.address", "IP address"),
        ("metrics: {port: 70000}\n", "metrics.port", ""),
        ("metrics: {adress: 0.0.0.0}\n", "metrics.adress", "did you mean 'address'?"),
        ("metrics: {address: 0.0.0.0, reload: true}\n", "metrics.reload", "known keys"),
    ],
)
def test_metrics_listener_errors_name_the_key(tmp_path: Path, daemon_yaml: str, path: str, needle: str) -> None:
    """A bad metrics: key is an error at its key path (there is no reload: to turn on)."""
    issue = _first_issue(tmp_path, daemon_yaml)
    assert issue.path == path
    assert needle in issue.message + issue.fix, issue


def test_admin_stays_loopback_when_metrics_are_exposed(tmp_path: Path) -> None:
    """Exposing metrics does not loosen admin: a non-loopback admin address is still refused."""
    issue = _first_issue(tmp_path, "metrics: {address: 0.0.0.0}\nadmin: {address: 0.0.0.0}\n")
    assert issue.path == "admin.address" and "loopback" in issue.message
