#!/usr/bin/env python3
"""Benchmark driver behind ``scripts/bench`` (run that: it installs the Debian tools first).

Everything runs on 127.0.0.1; every process this script starts is stopped by its PID at the
end (and gets SIGTERM from the kernel if this script dies: PR_SET_PDEATHSIG).

Columns (``--columns``):

* ``bare``     -- the upstream itself: nginx returning a fixed 100-byte body over plain HTTP
                  (no TLS, no auth).  Its "new connection" figure is a new TCP connection.
* ``nginx``    -- nginx as a TLS reverse proxy in front of the upstream, no auth (the ceiling).
* ``apache``   -- Apache 2.4 (mpm_event) + mod_auth_openidc as a TLS reverse proxy with OIDC
                  login against the same OP (its own client registration), ``Require valid-user``.
* ``enforcer`` -- ``python -m enforcer run`` with production defaults: flow log on, SQLite
                  sessions, uvloop, the policy allowing ``GET /*`` to ``groups=staff``.
* ``enforcer-redis`` -- the ``enforcer`` column with ``sessions.store: redis``: a redis-server the
                  bench starts itself on 127.0.0.1 (its own port and dir, persistence off, an ACL
                  user with a password file, pinned to the server core, stopped by its PID at the
                  end). Its "server CPU" is the enforcer's tree; the redis-server's CPU is reported
                  beside it (``store_cpu_us_per_req``). The report adds ``enforcer-redis/enforcer``
                  ratios: the Redis store against the SQLite store in the same run.
* ``enforcer-2w`` -- the same with ``--workers 2`` (a supervisor and two worker processes
                  sharing the port with SO_REUSEPORT; own state dir, port and OP client).
                  Pinned to the one server core like everything else, two workers cannot go
                  faster there: see the scaling runs (d) below.
* ``enforcer-base`` -- opt-in, with ``--baseline DIR``: the ``enforcer`` column run from another
                  checkout (e.g. ``git worktree add /tmp/base <old commit>``), so an old and a new
                  commit are measured in the same run; the report adds their A/B ratios.
* ``enforcer-full`` -- opt-in: the ``enforcer`` column with ``listen.fastPath: false``, every
                  request through aiohttp and the full gate (what the lean path saves).
* ``floor-raw``, ``floor-aiohttp``, ``floor-proxy`` -- opt-in reference servers from
                  scripts/bench_floor.py on the same uvloop + TLS, no auth: a raw httptools
                  protocol, aiohttp's low-level server, and a lean proxy through the enforcer's
                  upstream pool. They show what the server stack costs before the enforcer's
                  own request path.

Servers (upstream, proxies, OP) are pinned to core 0, the load generator (wrk) and this
driver (which runs the scripted-browser logins) to core 1.  Per column and repetition:

(a) keep-alive load: ``wrk -t1 -c64`` with the session cookie, every response checked (200
    and exactly the upstream's body) by scripts/bench-wrk.lua; any miss makes the run INVALID;
(b) a new connection per request: the same with ``Connection: close`` (``-c16``); the server
    CPU time divided by the connections is the cost of one TLS handshake plus one request;
(c) ``--logins`` complete login round trips, one after the other, each with a fresh client:
    GET protected -> OP -> login form -> POST -> callback -> app page (checked).

Once at the end, after all repetitions (so the per-repetition figures above are never
measured with the extra sessions in memory):

(d) workers scaling, when both ``enforcer`` and ``enforcer-2w`` run: per repetition, the
    keep-alive load (a) once more for each, *unpinned*: the servers (upstream and enforcer)
    and wrk may all use every core, so wrk shares the cores with the servers.  Reported as
    the separate "workers scaling (unpinned)" table: req/s and CPU per request, 2w / 1w.
(e) ``--sessions N`` live sessions (default 10,000; quick 1,000; 0 = off) for each enforcer
    column, ``--redis-sessions N`` (default 100,000; quick 5,000) for enforcer-redis: N
    realistic sessions (unique users, tags from the enforcer's own claims_to_tags, an ID token
    of the real one's shape, about its size) are written to the column's session store with
    the enforcer's own code (``SQLiteSessionStore.create`` on its file, ``RedisSessionStore.create``
    into its Redis), then each is used once for a GET through the enforcer over TLS (8
    keep-alive connections; every answer must be 200 + the upstream body), in batches of
    10,000 so each is used within seconds of its creation. Each such first use is a cache
    miss (one read of the store; beyond ``sessions.cacheSize`` = 10,000 it also evicts one):
    server CPU per miss. Then 5,000 requests over the 2,000 most recent sessions (cache hits,
    same client): server CPU per hit, and "cost of a cache miss" = miss - hit (enforcer +
    redis-server). Then the RSS/PSS of the enforcer's process tree is recorded ("RSS with N
    live sessions"; target <= 80 MB), and for enforcer-redis the redis-server's RSS.

Server CPU is utime+stime of the server's process tree (all threads, live children and reaped
ones) from /proc over the run, divided by the requests wrk completed.  For the proxies the
upstream's own CPU is reported separately (it is the same work for every column).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.harness.browser import ScriptedBrowser  # noqa: E402
from tests.harness.op import OPUser, RunningOP, make_tls_material, start_op  # noqa: E402

ALL_COLUMNS = (
    "bare", "nginx", "apache", "enforcer", "enforcer-redis", "enforcer-base", "enforcer-2w", "enforcer-full",
    "floor-raw", "floor-aiohttp", "floor-proxy",
)
DEFAULT_COLUMNS = ("bare", "nginx", "apache", "enforcer", "enforcer-redis", "enforcer-2w")
FLOOR_COLUMNS = ("floor-raw", "floor-aiohttp", "floor-proxy")  # opt-in: scripts/bench_floor.py
ENFORCER_WORKERS = {  # column -> --workers
    "enforcer": 1, "enforcer-redis": 1, "enforcer-base": 1, "enforcer-2w": 2, "enforcer-full": 1,
}
BASE_COLUMN = "enforcer-base"  # the `enforcer` column run from the --baseline checkout (same-run A/B)
NO_FAST_PATH = frozenset({"enforcer-full"})  # listen.fastPath: false (every request through aiohttp)
REDIS_COLUMN = "enforcer-redis"  # sessions.store: redis, against a redis-server the bench starts
REDIS_USER = "enforcer"  # its ACL user (keys and channels under REDIS_PREFIX only; the default user is off)
REDIS_PREFIX = "enforcer:"  # sessions.redis.keyPrefix (the default)
SESSIONS_BATCH = 10_000  # (e) sessions are created and first used in batches of this many (see sessions_run)
HIT_SAMPLE = 2_000  # (e) the most recently used sessions, used again: the same client's cache-hit baseline
HIT_REQUESTS = 5_000  # (e) requests of that baseline (round robin over the sample: enough for /proc's 10 ms ticks)
CREATE_CONCURRENCY = 32  # (e) concurrent creates into Redis (one MULTI round trip each)
AUTH_COLUMNS = ("apache", *ENFORCER_WORKERS)
SERVICE = "app"  # the enforcer's service name in ENFORCER_DEFINITIONS
TOUCH_CONNECTIONS = 8  # keep-alive connections that use each live session once
RSS_TARGET_MIB = 80e6 / 2**20  # issue #5: RSS <= 80 MB with 10,000 live sessions
HOST = "localhost"  # resolves to 127.0.0.1 only (/etc/hosts); wrk sends it as SNI
USER, PASSWORD = "alice", "alice-pw"
USERS = {
    USER: OPUser(PASSWORD, {"email": "alice@example.com", "email_verified": True,
                            "groups": ["staff"], "preferred_username": "alice", "name": "Alice"}),
}
BODY = ("enforcer-bench upstream body " + "0123456789" * 10)[:99] + "\n"
assert len(BODY.encode()) == 100
WRK_SCRIPT = REPO / "scripts" / "bench-wrk.lua"
APACHE_MODULES = Path("/usr/lib/apache2/modules")
CLK_TCK = os.sysconf("SC_CLK_TCK")
STOP_GRACE = 10.0
DASH, TIMES = "\u2013", "\u00d7"  # for the Markdown table


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- CPU pinning


@dataclass(frozen=True)
class Cores:
    server: str | None  # taskset -c argument, None = no pinning
    client: str | None

    def wrap(self, cmd: Sequence[str], server: bool = True) -> list[str]:
        cpu = self.server if server else self.client
        return ["taskset", "-c", cpu, *cmd] if cpu is not None else list(cmd)


def pick_cores() -> Cores:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2 or shutil.which("taskset") is None:
        log("fewer than 2 cores (or no taskset): servers and load generator are not pinned")
        return Cores(None, None)
    return Cores(str(available[0]), str(available[1]))


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# ---------------------------------------------------------------- /proc


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces: split after its closing paren
    return raw[raw.rindex(")") + 2:].split()


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(int(entry))
        if st is not None:
            children.setdefault(int(st[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root: int) -> float:
    """utime+stime of the tree, plus cutime+cstime (children already reaped) of each member."""
    ticks = 0
    for pid in tree_pids(root):
        st = _stat(pid)
        if st is None:
            continue
        # after the paren: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
        ticks += int(st[11]) + int(st[12]) + int(st[13]) + int(st[14])
    return ticks / CLK_TCK


def cpu_steal() -> float:
    """Seconds of steal time (the hypervisor ran someone else) over all CPUs so far."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / CLK_TCK
    return 0.0


def core_times(core: str | None) -> tuple[float, float]:
    """(busy, total) jiffies of one CPU (all CPUs when None) from /proc/stat."""
    name = "cpu" if core is None else f"cpu{core}"
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            f = line.split()
            if f and f[0] == name:
                v = [int(x) for x in f[1:9]]  # user nice system idle iowait irq softirq steal
                return float(sum(v) - v[3] - v[4]), float(sum(v))
    return 0.0, 0.0


def parse_http_response(raw: bytes) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response read to EOF; chunked bodies are decoded."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return 0, raw[:120]
    if any(line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower() for line in lines):
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return status, body


def set_tree_affinity(root: int, cpus: set[int]) -> None:
    """Move every thread of every process in the tree to ``cpus`` (new threads and forked
    children inherit it from their creator)."""
    for pid in tree_pids(root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError, ValueError):
                os.sched_setaffinity(int(tid), cpus)


def tree_memory(root: int) -> dict[str, float]:
    """RSS and PSS (MiB) summed over the tree; PSS splits pages shared between workers. Also
    the anonymous part of the RSS (heap, stacks: what the process itself allocated); the rest
    is file-backed (the pages of shared libraries it has touched, plus those the kernel maps
    around each fault from the page cache, so it varies a little with what else ran)."""
    rss = pss = anon = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
                elif line.startswith("Anonymous:"):
                    anon += int(line.split()[1])
    return {"rss_mib": round(rss / 1024, 1), "pss_mib": round(pss / 1024, 1), "rss_anon_mib": round(anon / 1024, 1)}


# ---------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_file: Path
    stop_signal: int = signal.SIGTERM

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, self.stop_signal)
        try:
            self.popen.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.popen.wait()


def spawn(name: str, cmd: Sequence[str], log_file: Path, *, cwd: Path | None = None,
          env: dict[str, str] | None = None, stop_signal: int = signal.SIGTERM) -> Proc:
    with open(log_file, "ab") as out:
        popen = subprocess.Popen(
            list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, env=env, preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
    log(f"started {name} pid {popen.pid}")
    return Proc(name, popen, log_file, stop_signal)


async def wait_http(url: str, proc: Proc, *, timeout: float = 30.0,
                    ssl_ctx: ssl.SSLContext | bool = False, accept: Callable[[int], bool]) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with http.get(url, ssl=ssl_ctx, allow_redirects=False,
                                    timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if accept(r.status):
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready at {url} in {timeout:.0f}s:\n{proc.tail()}")


# ---------------------------------------------------------------- server configs


def _nginx_common(d: Path) -> str:
    return f"""\
daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
"""


def _nginx_temp_paths(d: Path) -> str:
    return "\n".join(
        f"  {k}_temp_path {d}/tmp-{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def nginx_upstream_conf(d: Path, port: int) -> str:
    return _nginx_common(d) + f"""\
http {{
{_nginx_temp_paths(d)}
  access_log off;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{
      default_type text/plain;
      return 200 "{BODY[:-1]}\\n";
    }}
  }}
}}
"""


def nginx_proxy_conf(d: Path, port: int, upstream: int, cert: Path, key: Path) -> str:
    return _nginx_common(d) + f"""\
http {{
{_nginx_temp_paths(d)}
  access_log {d}/access.log combined;
  keepalive_requests 1000000;
  upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} ssl backlog=4096;
    server_name {HOST};
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
    }}
  }}
}}
"""


def apache_conf(d: Path, port: int, upstream: int, cert: Path, key: Path, op: RunningOP,
                client_id: str, client_secret: str, run_user: str | None) -> str:
    # mod_unixd and mod_log_config are built into Debian's apache2
    mods = ["mpm_event", "authz_core", "authz_user", "authn_core", "socache_shmcb", "ssl", "proxy", "proxy_http", "auth_openidc"]
    load = "\n".join(f"LoadModule {m}_module {APACHE_MODULES}/mod_{m}.so" for m in mods)
    user = f"User {run_user}\nGroup {run_user}\n" if run_user else ""
    return f"""\
ServerRoot {d}
ServerName {HOST}
{load}
{user}PidFile {d}/httpd.pid
Mutex file:{d} default
ErrorLog {d}/error.log
LogLevel warn
LogFormat "%h %l %u %t \\"%r\\" %>s %b \\"%{{Referer}}i\\" \\"%{{User-Agent}}i\\"" combined
CustomLog {d}/access.log combined
Listen 127.0.0.1:{port}
ListenBacklog 4096
StartServers 2
ServerLimit 2
ThreadsPerChild 64
MaxRequestWorkers 128
MinSpareThreads 64
MaxSpareThreads 128
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 75
SSLSessionCache shmcb:{d}/ssl_scache(512000)
SSLRandomSeed startup builtin
<VirtualHost 127.0.0.1:{port}>
  ServerName {HOST}
  SSLEngine on
  SSLCertificateFile {cert}
  SSLCertificateKeyFile {key}
  OIDCProviderMetadataURL {op.discovery_url}
  OIDCCABundlePath {d}/op-ca.crt
  OIDCClientID {client_id}
  OIDCClientSecret {client_secret}
  OIDCProviderTokenEndpointAuth client_secret_basic
  OIDCRedirectURI https://{HOST}:{port}/redirect_uri
  OIDCCryptoPassphrase {secrets.token_hex(16)}
  OIDCScope "openid email profile groups"
  OIDCPKCEMethod S256
  OIDCSessionInactivityTimeout 28800
  OIDCSessionMaxDuration 86400
  <Location />
    AuthType openid-connect
    Require valid-user
  </Location>
  ProxyPass /redirect_uri !
  ProxyPass / http://127.0.0.1:{upstream}/
  ProxyPassReverse / http://127.0.0.1:{upstream}/
</VirtualHost>
"""


ENFORCER_DEFINITIONS = """\
kind: service
name: app
authorizationType: OIDC
OIDCClientID: {client_id}
OIDCClientSecret: {{file: {secret}}}
OIDCProviderURL: {issuer}
OIDCCallbackURL: https://{host}:{port}
OIDCScopes: [openid, email, profile, groups]
hosts: [{host}]
port: {app_port}
exposedPort: {port}
selectors: [[role=web]]
exposedAPIs: [[httpresourcespec:name=app]]
type: HTTP
associatedTags: [service:name=app]
---
kind: httpresourcespec
name: app
associatedTags: [httpresourcespec:name=app]
endpoints:
  - {{URI: /*, methods: [GET], allowedScopes: [[groups=staff]]}}
"""

ENFORCER_CONFIG = """\
tags: [role=web]
listen: {{address: 127.0.0.1, port: {port}, fastPath: {fast_path}}}
admin: {{address: 127.0.0.1, port: {admin_port}}}
stateDir: {state}
logsDir: {state}/logs
definitions:
  - file: {state}/definitions.yaml
oidc:
  caFile: {op_ca}
{sessions}"""

# the enforcer-redis column's `sessions:` (the others keep the default SQLite store)
ENFORCER_REDIS_SESSIONS = """\
sessions:
  store: redis
  maxSessions: {max_sessions}
  redis: {{url: "redis://127.0.0.1:{port}", username: {user}, passwordFile: {password_file}}}
"""


def redis_conf(d: Path, port: int, password: str) -> str:
    """A redis-server of the bench's own: loopback only, its own port and dir, no persistence
    (no RDB snapshots, no AOF: a restart starts empty), an ACL user like a production setup's
    and the default user off."""
    return f"""\
bind 127.0.0.1
port {port}
dir {d}
save ""
appendonly no
daemonize no
logfile ""
user default off
user {REDIS_USER} on >{password} ~{REDIS_PREFIX}* &{REDIS_PREFIX}* +@all -@dangerous
"""


# ---------------------------------------------------------------- columns


@dataclass
class Column:
    name: str
    url: str  # what wrk loads
    proc: Proc | None = None  # the server measured (None: column not started)
    store_proc: Proc | None = None  # enforcer-redis: its redis-server (CPU and memory reported apart)
    cookie: str = ""
    logins: int = 0  # how many times we (re)logged in for the load runs
    error: str = ""
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def auth(self) -> bool:
        return self.name in AUTH_COLUMNS


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.cores = pick_cores()
        self.procs: list[Proc] = []
        self.op: RunningOP | None = None
        self.upstream: Proc | None = None
        self.columns: dict[str, Column] = {}
        self.trust = ssl.create_default_context()
        self.versions: dict[str, str] = {}
        # every core this process may use, before amain() pins it to the client core
        self.all_cpus = set(os.sched_getaffinity(0))
        self.enforcer_clients: dict[str, tuple[str, str]] = {}  # column -> (client id, secret)
        self.enforcer_ports: dict[str, int] = {}
        self.enforcer_state: dict[str, Path] = {}
        self.redis: Proc | None = None  # the enforcer-redis column's redis-server
        self.redis_port = 0
        self.redis_password_file: Path | None = None

    # ------------------------------------------------------------ start

    def _spawn(self, name: str, cmd: Sequence[str], **kw: Any) -> Proc:
        proc = spawn(name, self.cores.wrap(cmd), self.workdir / f"{name}.log", **kw)
        self.procs.append(proc)
        return proc

    async def start(self) -> None:
        wanted = self.args.columns
        up_dir = self.workdir / "upstream"
        up_dir.mkdir()
        up_port = free_port()
        (up_dir / "nginx.conf").write_text(nginx_upstream_conf(up_dir, up_port))
        self.upstream = self._spawn("upstream", ["nginx", "-p", str(up_dir), "-c", str(up_dir / "nginx.conf")])
        up_url = f"http://127.0.0.1:{up_port}/"
        await wait_http(up_url, self.upstream, accept=lambda s: s == 200)
        self.up_port = up_port

        tls = make_tls_material(self.workdir / "proxy-tls", name="proxy", dns_names=(HOST,))
        self.trust.load_verify_locations(cadata=tls.ca_pem.decode())
        self.proxy_tls = tls

        if "bare" in wanted:
            self.columns["bare"] = Column("bare", up_url, proc=self.upstream)
        if "nginx" in wanted:
            await self._start_column("nginx", self._start_nginx)
        if any(c in wanted for c in AUTH_COLUMNS):
            await self._start_op()
        if "apache" in wanted:
            await self._start_column("apache", self._start_apache)
        for name, workers in ENFORCER_WORKERS.items():
            if name in wanted:
                await self._start_column(name, functools.partial(self._start_enforcer, name, workers))
        for name in FLOOR_COLUMNS:
            if name in wanted:
                await self._start_column(name, functools.partial(self._start_floor, name))

    async def _start_floor(self, name: str) -> Column:
        """A reference server from scripts/bench_floor.py (no auth: what the stack costs)."""
        port = free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1", BENCH_BODY=BODY)
        proc = self._spawn(
            name,
            [sys.executable, str(REPO / "scripts" / "bench_floor.py"), name.removeprefix("floor-"), str(port),
             str(self.proxy_tls.cert_file), str(self.proxy_tls.key_file), str(self.up_port)],
            cwd=REPO, env=env,
        )
        url = f"https://{HOST}:{port}/"
        await wait_http(url, proc, ssl_ctx=self.trust, accept=lambda s: s == 200)
        return Column(name, url, proc=proc)

    async def _start_column(self, name: str, starter: Callable[[], Any]) -> None:
        try:
            self.columns[name] = await starter()
        except Exception as exc:  # a broken column is reported, the others still run
            log(f"{name}: could not start: {exc}")
            self.columns[name] = Column(name, "", error=f"start failed: {exc}")

    async def _start_nginx(self) -> Column:
        d = self.workdir / "nginx"
        d.mkdir()
        port = free_port()
        (d / "nginx.conf").write_text(
            nginx_proxy_conf(d, port, self.up_port, self.proxy_tls.cert_file, self.proxy_tls.key_file)
        )
        proc = self._spawn("nginx", ["nginx", "-p", str(d), "-c", str(d / "nginx.conf")])
        url = f"https://{HOST}:{port}/"
        await wait_http(url, proc, ssl_ctx=self.trust, accept=lambda s: s == 200)
        return Column("nginx", url, proc=proc)

    def _pin_all_threads(self, pid: int) -> None:
        if self.cores.server is not None:
            subprocess.run(
                ["taskset", "-a", "-p", "-c", self.cores.server, str(pid)],
                check=False, capture_output=True,
            )

    async def _start_op(self) -> None:
        self.apache_client = ("apache-client", "apache-" + secrets.token_hex(12))
        self.apache_port = free_port()
        clients: list[dict[str, Any]] = [
            {"client_id": self.apache_client[0], "client_secret": self.apache_client[1],
             "redirect_uris": [f"https://{HOST}:{self.apache_port}/redirect_uri"],
             "token_endpoint_auth_method": "client_secret_basic"},
        ]
        for name in ENFORCER_WORKERS:  # one client registration per enforcer column
            client = (f"{name}-client", f"{name}-" + secrets.token_hex(12))
            port = free_port()
            self.enforcer_clients[name], self.enforcer_ports[name] = client, port
            clients.append(
                {"client_id": client[0], "client_secret": client[1],
                 "redirect_uris": [f"https://{HOST}:{port}/oauth2/callback"],
                 "post_logout_redirect_uris": [f"https://{HOST}:{port}/"],
                 "token_endpoint_auth_method": "client_secret_basic"})
        self.op = await start_op(self.workdir / "op", clients=clients, users=USERS)
        self._pin_all_threads(self.op.pid)
        self.trust.load_verify_locations(cadata=self.op.ca_pem.decode())
        log(f"started OP pid {self.op.pid} at {self.op.issuer}")

    async def _start_apache(self) -> Column:
        if self.op is None:
            raise RuntimeError("no OP")
        d = self.workdir / "apache"
        d.mkdir()
        shutil.copy(self.op.ca_file, d / "op-ca.crt")
        run_user = None
        if os.geteuid() == 0:
            # Apache refuses to serve as root; its children (www-data) read the OP CA
            run_user = "www-data"
            for p in (self.workdir, d):
                p.chmod(0o755)
            (d / "op-ca.crt").chmod(0o644)
        port = self.apache_port
        (d / "httpd.conf").write_text(apache_conf(
            d, port, self.up_port, self.proxy_tls.cert_file, self.proxy_tls.key_file, self.op,
            *self.apache_client, run_user,
        ))
        (d / "httpd.conf").chmod(0o600)  # holds the client secret and crypto passphrase
        proc = self._spawn("apache", ["apache2", "-d", str(d), "-f", str(d / "httpd.conf"), "-DFOREGROUND"],
                           stop_signal=signal.SIGTERM)
        url = f"https://{HOST}:{port}/"
        # an unauthenticated GET must be redirected to the OP
        await wait_http(url, proc, ssl_ctx=self.trust, accept=lambda s: s == 302)
        return Column("apache", url, proc=proc)

    async def _start_redis(self) -> Proc:
        """The enforcer-redis column's redis-server: 127.0.0.1 on a port of its own, its own
        dir, persistence off, pinned to the server core; stopped by its PID at the end."""
        d = self.workdir / "redis"
        d.mkdir(mode=0o700)
        password = secrets.token_hex(16)
        self.redis_password_file = d / "password"
        self.redis_password_file.write_text(password + "\n")
        self.redis_password_file.chmod(0o600)
        self.redis_port = free_port()
        (d / "redis.conf").write_text(redis_conf(d, self.redis_port, password))
        (d / "redis.conf").chmod(0o600)  # holds the password
        proc = self._spawn("redis", ["redis-server", str(d / "redis.conf")])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"redis-server exited ({proc.popen.returncode}):\n{proc.tail()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            self.redis = proc
            return proc
        raise RuntimeError(f"redis-server not listening on 127.0.0.1:{self.redis_port}:\n{proc.tail()}")

    def redis_config(self) -> Any:
        """The Redis store's settings as the enforcer-redis column has them (for the bench's own
        writes into that store in phase (e))."""
        from enforcer.identity import redis as redis_store  # noqa: PLC0415 -- only the Redis column needs redis-py

        return redis_store.RedisConfig(url=f"redis://127.0.0.1:{self.redis_port}", username=REDIS_USER,
                                       password_file=self.redis_password_file, key_prefix=REDIS_PREFIX,
                                       timeout=10.0)

    async def _start_enforcer(self, name: str, workers: int) -> Column:
        """An enforcer column: ``workers`` > 1 adds ``--workers N`` (supervisor + N workers);
        enforcer-redis starts its redis-server first and uses ``sessions.store: redis``."""
        if self.op is None:
            raise RuntimeError("no OP")
        state = self.workdir / name
        state.mkdir()
        sessions = ""
        store_proc = None
        if name == REDIS_COLUMN:
            store_proc = await self._start_redis()
            sessions = ENFORCER_REDIS_SESSIONS.format(
                port=self.redis_port, user=REDIS_USER, password_file=self.redis_password_file,
                max_sessions=max(100_000, 2 * self.args.redis_sessions),
            )
        client_id, client_secret = self.enforcer_clients[name]
        port, admin_port = self.enforcer_ports[name], free_port()
        secret_file = state / "client-secret"
        secret_file.write_text(client_secret)
        secret_file.chmod(0o600)
        (state / "definitions.yaml").write_text(ENFORCER_DEFINITIONS.format(
            client_id=client_id, secret=secret_file, issuer=self.op.issuer,
            host=HOST, port=port, app_port=self.up_port,
        ))
        (state / "enforcer.yaml").write_text(ENFORCER_CONFIG.format(
            port=port, admin_port=admin_port, state=state, op_ca=self.op.ca_file,
            fast_path="false" if name in NO_FAST_PATH else "true", sessions=sessions,
        ))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cwd = REPO
        if name == BASE_COLUMN:  # `-m` puts the working directory first on sys.path: the old code
            cwd = self.args.baseline
            env["PYTHONPATH"] = str(self.args.baseline)
        cmd = [sys.executable, "-m", "enforcer", "run", "-c", str(state / "enforcer.yaml"), "--log-level", "warning"]
        if workers > 1:
            cmd += ["--workers", str(workers)]  # an enforcer without the option exits: "start failed"
        proc = self._spawn(name, cmd, cwd=cwd, env=env)
        await wait_http(f"http://127.0.0.1:{admin_port}/readyz", proc, timeout=60,
                        accept=lambda s: s == 200)
        self.trust.load_verify_locations(cafile=str(state / "ca" / "ca.crt"))
        self.enforcer_state[name] = state
        return Column(name, f"https://{HOST}:{port}/", proc=proc, store_proc=store_proc)

    # ------------------------------------------------------------ stop

    async def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
                log(f"stopped {proc.name} pid {proc.pid} (exit {proc.popen.returncode})")
            except Exception as exc:
                log(f"stopping {proc.name} pid {proc.pid}: {exc}")
        if self.op is not None:
            await self.op.stop()
            log(f"stopped OP pid {self.op.pid}")

    # ------------------------------------------------------------ login

    def browser(self) -> ScriptedBrowser:
        return ScriptedBrowser(self.trust, resolve={HOST: "127.0.0.1"}, timeout=30)

    async def login_once(self, col: Column) -> tuple[float, ScriptedBrowser]:
        """One complete login round trip with a fresh client; returns (seconds, browser)."""
        browser = self.browser()
        t0 = time.perf_counter()
        try:
            resp = await asyncio.wait_for(browser.login(col.url, USER, PASSWORD), 60)
        except BaseException:
            await browser.close()
            raise
        elapsed = time.perf_counter() - t0
        if resp.status != 200 or resp.text != BODY:
            await browser.close()
            raise RuntimeError(
                f"{col.name}: login ended on {resp.url} with {resp.status}, "
                f"{len(resp.text)} bytes: {resp.text[:200]!r} (hops: {resp.urls})"
            )
        if len(resp.history) < 4:
            await browser.close()
            raise RuntimeError(f"{col.name}: login did not go through the OP: {resp.urls}")
        return elapsed, browser

    async def ensure_cookie(self, col: Column) -> None:
        """(Re)login when the column's cookie no longer yields the upstream page."""
        if not col.auth:
            return
        if col.cookie and await self.check(col):
            return
        _, browser = await self.login_once(col)
        col.cookie = browser.cookies.header_for(col.url, same_site=True, method="GET")
        await browser.close()
        col.logins += 1
        if not await self.check(col):
            raise RuntimeError(f"{col.name}: the session cookie from the login does not work")

    async def check(self, col: Column) -> bool:
        headers = {"Cookie": col.cookie} if col.cookie else {}
        connector = aiohttp.TCPConnector(ssl=self.trust)
        async with aiohttp.ClientSession(connector=connector) as http:
            try:
                async with http.get(col.url, headers=headers, allow_redirects=False,
                                    timeout=aiohttp.ClientTimeout(total=10)) as r:
                    return r.status == 200 and await r.text() == BODY
            except (aiohttp.ClientError, OSError, TimeoutError):
                return False

    # ------------------------------------------------------------ load

    def all_cpus_arg(self) -> str:
        return ",".join(str(c) for c in sorted(self.all_cpus))

    async def wrk(self, col: Column, *, close: bool, duration: float, connections: int,
                  unpinned: bool = False) -> dict[str, Any]:
        env = dict(os.environ, BENCH_COOKIE=col.cookie, BENCH_BODY=BODY,
                   BENCH_CLOSE="1" if close else "0")
        cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
               "--timeout", "10s", "-s", str(WRK_SCRIPT), col.url]
        # unpinned: every core (this process itself is pinned to the client core, wrk would inherit it)
        cmd = ["taskset", "-c", self.all_cpus_arg(), *cmd] if unpinned else self.cores.wrap(cmd, server=False)
        proc = await asyncio.create_subprocess_exec(
            *cmd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), duration + 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"wrk against {col.name} did not finish") from None
        text = out.decode(errors="replace")
        m = re.search(r"^BENCHJSON (\{.*\})$", text, re.M)
        if proc.returncode != 0 or m is None:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {text[-800:]} {err.decode()[-800:]}")
        result: dict[str, Any] = json.loads(m.group(1))
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child reaped meanwhile
        result["client_cpu_s"] = round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 3)
        bad = re.search(r"^BENCHBAD (.*)$", text, re.M)
        if bad:
            result["bad_sample"] = bad.group(1)[:200]
        return result

    async def fullhs_client(self, col: Column, *, duration: float, concurrency: int) -> dict[str, Any]:
        """New connection per request with a *full* TLS handshake each time (no session is
        offered: Python's ssl never resumes unless asked); every response checked."""
        parts = urlsplit(col.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 443
        tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE  # like wrk: the client's verify cost is not the server's
        cookie = f"Cookie: {col.cookie}\r\n" if col.cookie else ""
        request = (f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n{cookie}"
                   "User-Agent: enforcer-bench\r\nConnection: close\r\n\r\n").encode()
        latencies: list[float] = []
        counts = {"ok": 0, "bad": 0, "errors": 0}
        sample: list[str] = []
        deadline = time.monotonic() + duration

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, ssl=tls, server_hostname=host if tls else None), 10)
                writer.write(request)
                raw = await asyncio.wait_for(reader.read(), 10)
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                counts["errors"] += 1
                if not sample:
                    sample.append(f"error {exc!r}")
                return
            latencies.append(time.perf_counter() - t0)
            status, body = parse_http_response(raw)
            if status == 200 and body == BODY.encode():
                counts["ok"] += 1
            else:
                counts["bad"] += 1
                if not sample:
                    sample.append(f"{status} {body[:120]!r}")

        async def worker() -> None:
            while time.monotonic() < deadline:
                await one()

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - t0
        latencies.sort()

        def pct(q: float) -> int:
            return int(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e6) if latencies else 0

        n = counts["ok"] + counts["bad"]
        return {
            "requests": n, "duration_us": int(elapsed * 1e6), "ok": counts["ok"],
            "bad_status": counts["bad"], "bad_body": 0, "connect_errors": counts["errors"],
            "read_errors": 0, "write_errors": 0, "timeouts": 0,
            "p50_us": pct(0.5), "p90_us": pct(0.9), "p99_us": pct(0.99),
            "max_us": int(latencies[-1] * 1e6) if latencies else 0,
            "bad_sample": sample[0] if sample else "",
        }

    async def load_run(self, col: Column, *, close: bool, duration: float,
                       full_handshake: bool = False, unpinned: bool = False) -> dict[str, Any]:
        """One measured run.  ``unpinned`` (keep-alive only): the caller has let the servers
        use every core; wrk runs on every core too and "server core busy" is all cores."""
        assert col.proc is not None
        assert self.upstream is not None
        connections = self.args.newconn_connections if close else self.args.connections
        await self.ensure_cookie(col)
        if not close and self.args.warmup > 0:
            await self.wrk(col, close=False, duration=self.args.warmup, connections=connections, unpinned=unpinned)
        up_measured = col.proc is not self.upstream
        cpu0 = tree_cpu_seconds(col.proc.pid)
        up0 = tree_cpu_seconds(self.upstream.pid) if up_measured else 0.0
        store0 = tree_cpu_seconds(col.store_proc.pid) if col.store_proc is not None else 0.0
        steal0 = cpu_steal()
        server_core = None if unpinned else self.cores.server
        core0 = core_times(server_core)
        t0 = time.monotonic()
        if full_handshake:
            own0 = resource.getrusage(resource.RUSAGE_SELF)
            result = await self.fullhs_client(col, duration=duration, concurrency=connections)
            own1 = resource.getrusage(resource.RUSAGE_SELF)
            result["client_cpu_s"] = own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime
        else:
            result = await self.wrk(col, close=close, duration=duration, connections=connections,
                                    unpinned=unpinned)
        wall = time.monotonic() - t0
        cpu = tree_cpu_seconds(col.proc.pid) - cpu0
        up_cpu = (tree_cpu_seconds(self.upstream.pid) - up0) if up_measured else None
        store_cpu = (tree_cpu_seconds(col.store_proc.pid) - store0) if col.store_proc is not None else None
        mem = tree_memory(col.proc.pid)
        steal = cpu_steal() - steal0
        core1 = core_times(server_core)
        core_busy = (core1[0] - core0[0]) / (core1[1] - core0[1]) if core1[1] > core0[1] else None
        n = result["requests"]
        invalid = []
        if n == 0:
            invalid.append("no request completed")
        if result["bad_status"] or result["bad_body"]:
            invalid.append(f"{result['bad_status']} non-200, {result['bad_body']} wrong bodies"
                           + (f" (first: {result.get('bad_sample', '')})" if result.get("bad_sample") else ""))
        if result["connect_errors"] and full_handshake:
            invalid.append(f"{result['connect_errors']} connections failed")
        if result["ok"] != n:
            invalid.append(f"{n - result['ok']} responses not checked as 200 + body")
        errors = sum(result[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
        run = {
            "column": col.name,
            "mode": "fullhs" if full_handshake else ("newconn" if close else
                                                     ("scaling" if unpinned else "keepalive")),
            "connections": connections,
            "duration_s": round(result["duration_us"] / 1e6, 3),
            "wall_s": round(wall, 3),
            "requests": n,
            "rps": round(n / (result["duration_us"] / 1e6), 1) if result["duration_us"] else 0.0,
            "p50_ms": result["p50_us"] / 1000,
            "p90_ms": result["p90_us"] / 1000,
            "p99_ms": result["p99_us"] / 1000,
            "max_ms": result["max_us"] / 1000,
            "socket_errors": errors,
            "cpu_s": round(cpu, 3),
            "cpu_util": round(cpu / wall, 3) if wall else None,
            # wrk's own CPU (cores): near 1.0 means the load generator, not the server, was the limit
            "client_cpu_util": round(result["client_cpu_s"] / wall, 3) if wall else None,
            "cpu_us_per_req": round(cpu * 1e6 / n, 1) if n else None,
            "upstream_cpu_us_per_req": round(up_cpu * 1e6 / n, 1) if (n and up_cpu is not None) else None,
            # enforcer-redis: the redis-server's CPU (not in cpu_us_per_req, which is the enforcer's tree)
            "store_cpu_us_per_req": round(store_cpu * 1e6 / n, 1) if (n and store_cpu is not None) else None,
            **mem,
            "steal_s": round(steal, 3),
            # the whole server core (proxy + upstream + OP + kernel): below 1.0 means idle gaps
            "server_core_busy": round(core_busy, 3) if core_busy is not None else None,
            "valid": not invalid,
            "invalid_reason": "; ".join(invalid),
            "wrk": result,
        }
        flag = "" if run["valid"] else f"  INVALID: {run['invalid_reason']}"
        log(f"{col.name:11s} {run['mode']:9s} {run['rps']:9.0f} req/s  p50 {run['p50_ms']:.2f} ms"
            f"  p99 {run['p99_ms']:.2f} ms  cpu {run['cpu_us_per_req']} us/req"
            f"  rss {mem['rss_mib']} MiB{flag}")
        return run

    async def login_runs(self, col: Column, count: int) -> dict[str, Any]:
        assert col.proc is not None
        times: list[float] = []
        errors: list[str] = []
        cpu0 = tree_cpu_seconds(col.proc.pid)
        for _ in range(count):
            try:
                elapsed, browser = await self.login_once(col)
                await browser.close()
                times.append(elapsed)
            except Exception as exc:
                errors.append(str(exc)[:300])
        cpu = tree_cpu_seconds(col.proc.pid) - cpu0
        run = {
            "column": col.name,
            "mode": "login",
            "count": count,
            "ok": len(times),
            "median_ms": round(statistics.median(times) * 1000, 2) if times else None,
            "min_ms": round(min(times) * 1000, 2) if times else None,
            "max_ms": round(max(times) * 1000, 2) if times else None,
            "cpu_us_per_login": round(cpu * 1e6 / len(times), 1) if times else None,
            "valid": not errors and bool(times),
            "invalid_reason": "; ".join(errors[:3]),
        }
        flag = "" if run["valid"] else f"  INVALID: {run['invalid_reason']}"
        log(f"{col.name:11s} login     median {run['median_ms']} ms over {len(times)}/{count}{flag}")
        return run

    # ------------------------------------------------------------ (d) workers scaling

    async def scaling_run(self, col: Column) -> dict[str, Any]:
        """Keep-alive load with the servers (this column's tree and the upstream) and wrk
        allowed on every core; the servers are pinned back afterwards."""
        assert col.proc is not None
        assert self.upstream is not None
        trees = (col.proc.pid, self.upstream.pid)
        for pid in trees:
            set_tree_affinity(pid, self.all_cpus)
        try:
            return await self.load_run(col, close=False, duration=self.args.duration, unpinned=True)
        finally:
            if self.cores.server is not None:
                for pid in trees:
                    set_tree_affinity(pid, {int(self.cores.server)})

    # ------------------------------------------------------------ (e) live sessions

    async def sessions_run(self, col: Column, count: int) -> dict[str, Any]:
        """Create ``count`` sessions in the column's store (SQLite, or Redis for enforcer-redis)
        and use each once through the enforcer: every such request is a cache miss (the enforcer
        has never seen the session; with more sessions than ``sessions.cacheSize`` each miss also
        evicts one). Then make :data:`HIT_REQUESTS` requests over the last :data:`HIT_SAMPLE` of
        them (cache hits through the same client: the baseline for the miss's cost) and measure
        the memory of the tree.

        Sessions are created and first used in batches of :data:`SESSIONS_BATCH`, so each is
        used within seconds of its creation (well within the stores' 60 s touch interval): a
        miss here is one read of the store, never a read plus a ``last_seen`` write."""
        from enforcer.identity import cookies as cookies_mod  # noqa: PLC0415 -- only this phase needs it

        assert col.proc is not None
        await self.ensure_cookie(col)
        found, handle = cookies_mod.find_cookie([col.cookie], cookies_mod.session_cookie_name(SERVICE))
        if found is not cookies_mod.CookieLookup.FOUND or not handle:
            raise RuntimeError(f"{col.name}: no session cookie in {col.cookie[:80]!r}")
        cookie_name = cookies_mod.session_cookie_name(SERVICE)
        mem0 = tree_memory(col.proc.pid)
        redis = col.store_proc is not None
        store, real_token = await self._open_store(col, handle)
        created_s = touch_s = cpu = store_cpu = 0.0
        touched = {"ok": 0, "bad": 0, "errors": 0, "sample": ""}
        last: list[str] = []
        try:
            template = await store.get(handle, SERVICE, time.time())
            if template is None:
                raise RuntimeError(f"{col.name}: the bench session is not in its session store")
            factory = SyntheticSessions(template, real_token)
            semaphore = asyncio.Semaphore(CREATE_CONCURRENCY if redis else 1)

            async def create(i: int) -> str:
                async with semaphore:
                    return f"{cookie_name}={await store.create(factory.make(i, time.time()))}"

            for start in range(0, count, SESSIONS_BATCH):
                t0 = time.monotonic()
                last = list(await asyncio.gather(*(create(i) for i in range(start, min(count, start + SESSIONS_BATCH)))))
                created_s += time.monotonic() - t0
                cpu0, store0 = tree_cpu_seconds(col.proc.pid), self._store_cpu(col)
                t1 = time.monotonic()
                batch = await self.touch_sessions(col, last)
                touch_s += time.monotonic() - t1
                cpu += tree_cpu_seconds(col.proc.pid) - cpu0
                store_cpu += self._store_cpu(col) - store0
                for k in ("ok", "bad", "errors"):
                    touched[k] += batch[k]
                touched["sample"] = touched["sample"] or batch["sample"]
                log(f"{col.name:11s} sessions  {start + len(last)}/{count} created and used once")
            stored = await store.count()
        finally:
            await store.close()
        # the same client again over the most recent sessions: all in the cache now
        sample = last[-HIT_SAMPLE:]
        hits = [sample[i % len(sample)] for i in range(HIT_REQUESTS)] if sample else []
        cpu0, store0 = tree_cpu_seconds(col.proc.pid), self._store_cpu(col)
        hit = await self.touch_sessions(col, hits)
        hit_cpu = tree_cpu_seconds(col.proc.pid) - cpu0
        hit_store_cpu = self._store_cpu(col) - store0
        await asyncio.sleep(0.5)  # let the last responses' buffers go
        mem = tree_memory(col.proc.pid)
        invalid = []
        if touched["ok"] != count:
            invalid.append(f"{touched['ok']}/{count} touches were 200 + body; {touched['bad']} other answers, "
                           f"{touched['errors']} errors (first: {touched['sample']})")
        if hit["ok"] != len(hits):
            invalid.append(f"{hit['ok']}/{len(hits)} cached-session requests were 200 + body (first: {hit['sample']})")

        def per(seconds: float, n: int) -> float | None:
            return round(seconds * 1e6 / n, 1) if n else None

        miss_total = per(cpu + store_cpu, count)
        hit_total = per(hit_cpu + hit_store_cpu, len(hits))
        run = {
            "column": col.name, "mode": "sessions", "sessions": count, "stored": stored,
            "store": "redis" if redis else "sqlite",
            "ok": touched["ok"], "bad": touched["bad"], "errors": touched["errors"],
            "bad_sample": touched["sample"],
            "create_s": round(created_s, 3), "touch_s": round(touch_s, 3),
            "touch_rps": round(count / touch_s, 1) if touch_s else None,
            # every first use is a cache miss: the enforcer's tree CPU per such request
            "cpu_us_per_touch": per(cpu, count),
            "hits": len(hits), "hits_ok": hit["ok"], "cpu_us_per_hit": per(hit_cpu, len(hits)),
            # enforcer-redis: the redis-server's CPU per miss / per hit (None for SQLite: in-process)
            "store_cpu_us_per_touch": per(store_cpu, count) if redis else None,
            "store_cpu_us_per_hit": per(hit_store_cpu, len(hits)) if redis else None,
            # what a miss costs beyond a hit, enforcer + redis-server, same client and connections
            "miss_extra_cpu_us": round(miss_total - hit_total, 1)
            if miss_total is not None and hit_total is not None else None,
            "rss_before_mib": mem0["rss_mib"], "pss_before_mib": mem0["pss_mib"], **mem,
            "store_rss_mib": tree_memory(col.store_proc.pid)["rss_mib"] if col.store_proc is not None else None,
            "id_token_bytes": factory.sample_token_len, "real_id_token_bytes": len(factory.real_token),
            "valid": not invalid, "invalid_reason": "; ".join(invalid),
        }
        flag = "" if run["valid"] else f"  INVALID: {run['invalid_reason']}"
        log(f"{col.name:11s} sessions  created {count} in {created_s:.1f} s ({stored} in the store); first use "
            f"(miss) {touched['ok']}/{count} in {touch_s:.1f} s ({run['touch_rps']}/s, {run['cpu_us_per_touch']} us "
            f"cpu each + store {run['store_cpu_us_per_touch']}); hit {run['cpu_us_per_hit']} us + store "
            f"{run['store_cpu_us_per_hit']}; RSS {mem0['rss_mib']} -> {mem['rss_mib']} MiB, PSS {mem0['pss_mib']} "
            f"-> {mem['pss_mib']} MiB; store RSS {run['store_rss_mib']}{flag}")
        return run

    def _store_cpu(self, col: Column) -> float:
        return tree_cpu_seconds(col.store_proc.pid) if col.store_proc is not None else 0.0

    async def _open_store(self, col: Column, handle: str) -> tuple[Any, str]:
        """The column's session store opened by this process with the enforcer's own code (the
        Redis store for enforcer-redis, else its SQLite file), and the raw ID token of the bench
        user's real session (the template of the synthetic ones)."""
        key = hashlib.sha256(handle.encode("ascii")).digest()  # stores key sessions by SHA-256(handle)
        if col.store_proc is not None:
            from enforcer.identity import redis as redis_store  # noqa: PLC0415 -- only the Redis column needs it

            config = self.redis_config()
            client = config.client()
            try:
                raw = await client.hget(f"{REDIS_PREFIX}s:{key.hex()}", "t")
            finally:
                await client.aclose()
            token = raw.decode() if isinstance(raw, bytes) else ""
            if token.count(".") != 2:
                raise RuntimeError(f"{col.name}: no ID token (JWS) stored in Redis for the bench session")
            store: Any = redis_store.RedisSessionStore(
                config, idle_timeout=8 * 3600.0, max_sessions=max(100_000, 2 * self.args.redis_sessions),
                cache_size=1024,
            )
            return store, token
        from enforcer.identity import sqlite  # noqa: PLC0415 -- only this phase needs the package

        db = self.enforcer_state[col.name] / "sessions.db"
        store = sqlite.SQLiteSessionStore(db, idle_timeout=8 * 3600.0, max_sessions=max(100_000, 2 * self.args.sessions))
        try:
            return store, raw_id_token(db, key)
        except BaseException:
            await store.close()
            raise

    async def touch_sessions(self, col: Column, cookies: Sequence[str]) -> dict[str, Any]:
        """One GET per cookie over TOUCH_CONNECTIONS keep-alive TLS connections; counts answers."""
        counts = {"ok": 0, "bad": 0, "errors": 0}
        sample: list[str] = []
        todo = iter(cookies)
        body = BODY.encode()
        connector = aiohttp.TCPConnector(ssl=self.trust, limit=TOUCH_CONNECTIONS)
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as http:

            async def worker() -> None:
                for cookie in todo:  # shared: each cookie is used by exactly one worker, once
                    try:
                        async with http.get(col.url, headers={"Cookie": cookie}, allow_redirects=False,
                                            timeout=aiohttp.ClientTimeout(total=30)) as r:
                            got = await r.read()
                            if r.status == 200 and got == body:
                                counts["ok"] += 1
                                continue
                            counts["bad"] += 1
                            if not sample:
                                sample.append(f"{r.status} {r.headers.get('Location', '')} {got[:120]!r}")
                    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                        counts["errors"] += 1
                        if not sample:
                            sample.append(f"error {exc!r}")

            await asyncio.gather(*(worker() for _ in range(TOUCH_CONNECTIONS)))
        return {**counts, "sample": sample[0] if sample else ""}

    async def run_all(self) -> None:
        args = self.args
        ready = [c for c in self.columns.values() if c.proc is not None]
        for rep in range(args.reps):
            order = ready[rep % len(ready):] + ready[: rep % len(ready)] if ready else []
            log(f"repetition {rep + 1}/{args.reps}: {', '.join(c.name for c in order)}")
            for col in order:
                if col.error and not col.runs:
                    continue
                try:
                    col.runs.append({**await self.load_run(col, close=False, duration=args.duration), "rep": rep})
                    col.runs.append({**await self.load_run(col, close=True, duration=args.newconn_duration),
                                     "rep": rep})
                    col.runs.append({**await self.load_run(col, close=True, duration=args.newconn_duration,
                                                           full_handshake=True), "rep": rep})
                    if col.auth and args.logins > 0:
                        col.runs.append({**await self.login_runs(col, args.logins), "rep": rep})
                except Exception as exc:
                    log(f"{col.name}: run failed: {exc}")
                    col.error = f"run failed: {exc}"[:1000]
                    if col.proc is not None and not col.proc.alive():
                        log(f"{col.name} died:\n{col.proc.tail()}")
                        break
        await self.run_scaling()
        await self.run_sessions()

    def _usable(self, name: str) -> Column | None:
        col = self.columns.get(name)
        if col is None or col.proc is None or col.error or not col.proc.alive():
            return None
        return col

    async def run_scaling(self) -> None:
        pair = [c for c in (self._usable(n) for n in ("enforcer", "enforcer-2w")) if c is not None]
        if len(pair) < 2:
            if len(self.args.columns) > 1 and any(n in self.args.columns for n in ENFORCER_WORKERS):
                log("workers scaling: skipped (needs both enforcer and enforcer-2w running)")
            return
        log(f"workers scaling: keep-alive runs with servers and wrk on CPUs {self.all_cpus_arg()} (unpinned)")
        for rep in range(self.args.reps):
            for col in pair[rep % 2:] + pair[: rep % 2]:
                if col.error:
                    continue
                try:
                    col.runs.append({**await self.scaling_run(col), "rep": rep})
                except Exception as exc:
                    log(f"{col.name}: scaling run failed: {exc}")
                    col.error = f"scaling run failed: {exc}"[:1000]

    async def run_sessions(self) -> None:
        for name in ENFORCER_WORKERS:
            count = self.args.redis_sessions if name == REDIS_COLUMN else self.args.sessions
            col = self._usable(name)
            if col is None or count <= 0:
                continue
            try:
                col.runs.append({**await self.sessions_run(col, count), "rep": 0})
            except Exception as exc:
                log(f"{col.name}: sessions run failed: {exc!r}")
                col.error = f"sessions run failed: {exc!r}"[:1000]


def raw_id_token(db: Path, key: bytes) -> str:
    """The stored ID token of a session, read from the file (rows are keyed by SHA-256(handle))."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        row = conn.execute("SELECT id_token FROM sessions WHERE key = ?", (key,)).fetchone()
    if row is None or not isinstance(row[0], str) or row[0].count(".") != 2:
        raise RuntimeError(f"no ID token (JWS) stored for the bench session in {db}")
    return row[0]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _random_like(value: str) -> str:
    """A random URL-safe string as long as ``value`` (a signature, sid, nonce ...)."""
    return secrets.token_urlsafe(len(value) + 3)[: len(value)]


class SyntheticSessions:
    """Realistic sessions of distinct users, modelled on the bench user's real one: the same
    service, issuer and lifetime; a UUID ``sub``, ``userN@example.com``, ``groups`` staff
    (what the bench policy allows) plus a team; tags from the enforcer's own claims_to_tags
    of the user's claims; and an ID token of the real one's shape and about its size (the real claims
    with this user's values, a random signature of the same length)."""

    def __init__(self, template: Any, real_token: str) -> None:
        from enforcer.identity.tokens import claims_to_tags  # noqa: PLC0415

        self.template = template
        self.claims_to_tags = claims_to_tags
        self.real_token = real_token
        header, payload, signature = self.real_token.split(".")
        self.header, self.signature = header, signature
        self.claims: dict[str, Any] = json.loads(_b64url_decode(payload))
        self.sample_token_len = 0

    def make(self, i: int, now: float) -> Any:
        t = self.template
        user = f"user{i}"
        claims = dict(self.claims)
        for key in ("sid", "nonce", "at_hash", "jti"):  # per-user / per-login values
            if isinstance(claims.get(key), str):
                claims[key] = _random_like(claims[key])
        claims.update({
            "sub": str(uuid.uuid4()), "email": f"{user}@example.com", "email_verified": True,
            "preferred_username": user, "name": f"User {i}", "groups": ["staff", f"team-{i % 100}"],
            "iat": int(now), "exp": int(now) + 600,
        })
        if "auth_time" in claims:
            claims["auth_time"] = int(now)
        payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
        id_token = f"{self.header}.{payload}.{_random_like(self.signature)}"
        self.sample_token_len = len(id_token)
        sid = claims.get("sid")
        return dataclasses.replace(
            t, sub=claims["sub"], email=claims["email"], username=user, tags=self.claims_to_tags(claims),
            sid=sid if isinstance(sid, str) else None, id_token=id_token,
            created=now, last_seen=now, expires=now + (t.expires - t.created),
            refresh_token=_random_like(t.refresh_token) if t.refresh_token else None,
        )


# ---------------------------------------------------------------- report


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


METRICS: list[tuple[str, str, str, str]] = [
    # key, mode, run field, label
    ("ka_rps", "keepalive", "rps", "keep-alive req/s (64 conns)"),
    ("ka_p50_ms", "keepalive", "p50_ms", "keep-alive p50 latency, ms"),
    ("ka_p99_ms", "keepalive", "p99_ms", "keep-alive p99 latency, ms"),
    ("ka_cpu_us", "keepalive", "cpu_us_per_req", "server CPU µs / request (keep-alive)"),
    ("ka_cpu_util", "keepalive", "cpu_util", "server CPU busy (cores) during keep-alive"),
    ("ka_client_util", "keepalive", "client_cpu_util", "wrk CPU busy (cores) during keep-alive"),
    ("ka_core_busy", "keepalive", "server_core_busy", "server core busy (all tasks) during keep-alive"),
    ("ka_store_cpu_us", "keepalive", "store_cpu_us_per_req", "+ redis-server CPU µs / request (keep-alive)"),
    ("nc_rps", "newconn", "rps", "new conn/request, TLS resumed (wrk): req/s"),
    ("nc_cpu_us", "newconn", "cpu_us_per_req", "server CPU µs / new conn, TLS resumed (+1 request)"),
    ("nc_p50_ms", "newconn", "p50_ms", "new conn, TLS resumed: p50 latency, ms"),
    ("fh_rps", "fullhs", "rps", "new conn/request, full TLS handshake: req/s"),
    ("fh_cpu_us", "fullhs", "cpu_us_per_req", "server CPU µs / new conn, full handshake (+1 request)"),
    ("fh_client_util", "fullhs", "client_cpu_util", "client CPU busy (cores) during full handshakes"),
    ("login_ms", "login", "median_ms", "login round trip, median ms"),
    ("login_cpu_us", "login", "cpu_us_per_login", "server CPU µs / login (excl. OP)"),
    ("rss_mib", "keepalive", "rss_mib", "RSS of the server tree, MiB (after load)"),
    ("pss_mib", "keepalive", "pss_mib", "PSS of the server tree, MiB (after load)"),
    ("rss_anon_mib", "keepalive", "rss_anon_mib", "of that RSS, anonymous (heap, stacks), MiB (after load)"),
    # (e), enforcer columns only; no ratio against the baselines (none keeps sessions this way);
    # {sessions} = --sessions (and --redis-sessions for enforcer-redis: sessions_label)
    ("sess_rss_mib", "sessions", "rss_mib", "RSS with {sessions} live sessions, MiB"),
    ("sess_pss_mib", "sessions", "pss_mib", "PSS with {sessions} live sessions, MiB"),
    ("sess_anon_mib", "sessions", "rss_anon_mib", "of that RSS, anonymous (heap, stacks), MiB"),
    ("sess_store_rss_mib", "sessions", "store_rss_mib", "redis-server RSS with those sessions, MiB"),
    ("sess_touch_cpu_us", "sessions", "cpu_us_per_touch",
     "server CPU µs / request, session not in the cache (miss: its first use)"),
    ("sess_touch_store_cpu_us", "sessions", "store_cpu_us_per_touch", "+ redis-server CPU µs / miss"),
    ("sess_hit_cpu_us", "sessions", "cpu_us_per_hit", "server CPU µs / request, cached session (hit), same client"),
    ("sess_hit_store_cpu_us", "sessions", "store_cpu_us_per_hit", "+ redis-server CPU µs / hit"),
    ("sess_miss_extra_us", "sessions", "miss_extra_cpu_us",
     "cost of a cache miss, CPU µs (miss minus hit, enforcer + redis-server)"),
]
RATIO_KEYS = ("ka_rps", "ka_p50_ms", "ka_cpu_us", "nc_cpu_us", "fh_cpu_us", "login_ms", "rss_mib")
# enforcer-redis ÷ enforcer (the SQLite store), same run: the baselines' keys and the session phase's
REDIS_RATIO_KEYS = (*RATIO_KEYS, "sess_rss_mib", "sess_touch_cpu_us", "sess_hit_cpu_us", "sess_miss_extra_us")
# (d) the separate "workers scaling (unpinned)" table: enforcer vs enforcer-2w
SCALING_METRICS: list[tuple[str, str, str, str]] = [
    ("sc_rps", "scaling", "rps", "keep-alive req/s (64 conns)"),
    ("sc_cpu_us", "scaling", "cpu_us_per_req", "server CPU µs / request"),
    ("sc_p50_ms", "scaling", "p50_ms", "keep-alive p50 latency, ms"),
    ("sc_cpu_util", "scaling", "cpu_util", "server CPU busy (cores)"),
    ("sc_client_util", "scaling", "client_cpu_util", "wrk CPU busy (cores)"),
    ("sc_cores_busy", "scaling", "server_core_busy", "all CPUs busy (fraction, all tasks)"),
]


def summarise(col: Column) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    valid = not col.error and bool(col.runs) and all(r["valid"] for r in col.runs)
    for key, mode, fld, _ in METRICS + SCALING_METRICS:
        values = [r[fld] for r in col.runs if r["mode"] == mode and r.get(fld) is not None]
        summary[key] = _spread(values)
    return {"valid": valid, "error": col.error, "logins_for_load": col.logins, **summary}


def workers_scaling(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """(d): per scaling metric the medians of 1 and 2 workers and their ratio 2w / 1w."""
    one, two = summaries.get("enforcer"), summaries.get("enforcer-2w")
    if not one or not two or not one.get("sc_rps") or not two.get("sc_rps"):
        return {}
    out: dict[str, dict[str, float | None]] = {}
    for key, _, _, _ in SCALING_METRICS:
        a, b = one.get(key), two.get(key)
        out[key] = {
            "1w": a["median"] if a else None, "2w": b["median"] if b else None,
            "ratio": round(b["median"] / a["median"], 3) if a and b and a["median"] else None,
        }
    return out


def ratios(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    pairs = [("enforcer", other, RATIO_KEYS) for other in (BASE_COLUMN, "nginx", "apache", "bare")]
    pairs.insert(0, (REDIS_COLUMN, "enforcer", REDIS_RATIO_KEYS))  # the Redis store against SQLite
    for name, other, keys in pairs:
        top, base = summaries.get(name), summaries.get(other)
        if not top or not base:
            continue
        row: dict[str, float | None] = {}
        for key in keys:
            a, b = top.get(key), base.get(key)
            row[key] = round(a["median"] / b["median"], 3) if a and b and b["median"] else None
        out[f"{name}/{other}"] = row
    return out


def _fmt(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _cell(s: dict[str, float] | None, valid: bool) -> str:
    if s is None:
        return DASH
    text = _fmt(s["median"])
    if s["n"] > 1:
        text += f" ({_fmt(s['min'])}{DASH}{_fmt(s['max'])})"
    return text if valid else f"INVALID {text}"


def machine_info() -> dict[str, str]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model or platform.processor(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def tool_versions() -> dict[str, str]:
    def run(cmd: list[str], pattern: str) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        m = re.search(pattern, p.stdout + p.stderr)
        return m.group(1) if m else "?"

    def deb(pkg: str) -> str:
        return run(["dpkg-query", "-W", "-f=${Version}", pkg], r"(\S+)")

    return {
        "nginx": run(["nginx", "-v"], r"nginx/(\S+)"),
        "apache2": run(["apache2", "-v"], r"Apache/(\S+)"),
        "mod_auth_openidc": deb("libapache2-mod-auth-openidc"),
        "wrk": run(["wrk", "-v"], r"wrk (\S+)"),
        "redis-server": run(["redis-server", "--version"], r"v=(\S+)"),
        "node": run(["node", "--version"], r"v(\S+)"),
    }


def sessions_label(report: dict[str, Any]) -> str:
    """How many live sessions the session rows had: ``--sessions``, and ``--redis-sessions``
    when the enforcer-redis column ran with another number."""
    a, cols = report["settings"], report["columns"]
    sqlite_cols = [c for c in cols if c in ENFORCER_WORKERS and c != REDIS_COLUMN]
    n, n_redis = a.get("sessions", 0), a.get("redis_sessions", 0)
    if REDIS_COLUMN not in cols or n_redis == n:
        return f"{n:,}"
    if not sqlite_cols or not n:
        return f"{n_redis:,}"
    return f"{n:,} ({REDIS_COLUMN}: {n_redis:,})"


def render_markdown(report: dict[str, Any]) -> str:
    cols = [c for c in ALL_COLUMNS if c in report["columns"]]
    m, a = report["machine"], report["settings"]
    lines = [
        f"# Enforcer benchmark, {report['date']}",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), kernel {m['kernel']}, Python {m['python']}, "
        f"{m['openssl']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ". "
        f"Load average before/after: {m['loadavg_before']} / {m['loadavg']} (other work on the "
        "machine adds noise to req/s and latency; CPU per request is the steadier figure).",
        "",
        f"Mode: {'quick' if a['quick'] else 'full'}; {a['reps']} repetition(s), columns interleaved "
        f"(order rotated each repetition); keep-alive {a['duration']} s with {a['connections']} "
        f"connections (after {a['warmup']} s warm-up), new-connection runs {a['newconn_duration']} s "
        f"with {a['newconn_connections']} connections, {a['logins']} login round trips per repetition. "
        f"Servers pinned to CPU {a['server_cpu']}, wrk and the login client to CPU {a['client_cpu']}. "
        "Cells: median (min" + DASH + "max) over repetitions.",
        "",
        "| metric | " + " | ".join(cols) + " | " + " | ".join(report["ratios"]) + " |",
        "|---|" + "---:|" * (len(cols) + len(report["ratios"])),
    ]
    for key, _, _, label_template in METRICS:
        label = label_template.format(sessions=sessions_label(report))
        cells = [_cell(report["columns"][c]["summary"].get(key), report["columns"][c]["summary"]["valid"])
                 for c in cols]
        rcells = []
        for r in report["ratios"].values():
            v = r.get(key)
            rcells.append(f"{v:.2f}{TIMES}" if v is not None else "")
        if all(c == DASH for c in cells):
            continue
        lines.append(f"| {label} | " + " | ".join(cells) + (" | " + " | ".join(rcells) if rcells else "") + " |")
    scaling = report.get("workers_scaling") or {}
    if scaling:
        one, two = report["columns"]["enforcer"]["summary"], report["columns"]["enforcer-2w"]["summary"]
        lines += [
            "",
            f"Workers scaling (unpinned): the keep-alive run once more per repetition with the servers "
            f"and wrk free to use every CPU ({a.get('all_cpus', '?')}), so wrk shares the cores with "
            f"the servers; with {m['nproc']} CPUs a second worker can gain at most what wrk, the "
            "upstream and the kernel leave free.",
            "",
            "| workers scaling (unpinned) | enforcer (1 worker) | enforcer-2w (2 workers) | 2w / 1w |",
            "|---|---:|---:|---:|",
        ]
        for key, _, _, label in SCALING_METRICS:
            row = scaling.get(key, {})
            ratio = row.get("ratio")
            lines.append(f"| {label} | {_cell(one.get(key), one['valid'])} | {_cell(two.get(key), two['valid'])} | "
                         + (f"{ratio:.2f}{TIMES}" if ratio is not None else "") + " |")
    lines += ["", "Validity: " + "; ".join(
        f"{c}: {'valid' if report['columns'][c]['summary']['valid'] else 'INVALID ' + report['columns'][c]['summary']['error']}"
        for c in cols
    ) + "."]
    lines += [
        "",
        "Notes: `bare` is the upstream nginx over plain HTTP (its new-connection figure is a TCP "
        "connect, no TLS); `nginx` is a TLS reverse proxy without auth (access log on, upstream "
        "keep-alive pool); `apache` is Apache 2.4 mpm_event + mod_auth_openidc (shm session cache, "
        "access log on); `enforcer` runs with production defaults (flow log, SQLite sessions, "
        "uvloop, one process); `enforcer-2w` is the same with `--workers 2` (a supervisor and two "
        "workers on one SO_REUSEPORT port; its process tree is measured), pinned to the same single "
        "server core, where a second worker cannot add throughput (see the unpinned table); "
        "`enforcer-redis` is the `enforcer` column with `sessions.store: redis` against a redis-server "
        "the bench starts on 127.0.0.1 (its own port and dir, persistence off, an ACL user with a "
        "password, pinned to the server core): its \"server CPU\" rows are the enforcer's tree, the "
        "redis-server's CPU is the \"+ redis-server\" rows; `enforcer-redis/enforcer` is the Redis store "
        "÷ the SQLite store in the same run. Server CPU is the server's process tree only (for the proxies the "
        "upstream's own CPU is in the JSON as `upstream_cpu_us_per_req`). Every response of every "
        "run is checked to be a 200 with the upstream's 100-byte body; a run with any other is "
        "marked INVALID. Ratios are enforcer ÷ baseline of the medians (for req/s higher is better "
        "for the enforcer, for CPU, latency and memory lower is).",
        "",
    ]
    if any(r["mode"] == "sessions" for c in report["columns"].values() for r in c["runs"]):
        lines[-1:] = [
            "",
            f"Live sessions (once, after all repetitions): {sessions_label(report)} sessions of distinct users "
            "(tags like `email=user123@example.com`, `groups=staff`, `groups=team-23`; an ID token of "
            "the real one's shape, about its size) are written to the enforcer's session store with its own "
            "`create` (SQLite file, or Redis for `enforcer-redis`), then each is used once for a GET through "
            f"the enforcer over TLS ({TOUCH_CONNECTIONS} keep-alive connections, every answer checked to be "
            f"200 + body), in batches of {SESSIONS_BATCH:,} (each used within seconds of its creation, so no "
            "`last_seen` write is due). Each such first use is a cache miss (one read of the store; the "
            "in-process cache holds `sessions.cacheSize` = 10,000 sessions, so beyond that each miss also "
            f"evicts one); then {HIT_REQUESTS:,} requests over the last {HIT_SAMPLE:,} of them by the same client "
            "(cache hits): "
            "\"cost of a cache miss\" is the difference, enforcer + redis-server CPU. These per-request "
            "figures are higher than the keep-alive row's (one Python client, 8 connections, no "
            "pipelining). Then the RSS/PSS of the enforcer's process tree is read. The rows \"RSS/PSS "
            "after load\" are the same processes with the one bench session. Target (issue #5): RSS <= "
            f"80 MB = {RSS_TARGET_MIB:.1f} MiB with 10,000 live sessions. No ratio against the baselines: "
            "none keeps sessions this way.",
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run (~1 min): 1 repetition, short runs")
    p.add_argument("--columns", default=",".join(DEFAULT_COLUMNS),
                   help=f"comma-separated subset of {','.join(ALL_COLUMNS)} (default: {','.join(DEFAULT_COLUMNS)}; "
                        "the floor-* columns are reference servers showing what the server stack itself costs)")
    p.add_argument("--duration", type=float, help="seconds per keep-alive run (default 10, quick 2)")
    p.add_argument("--newconn-duration", type=float, help="seconds per new-connection run (default: --duration)")
    p.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    p.add_argument("--logins", type=int, help="login round trips per repetition (default 20, quick 3)")
    p.add_argument("--warmup", type=float, help="warm-up seconds before each keep-alive run (default 2, quick 1)")
    p.add_argument("--connections", type=int, default=64, help="keep-alive connections (default 64)")
    p.add_argument("--newconn-connections", type=int, default=16,
                   help="concurrent clients in the new-connection runs (default 16)")
    p.add_argument("--sessions", type=int,
                   help="live sessions for the memory phase of the enforcer columns (default 10000, quick 1000; "
                        "0 = off)")
    p.add_argument("--redis-sessions", type=int,
                   help="live sessions for the memory and cache-miss phase of the enforcer-redis column, created "
                        "in Redis (default 100000, quick 5000; 0 = off)")
    p.add_argument("--out", type=Path, default=REPO / "results", help="results folder (default results/)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    p.add_argument("--baseline", type=Path,
                   help="a checkout of an older commit: adds the enforcer-base column run from it (same-run A/B)")
    args = p.parse_args(argv)
    cols = [c.strip() for c in args.columns.split(",") if c.strip()]
    unknown = [c for c in cols if c not in ALL_COLUMNS]
    if unknown or not cols:
        p.error(f"--columns: unknown {unknown}; choose from {','.join(ALL_COLUMNS)}")
    if args.baseline is not None:
        if not (args.baseline / "enforcer" / "__main__.py").is_file():
            p.error(f"--baseline {args.baseline}: not a checkout of enforcer")
        args.baseline = args.baseline.resolve()
        cols.append(BASE_COLUMN)
    elif BASE_COLUMN in cols:
        p.error(f"--columns {BASE_COLUMN} needs --baseline DIR")
    args.columns = [c for c in ALL_COLUMNS if c in cols]
    q = args.quick
    args.duration = args.duration if args.duration is not None else (2.0 if q else 10.0)
    args.newconn_duration = args.newconn_duration if args.newconn_duration is not None else args.duration
    args.reps = args.reps if args.reps is not None else (1 if q else 3)
    args.logins = args.logins if args.logins is not None else (3 if q else 20)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if q else 2.0)
    args.sessions = args.sessions if args.sessions is not None else (1000 if q else 10_000)
    args.redis_sessions = args.redis_sessions if args.redis_sessions is not None else (5000 if q else 100_000)
    if not 0 <= args.sessions <= 200_000:
        p.error("--sessions must be 0..200000")
    if not 0 <= args.redis_sessions <= 1_000_000:
        p.error("--redis-sessions must be 0..1000000")
    for name in ("duration", "newconn_duration"):
        if not 1 <= getattr(args, name) <= 600:
            p.error(f"--{name.replace('_', '-')} must be between 1 and 600 seconds")
    if not 1 <= args.reps <= 50 or not 0 <= args.logins <= 1000:
        p.error("--reps must be 1..50 and --logins 0..1000")
    return args


def check_tools(columns: Sequence[str]) -> None:
    need = {"nginx", "wrk"}
    if "apache" in columns:
        need.add("apache2")
    if REDIS_COLUMN in columns:
        need.add("redis-server")
    if any(c in AUTH_COLUMNS for c in columns):
        need.add("node")
    missing = sorted(t for t in need if shutil.which(t) is None)
    if "apache" in columns and not (APACHE_MODULES / "mod_auth_openidc.so").exists():
        missing.append("mod_auth_openidc.so")
    if missing:
        raise SystemExit(f"bench: missing {', '.join(missing)}: run scripts/bench (it installs them)")


async def amain(args: argparse.Namespace) -> int:
    check_tools(args.columns)
    started = dt.datetime.now(dt.UTC).astimezone()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    workdir = Path(tempfile.mkdtemp(prefix="enforcer-bench-"))
    bench = Bench(args, workdir)
    if bench.cores.client is not None:
        # this process runs the login client: keep it off the servers' core
        os.sched_setaffinity(0, {int(bench.cores.client)})
    t0 = time.monotonic()
    try:
        await bench.start()
        await bench.run_all()
    finally:
        await bench.stop()
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    summaries = {name: summarise(col) for name, col in bench.columns.items()}
    report = {
        "date": started.isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - t0, 1),
        "machine": {**machine_info(), "loadavg_before": load_before},
        "versions": tool_versions(),
        "settings": {
            "quick": args.quick, "columns": args.columns, "reps": args.reps,
            "duration": args.duration, "newconn_duration": args.newconn_duration,
            "warmup": args.warmup, "connections": args.connections,
            "newconn_connections": args.newconn_connections, "logins": args.logins,
            "server_cpu": bench.cores.server, "client_cpu": bench.cores.client,
            "all_cpus": bench.all_cpus_arg(), "sessions": args.sessions,
            "redis_sessions": args.redis_sessions if REDIS_COLUMN in args.columns else 0,
            "rss_target_mib": round(RSS_TARGET_MIB, 1), "body_bytes": len(BODY),
        },
        "columns": {name: {"summary": summaries[name], "runs": col.runs}
                    for name, col in bench.columns.items()},
        "ratios": ratios(summaries),
        "workers_scaling": workers_scaling(summaries),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{started:%Y-%m-%d}" + ("-quick" if args.quick else "")
    md = render_markdown(report)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    log(f"wrote {args.out / stem}.md and .json in {report['elapsed_s']} s")
    bad = [n for n, s in summaries.items() if not s["valid"]]
    if bad:
        log(f"INVALID or failed columns: {', '.join(bad)}")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
