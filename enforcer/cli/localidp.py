"""Start and stop the real OpenID Provider (scripts/op/op.mjs, panva oidc-provider).

Needs only the runtime dependency ``cryptography`` (plus node and scripts/setup's
``npm ci``), so ``enforcer demo`` can import this module too.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import ipaddress
import json
import logging
import os
import signal
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from enforcer.http.certs import CertStore

REPO_ROOT = Path(__file__).resolve().parents[2]
OP_SCRIPT = REPO_ROOT / "scripts" / "op" / "op.mjs"

READY_TIMEOUT = 30.0
STOP_GRACE = 5.0

# PIDs of OP processes still running; killed at interpreter exit.
_LIVE_PIDS: set[int] = set()


def _kill_leftovers() -> None:
    for pid in list(_LIVE_PIDS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        _LIVE_PIDS.discard(pid)


atexit.register(_kill_leftovers)


@dataclass
class OPUser:
    password: str
    claims: dict[str, Any] = field(default_factory=dict)


@dataclass
class TLSMaterial:
    """A throwaway CA and a leaf certificate signed by it (all PEM files)."""

    ca_pem: bytes
    ca_file: Path
    cert_file: Path
    key_file: Path
    leaf_der: bytes

    def spki_sha256_b64(self) -> str:
        return spki_sha256_b64(self.leaf_der)


@dataclass
class RunningOP:
    issuer: str
    ca_pem: bytes
    ca_file: Path
    pid: int
    clients: list[dict[str, Any]]
    users: dict[str, OPUser]
    workdir: Path
    tls: TLSMaterial
    process: asyncio.subprocess.Process | None = None
    _stderr_task: asyncio.Task[None] | None = None
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def discovery_url(self) -> str:
        return self.issuer + "/.well-known/openid-configuration"

    @property
    def leaf_spki_sha256(self) -> str:
        """base64(sha256(SPKI)) of the OP's TLS leaf (for Chromium's SPKI allow list)."""
        return self.tls.spki_sha256_b64()

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting only the OP's throwaway CA."""
        return ssl.create_default_context(cadata=self.ca_pem.decode())

    async def stop(self) -> None:
        """SIGTERM, wait up to 5 s, then SIGKILL. Idempotent."""
        proc = self.process
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        elif proc is None:
            _stop_pid_sync(self.pid)
        _LIVE_PIDS.discard(self.pid)
        if self._stderr_task is not None:
            # the pipe hits EOF once node is gone: keep its last words
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._stderr_task, 1.0)
            self._stderr_task.cancel()
            self._stderr_task = None

    def stop_sync(self) -> None:
        """Blocking stop by PID (for non-async callers)."""
        _stop_pid_sync(self.pid)
        _LIVE_PIDS.discard(self.pid)


def _stop_pid_sync(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            # not our child (or already reaped): poll for existence
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            done = 0
        if done:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


# ---------------------------------------------------------------- TLS


def spki_sha256_b64(cert_der: bytes) -> str:
    """base64 of sha256 over the SubjectPublicKeyInfo of a DER certificate."""
    cert = x509.load_der_x509_certificate(cert_der)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return base64.b64encode(digest.finalize()).decode()


def make_tls_material(
    directory: Path,
    *,
    name: str = "leaf",
    ips: tuple[str, ...] = ("127.0.0.1", "::1"),
    dns_names: tuple[str, ...] = ("localhost",),
) -> TLSMaterial:
    """A throwaway CA and a leaf for ``dns_names`` + ``ips`` (EC P-256), made by the
    enforcer's own :class:`~enforcer.certs.CertStore` in ``directory``; the leaf file holds
    the chain (leaf, then CA) because node serves whatever the file contains."""
    store = CertStore(directory)
    leaf = store.ensure_leaf(name, [*dns_names, *ips])
    ca_pem = store.ca_pem()
    chain_file = directory / f"{name}-chain.crt"
    leaf_pem = leaf.cert.read_bytes()
    chain_file.write_bytes(leaf_pem + ca_pem)
    return TLSMaterial(
        ca_pem=ca_pem,
        ca_file=store.ca_dir / "ca.crt",
        cert_file=chain_file,
        key_file=leaf.key,
        leaf_der=x509.load_pem_x509_certificate(leaf_pem).public_bytes(serialization.Encoding.DER),
    )


def _check_script(script: Path) -> None:
    if not script.is_file():
        raise RuntimeError(f"OP script {script} not found (run scripts/setup)")
    if not (script.parent / "node_modules" / "oidc-provider").is_dir():
        raise RuntimeError(f"oidc-provider is not installed next to {script} (run scripts/setup)")


def _existing_tls_material(cert_file: Path, key_file: Path, ca_file: Path | None) -> TLSMaterial:
    chain = x509.load_pem_x509_certificates(cert_file.read_bytes())
    if ca_file is not None:
        ca_pem = ca_file.read_bytes()
    elif len(chain) > 1:
        ca_pem = chain[-1].public_bytes(serialization.Encoding.PEM)
        ca_file = cert_file  # a chain file is also a usable trust file
    else:
        raise ValueError(f"{cert_file} holds no chain: pass ca_file=")
    return TLSMaterial(
        ca_pem=ca_pem,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        leaf_der=chain[0].public_bytes(serialization.Encoding.DER),
    )


# ---------------------------------------------------------------- start


async def _start_op_once(
    workdir: Path,
    *,
    clients: list[dict[str, Any]],
    users: dict[str, OPUser],
    port: int = 0,
    host: str = "127.0.0.1",
    node: str = "node",
    issuer: str | None = None,
    extra_ca_file: Path | None = None,
    ready_timeout: float = READY_TIMEOUT,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    ca_file: Path | None = None,
    op_script: Path | None = None,
    netns: str | None = None,
    options: dict[str, Any] | None = None,
) -> RunningOP:
    """Start ``node scripts/op/op.mjs`` on ``host:port`` (0 = a free port chosen by
    the OP itself, no race) and wait for its ``READY <issuer>`` line.

    TLS: by default a throwaway CA and a leaf for 127.0.0.1/::1/localhost are made
    in ``workdir/op-tls``.  Pass ``cert_file`` + ``key_file`` (PEM; the cert file may
    hold the chain) to use your own; ``ca_file`` then names the CA that signed it
    (default: the last certificate of a chain in ``cert_file``).

    ``extra_ca_file`` is given to node as NODE_EXTRA_CA_CERTS (for back-channel
    logout calls to an https RP signed by a test CA).  ``op_script`` (or the
    environment variable ENFORCER_OP_SCRIPT) overrides scripts/op/op.mjs.

    ``options`` are further keys of op.mjs's configuration (``ttl``, ``rotate_refresh_tokens``,
    ``test_admin_port``: see the script's header).

    ``netns`` runs node inside that network namespace (``ip netns exec <netns> node ...``;
    needs root): with ``host`` set to an address of that namespace, the OP serves there. A
    ``host`` that is a specific IP address is added to the default certificate's SANs.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if (cert_file is None) != (key_file is None):
        raise ValueError("give both cert_file and key_file, or neither")
    if cert_file is not None and key_file is not None:
        tls = _existing_tls_material(Path(cert_file), Path(key_file), ca_file)
    else:
        ips: tuple[str, ...] = ("127.0.0.1", "::1")
        with contextlib.suppress(ValueError):
            bound = ipaddress.ip_address(host.strip("[]"))
            if not bound.is_unspecified and str(bound) not in ips:
                ips += (str(bound),)
        tls = make_tls_material(workdir / "op-tls", name="op", ips=ips)
    script = Path(op_script or os.environ.get("ENFORCER_OP_SCRIPT") or OP_SCRIPT)
    _check_script(script)
    config: dict[str, Any] = {
        "host": host,
        "port": port,
        "cert": str(tls.cert_file),
        "key": str(tls.key_file),
        "exit_on_stdin_close": True,
        "clients": clients,
        "users": {name: {"password": u.password, "claims": u.claims} for name, u in users.items()},
    }
    if issuer is not None:
        config["issuer"] = issuer
    config.update(options or {})
    config_file = workdir / "op-config.json"
    config_file.write_text(json.dumps(config, indent=2))
    config_file.chmod(0o600)

    env = dict(os.environ)
    env.setdefault("NODE_ENV", "production")
    if extra_ca_file is not None:
        env["NODE_EXTRA_CA_CERTS"] = str(extra_ca_file)

    # `ip netns exec` switches namespace and then exec()s node: the PID stays node's own
    prefix = ["ip", "netns", "exec", netns] if netns is not None else []
    proc = await asyncio.create_subprocess_exec(
        *prefix,
        node,
        str(script),
        str(config_file),
        stdin=asyncio.subprocess.PIPE,  # closed when we die: the OP exits
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(script.parent),
        env=env,
        start_new_session=True,
    )
    _LIVE_PIDS.add(proc.pid)
    running = RunningOP(
        issuer="",
        ca_pem=tls.ca_pem,
        ca_file=tls.ca_file,
        pid=proc.pid,
        clients=clients,
        users=users,
        workdir=workdir,
        tls=tls,
        process=proc,
    )
    assert proc.stderr is not None
    assert proc.stdout is not None
    stderr = proc.stderr
    lines = running.stderr_lines

    async def drain_stderr() -> None:
        while True:
            line = await stderr.readline()
            if not line:
                return
            lines.append(line.decode(errors="replace").rstrip())
            del lines[:-200]

    running._stderr_task = asyncio.create_task(drain_stderr())

    async def wait_ready() -> str:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError("OP exited before READY")
            text = line.decode(errors="replace").strip()
            if text.startswith("READY "):
                return text.split(" ", 1)[1]

    try:
        running.issuer = await asyncio.wait_for(wait_ready(), ready_timeout)
    except (TimeoutError, RuntimeError) as exc:
        await running.stop()
        await asyncio.sleep(0)
        detail = "\n".join(lines[-40:])
        raise RuntimeError(
            f"OP did not become ready ({str(exc) or type(exc).__name__}; exit={proc.returncode});"
            f" stderr:\n{detail}"
        ) from exc

    # Keep reading stdout so the pipe never fills up.
    stdout = proc.stdout

    async def drain_stdout() -> None:
        while await stdout.readline():
            pass

    drain = asyncio.create_task(drain_stdout())
    _BACKGROUND.add(drain)
    drain.add_done_callback(_BACKGROUND.discard)
    return running


_BACKGROUND: set[asyncio.Task[None]] = set()


START_ATTEMPTS = 2


async def start_op(workdir: Path, **kwargs: Any) -> RunningOP:
    """Start the OP (see :func:`_start_op_once` for the parameters), retrying once.

    On a loaded machine node has been seen, rarely, to stall before its start-up code
    ran (no READY, killed by our SIGTERM with its handlers not yet installed); a second
    attempt starts cleanly, so one hiccup does not fail a whole test run."""
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return await _start_op_once(workdir, **kwargs)
        except RuntimeError as exc:
            if attempt == START_ATTEMPTS or "did not become ready" not in str(exc):
                raise
            logging.getLogger("enforcer.localidp").warning("OP start attempt %d failed, retrying: %s", attempt, exc)
    raise AssertionError("unreachable")  # pragma: no cover
