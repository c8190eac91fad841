"""Refresh tokens sealed at rest: AES-256-GCM under keys from a secret file, with key rotation.

A sealed token is ``v1.<key id>.<base64url(nonce | ciphertext | tag)>``; the key id is the first
8 hex digits of SHA-256 of the key, so the file can list several keys, newest first: sealing
uses the first, opening uses whichever the token names (a new key decrypts tokens sealed with
an old one until they are re-sealed, see :meth:`TokenCipher.stale`). The session's service,
issuer and subject are bound as associated data, so a sealed token copied into another user's
session does not open.
Every failure to open -- unknown key, tampering, junk -- is the same ``None``: callers end the
session and learn nothing more.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION: Final = "v1"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12


class KeyFileError(ValueError):
    """The key file cannot be used (missing, unreadable, no key, a key of the wrong size)."""


def key_id(key: bytes) -> str:
    """The short public name of ``key`` a sealed token carries."""
    return hashlib.sha256(key).hexdigest()[:8]


def parse_keys(text: str) -> list[bytes]:
    """The keys of a key file: one base64 (standard or url-safe) 32-byte key a line, newest
    first; blank lines and ``#`` comments are skipped."""
    keys: list[bytes] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = base64.b64decode(line.replace("+", "-").replace("/", "_") + "=" * (-len(line) % 4),
                                   altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError(f"line {n}: not base64") from None
        if len(key) != KEY_BYTES:
            raise KeyFileError(f"line {n}: a key must be {KEY_BYTES} bytes, got {len(key)}")
        keys.append(key)
    if not keys:
        raise KeyFileError("no key in the file")
    return keys


def new_key_line() -> str:
    """A fresh key as a key-file line (``enforcer`` tooling and tests)."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode()


def file_stamp(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when a key file is replaced or rewritten (device, inode, mtime, size; the
    target of a symlink, as Kubernetes updates a mounted Secret), or None if it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class TokenCipher:
    """Seals and opens refresh tokens with the keys of one key file (newest first)."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise KeyFileError("no key")
        self._by_id = {key_id(k): AESGCM(k) for k in reversed(keys)}
        self._current = key_id(keys[0])

    @property
    def current(self) -> str:
        """The id of the key new tokens are sealed with (the file's first)."""
        return self._current

    @property
    def key_count(self) -> int:
        return len(self._by_id)

    @classmethod
    def from_file(cls, path: Path) -> TokenCipher:
        """The cipher of the key file at ``path`` (raises :class:`KeyFileError`)."""
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"{path}: {type(exc).__name__}") from None
        try:
            return cls(parse_keys(text))
        except KeyFileError as exc:
            raise KeyFileError(f"{path}: {exc}") from None

    def seal(self, token: str, bound_to: bytes) -> str:
        """``token`` encrypted with the newest key, bound to ``bound_to`` (associated data)."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._by_id[self._current].encrypt(nonce, token.encode("utf-8"), bound_to)
        return f"{VERSION}.{self._current}.{base64.urlsafe_b64encode(nonce + sealed).decode().rstrip('=')}"

    def open(self, sealed: str, bound_to: bytes) -> str | None:
        """The token ``sealed`` holds, or None -- whatever went wrong."""
        version, _, rest = sealed.partition(".")
        kid, _, body = rest.partition(".")
        aead = self._by_id.get(kid)
        if version != VERSION or aead is None:
            return None
        try:
            raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
            return aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], bound_to).decode("utf-8")
        except (binascii.Error, ValueError, InvalidTag, UnicodeDecodeError):
            return None

    def stale(self, sealed: str) -> bool:
        """Whether ``sealed`` was sealed with a key other than the newest (re-seal it)."""
        return sealed.split(".", 2)[1:2] != [self._current]
