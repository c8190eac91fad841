"""Run tests/harness/chromium.mjs (playwright-core + Debian's /usr/bin/chromium)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_SCRIPT = Path(__file__).with_name("chromium.mjs")
CHROMIUM_EXECUTABLE = "/usr/bin/chromium"
PLAYWRIGHT_DIR = REPO_ROOT / "scripts" / "op" / "node_modules" / "playwright-core"


def chromium_available(node: str = "node") -> bool:
    """True when node, /usr/bin/chromium and playwright-core are all installed."""
    return (
        shutil.which(node) is not None
        and os.access(CHROMIUM_EXECUTABLE, os.X_OK)
        and PLAYWRIGHT_DIR.is_dir()
    )


def spki_sha256(cert: bytes) -> str:
    """base64(sha256(SubjectPublicKeyInfo)) of one certificate (PEM or DER)."""
    parsed = (
        x509.load_pem_x509_certificate(cert)
        if cert.lstrip().startswith(b"-----")
        else x509.load_der_x509_certificate(cert)
    )
    spki = parsed.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return base64.b64encode(digest.finalize()).decode()


def spki_hashes(*pem_files_or_bytes: Path | bytes) -> list[str]:
    """SPKI hashes of every certificate in the given PEM files / PEM blobs
    (a chain file yields one hash per certificate)."""
    out: list[str] = []
    for item in pem_files_or_bytes:
        data = Path(item).read_bytes() if isinstance(item, Path) else item
        for cert in x509.load_pem_x509_certificates(data):
            h = spki_sha256(cert.public_bytes(serialization.Encoding.DER))
            if h not in out:
                out.append(h)
    return out


def host_rules(resolve: Mapping[str, str]) -> str:
    """``{"app.test": "127.0.0.1"}`` -> ``"MAP app.test 127.0.0.1"``."""
    return ", ".join(f"MAP {name} {addr}" for name, addr in resolve.items())


async def run_chromium_login(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    expect_text: str | None = None,
    spki: Iterable[str] = (),
    resolve: Mapping[str, str] | None = None,
    screenshot: Path | None = None,
    then: Iterable[str] = (),
    timeout_ms: int = 20000,
    node: str = "node",
    check: bool = True,
) -> dict[str, Any]:
    """Open ``url`` in headless Chromium, log in on the OP's form if it shows up,
    and return chromium.mjs's JSON result (see that file).  With ``check`` a
    failed run raises RuntimeError carrying the result and stderr."""
    payload: dict[str, Any] = {"url": url, "timeout_ms": timeout_ms}
    if username is not None:
        payload["username"] = username
        payload["password"] = password or ""
    if expect_text is not None:
        payload["expect_text"] = expect_text
    if screenshot is not None:
        payload["screenshot"] = str(screenshot)
    spki_list = list(spki)
    if spki_list:
        payload["spki"] = spki_list
    if resolve:
        payload["host_rules"] = host_rules(resolve)
    then_list = list(then)
    if then_list:
        payload["then"] = then_list

    proc = await asyncio.create_subprocess_exec(
        node,
        str(CHROMIUM_SCRIPT),
        json.dumps(payload),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(REPO_ROOT),
        start_new_session=True,
    )
    overall = timeout_ms / 1000 * (4 + len(then_list)) + 30
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), overall)
    except (TimeoutError, asyncio.CancelledError):
        # kill the whole group (node + chromium children), which we started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    lines = [ln for ln in stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(
            f"chromium.mjs printed no result (exit {proc.returncode}); stderr:\n"
            + stderr.decode(errors="replace")[-4000:]
        )
    result: dict[str, Any] = json.loads(lines[-1])
    result["exit_code"] = proc.returncode
    if check and not result.get("ok"):
        raise RuntimeError(
            f"chromium login failed: {result.get('error')}\nresult: {json.dumps(result)[:3000]}"
            f"\nstderr:\n{stderr.decode(errors='replace')[-2000:]}"
        )
    return result
