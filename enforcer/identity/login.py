"""Login transactions: the authorization request and what is remembered until the callback.

:func:`start_login` builds the authorization request (PKCE S256, state and nonce always); the
transaction stores keep it until the callback, bound to the browser.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import secrets
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from enforcer.identity.tokens import ProviderMetadata

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# login transactions (pure)


@dataclass(frozen=True)
class LoginTransaction:
    """What we remember between the redirect to the IdP and the callback."""

    state: str
    nonce: str
    code_verifier: str
    binding: str  # SHA-256 of the browser-binding cookie value
    service: str
    issuer: str
    redirect_uri: str
    return_to: str
    created: float


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 S256: BASE64URL(SHA256(ASCII(verifier))) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def binding_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def start_login(
    *,
    metadata: ProviderMetadata,
    client_id: str,
    redirect_uri: str,
    scopes: tuple[str, ...],
    service: str,
    return_to: str,
    now: float,
) -> tuple[str, LoginTransaction, str]:
    """Build the authorization URL: returns (url, transaction, binding cookie value)."""
    state = secrets.token_urlsafe(32)
    nonce = secrets.token_urlsafe(32)
    verifier = secrets.token_urlsafe(64)  # 86 chars, 512 bits
    binding = secrets.token_urlsafe(32)
    txn = LoginTransaction(
        state=state,
        nonce=nonce,
        code_verifier=verifier,
        binding=binding_hash(binding),
        service=service,
        issuer=metadata.issuer,
        redirect_uri=redirect_uri,
        return_to=return_to,
        created=now,
    )
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": " ".join(scopes),
        "state": state,
        "nonce": nonce,
        "code_challenge": pkce_challenge(verifier),
        "code_challenge_method": "S256",
    }
    sep = "&" if urllib.parse.urlsplit(metadata.authorization_endpoint).query else "?"
    url = metadata.authorization_endpoint + sep + urllib.parse.urlencode(params)
    return url, txn, binding


class TransactionStore:
    """Pending logins keyed by state: bounded, expiring, single use."""

    def __init__(self, *, ttl: float, max_pending: int = 10_000) -> None:
        self.ttl = ttl
        self.max_pending = max_pending
        self._items: OrderedDict[str, LoginTransaction] = OrderedDict()

    def add(self, txn: LoginTransaction) -> None:
        self._items[txn.state] = txn
        while len(self._items) > self.max_pending:
            self._items.popitem(last=False)

    def pop(self, state: str, now: float) -> LoginTransaction | None:
        """Consume a transaction (atomic in the event loop: a second pop gets None)."""
        self._expire(now)
        return self._items.pop(state, None)

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self, now: float) -> None:
        while self._items:
            first = next(iter(self._items.values()))
            if now - first.created <= self.ttl:
                break
            self._items.popitem(last=False)


class PendingBackend(Protocol):
    """Where :class:`SharedTransactionStore` keeps pending logins (the SQLite session store)."""

    async def put_pending(self, state: str, data: str, created: float, *, max_pending: int) -> None: ...

    async def take_pending(self, state: str, now: float, ttl: float) -> str | None: ...


class SharedTransactionStore:
    """Pending logins in a store every worker process sees: the callback may land on any of
    them. Same contract as :class:`TransactionStore` (single use, TTL, capped), but async."""

    def __init__(self, backend: PendingBackend, *, ttl: float, max_pending: int = 10_000) -> None:
        self.backend = backend
        self.ttl = ttl
        self.max_pending = max_pending

    async def add(self, txn: LoginTransaction) -> None:
        data = json.dumps(dataclasses.asdict(txn), separators=(",", ":"))
        await self.backend.put_pending(txn.state, data, txn.created, max_pending=self.max_pending)

    async def pop(self, state: str, now: float) -> LoginTransaction | None:
        data = await self.backend.take_pending(state, now, self.ttl)
        if data is None:
            return None
        try:
            fields = json.loads(data)
            txn = LoginTransaction(**fields)
            if not isinstance(txn.created, int | float) or not all(
                isinstance(getattr(txn, f.name), str) for f in dataclasses.fields(txn) if f.name != "created"
            ):
                raise TypeError("a field has the wrong type")
        except (ValueError, TypeError) as exc:
            log.warning("dropping an unreadable pending login: %s", exc)
            return None
        return txn if txn.state == state else None


