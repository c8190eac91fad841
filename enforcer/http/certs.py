"""Issue and keep the TLS certificates the listener presents: a local CA and a leaf per service.

Layout under the state directory (all written atomically: temp file + ``os.replace``)::

    ca/ca.crt  ca/ca.key  ca/.lock        local CA, EC P-256, 10 years; dir 0700, key 0600
    certs/<service>.crt  certs/<service>.key  certs/.lock
                                          one leaf per service, EC P-256, SANs = its hosts

Certificates are minted only from configuration (``ensure_leaf``), never on demand for a name a
client asks for (conformance X-HOST-06/07, X-TLS-10). An operator-supplied cert/key pair for a
service wins over the self-issued one (``operator_leaf`` only validates it).

All methods block (file I/O, key generation, ``flock``); call them at start/reload or through
``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enforcer.errors import EnforcerError, Reason

CA_VALIDITY = timedelta(days=3650)
"""The local CA lives ten years: clients trust it once, re-trusting is a manual step."""

BACKDATE = timedelta(minutes=5)
"""notBefore is set this far in the past so clients with a slightly slow clock accept a new cert."""

MAX_HOST_LEN = 253
"""RFC 1035 limit on a DNS name in text form (without the trailing dot)."""

_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_SERVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_CN_MAX = 64  # ub-common-name (RFC 5280)


class CertError(EnforcerError):
    """A certificate or key cannot be created, read or used; the message names the file and fix."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.CERTIFICATE_ERROR, 500, message)


@dataclass(frozen=True)
class LeafPaths:
    """Where a service's certificate chain and private key live, and when the certificate ends."""

    cert: Path
    """PEM certificate (the leaf first, then any intermediates)."""
    key: Path
    """PEM private key matching ``cert``; mode 0600 when we wrote it."""
    not_after: datetime
    """End of validity (timezone-aware, UTC)."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def validate_host(host: str) -> None:
    """Raise CertError unless ``host`` is an IP literal or a lower-case DNS name fit for a SAN.

    A wildcard is allowed only as the whole left-most label (``*.example.com``) and not directly
    under a top-level label (``*.com``).
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return
    fix = "use lower-case ASCII DNS names (IDNs as xn-- A-labels) or IP literals in 'hosts'"
    if not host or len(host) > MAX_HOST_LEN:
        raise CertError(f"host {host!r}: empty or longer than {MAX_HOST_LEN} characters; {fix}")
    if host != host.lower():
        raise CertError(f"host {host!r}: must be lower-case (write {host.lower()!r}); {fix}")
    labels = host.split(".")
    if labels[0] == "*":
        if len(labels) < 3:
            raise CertError(f"host {host!r}: a wildcard needs at least two labels after '*.'")
        labels = labels[1:]
    for label in labels:
        if not _LABEL_RE.match(label):
            raise CertError(
                f"host {host!r}: label {label!r} is not a valid DNS label "
                f"(letters, digits, '-'; no trailing dot; '*' only as the whole left-most label)"
                f"; {fix}"
            )


def _san_list(hosts: Sequence[str], extra_ips: Sequence[str]) -> list[x509.GeneralName]:
    """The SAN entries for a leaf, deduplicated, in configuration order."""
    names: list[x509.GeneralName] = []
    seen: set[x509.GeneralName] = set()

    def add(name: x509.GeneralName) -> None:
        if name not in seen:
            seen.add(name)
            names.append(name)

    for host in hosts:
        validate_host(host)
        try:
            add(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            add(x509.DNSName(host))
    for ip in extra_ips:
        try:
            add(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise CertError(
                f"extra address {ip!r} is not an IP literal; fix the address list"
            ) from None
    if not names:
        raise CertError("a leaf certificate needs at least one host; add 'hosts' to the service")
    return names


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (across processes) for the ``with`` body."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` (``mode``); readers see the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away; never adds any beyond ``mode``
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_pair(
    key_file: Path, key: ec.EllipticCurvePrivateKey, cert_file: Path, cert: x509.Certificate, what: str
) -> None:
    """Write a key (0600) and its certificate (0644) atomically, key first: a reader that
    sees the new certificate also finds its key."""
    try:
        _write_atomic(key_file, _key_pem(key), 0o600)
        _write_atomic(cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as e:
        raise CertError(f"{what} ({e}); make {cert_file.parent} writable by the enforcer user") from e


def _private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) or tighten an existing one to 0700; CertError if we cannot."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except OSError as e:
        raise CertError(
            f"{path}: cannot create it with mode 0700 ({e.strerror}); "
            f"make the state directory writable by the enforcer user"
        ) from e
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _same_public_key(a: PublicKeyTypes, b: CertificatePublicKeyTypes) -> bool:
    """Whether two public keys are the same key (compared by their SubjectPublicKeyInfo)."""
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    try:
        return a.public_bytes(enc, fmt) == b.public_bytes(enc, fmt)
    except ValueError:
        return False


class CertStore:
    """The local CA and the per-service leaves under ``state_dir`` (see the module docstring)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        clock: Callable[[], datetime] = _utcnow,
        leaf_days: int = 90,
        renew_before_days: int = 30,
    ) -> None:
        if leaf_days <= renew_before_days or renew_before_days < 0:
            raise ValueError("need leaf_days > renew_before_days >= 0")
        self._state_dir = Path(state_dir)
        self._clock = clock
        self._leaf_validity = timedelta(days=leaf_days)
        self._renew_before = timedelta(days=renew_before_days)
        self._ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None

    @property
    def ca_dir(self) -> Path:
        """``<state_dir>/ca``: the CA certificate, its key and the creation lock."""
        return self._state_dir / "ca"

    @property
    def certs_dir(self) -> Path:
        """``<state_dir>/certs``: one ``<service>.crt``/``.key`` pair per service."""
        return self._state_dir / "certs"

    def _now(self) -> datetime:
        now = self._clock()
        return now if now.tzinfo else now.replace(tzinfo=UTC)

    # -- CA ---------------------------------------------------------------------------------

    def ca_pem(self) -> bytes:
        """The CA certificate (PEM) clients must trust; creates the CA on first use."""
        cert, _ = self._load_or_create_ca()
        return cert.public_bytes(serialization.Encoding.PEM)

    def _load_or_create_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if self._ca is not None:
            return self._ca
        ca_dir = _private_dir(self.ca_dir)
        cert_file, key_file = ca_dir / "ca.crt", ca_dir / "ca.key"
        with _locked(ca_dir / ".lock"):
            # The certificate is written after the key, so its presence means both are complete.
            ca = self._read_ca(cert_file, key_file) if cert_file.exists() else self._create_ca(cert_file, key_file)
        self._ca = ca
        return ca

    def _read_ca(
        self, cert_file: Path, key_file: Path
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        fix = f"remove {self.ca_dir} to create a new CA (clients must then trust the new one)"
        cert = _read_cert(cert_file, fix)
        key = _read_key(key_file, fix)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertError(f"{key_file}: the CA key is not an EC key; {fix}")
        if not _same_public_key(key.public_key(), cert.public_key()):
            raise CertError(f"{key_file}: does not match {cert_file}; {fix}")
        if key_file.stat().st_mode & 0o077:
            key_file.chmod(0o600)
        if cert.not_valid_after_utc <= self._now() + self._renew_before:
            raise CertError(f"{cert_file}: the local CA expires {cert.not_valid_after_utc}; {fix}")
        return cert, key

    def _create_ca(
        self, cert_file: Path, key_file: Path
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        host = socket.gethostname() or "localhost"
        suffix = secrets.token_hex(4)
        head = "enforcer local CA "
        host = host[: _CN_MAX - len(head) - len(suffix) - 1]
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "enforcer"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{head}{host} {suffix}"),
            ]
        )
        now = self._now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        _write_pair(key_file, key, cert_file, cert, f"{self.ca_dir}: cannot write the local CA")
        return cert, key

    # -- leaves -----------------------------------------------------------------------------

    def ensure_leaf(
        self, service: str, hosts: Sequence[str], extra_ips: Sequence[str] = ()
    ) -> LeafPaths:
        """Return the service's leaf, minting a new one if missing, stale or due for renewal.

        The existing leaf is reused only if its SANs are exactly ``hosts`` + ``extra_ips``, it
        was issued by the current CA, its key matches, and it is valid beyond
        ``now + renew_before_days``.
        """
        if not _SERVICE_RE.match(service):
            raise CertError(
                f"service name {service!r} cannot be used as a file name under "
                f"{self.certs_dir}; use letters, digits, '.', '_' and '-'"
            )
        sans = _san_list(hosts, extra_ips)
        ca_cert, ca_key = self._load_or_create_ca()
        certs_dir = _private_dir(self.certs_dir)
        cert_file, key_file = certs_dir / f"{service}.crt", certs_dir / f"{service}.key"
        with _locked(certs_dir / ".lock"):
            current = self._reusable_leaf(cert_file, key_file, sans, ca_cert)
            if current is not None:
                return LeafPaths(cert_file, key_file, current)
            return self._mint_leaf(cert_file, key_file, sans, ca_cert, ca_key)

    def _reusable_leaf(
        self,
        cert_file: Path,
        key_file: Path,
        sans: list[x509.GeneralName],
        ca_cert: x509.Certificate,
    ) -> datetime | None:
        """The existing leaf's notAfter if it can be kept, else None (anything odd -> re-mint)."""
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            cert.verify_directly_issued_by(ca_cert)
        except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
            return None
        if set(have) != set(sans) or len(list(have)) != len(sans):
            return None
        if not _same_public_key(key.public_key(), cert.public_key()):
            return None
        now = self._now()
        if cert.not_valid_before_utc > now or cert.not_valid_after_utc <= now + self._renew_before:
            return None
        if key_file.stat().st_mode & 0o077:
            key_file.chmod(0o600)
        return cert.not_valid_after_utc

    def _mint_leaf(
        self,
        cert_file: Path,
        key_file: Path,
        sans: list[x509.GeneralName],
        ca_cert: x509.Certificate,
        ca_key: ec.EllipticCurvePrivateKey,
    ) -> LeafPaths:
        key = ec.generate_private_key(ec.SECP256R1())
        now = self._now()
        not_after = min(now + self._leaf_validity, ca_cert.not_valid_after_utc)
        first = sans[0].value
        cn = str(first)
        # Clients match on the SANs; the CN is only a label, omitted when it would not fit.
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if len(cn) <= _CN_MAX else []
        )
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            # RFC 5280 4.2.1.6: the SAN is critical when the subject is empty.
            .add_extension(x509.SubjectAlternativeName(sans), critical=len(subject) == 0)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write_pair(key_file, key, cert_file, cert, f"{cert_file}: cannot write the certificate")
        return LeafPaths(cert_file, key_file, cert.not_valid_after_utc)

    # -- operator-supplied ------------------------------------------------------------------

    def operator_leaf(self, cert_file: Path, key_file: Path) -> LeafPaths:
        """Validate an operator-supplied pair (key matches the first cert, cert currently valid)."""
        cert_file, key_file = Path(cert_file), Path(key_file)
        cert = _read_cert(cert_file, "point 'cert' at a PEM certificate chain, leaf first")
        key = _read_key(key_file, "point 'key' at the unencrypted PEM key of that certificate")
        if not _same_public_key(key.public_key(), cert.public_key()):
            raise CertError(
                f"{key_file}: this key does not belong to the certificate in {cert_file}; "
                f"configure the matching key (or certificate)"
            )
        now = self._now()
        if cert.not_valid_after_utc <= now:
            raise CertError(
                f"{cert_file}: the certificate expired {cert.not_valid_after_utc:%Y-%m-%d %H:%M}"
                f" UTC; install a renewed certificate"
            )
        if cert.not_valid_before_utc > now:
            raise CertError(
                f"{cert_file}: the certificate is not valid before "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check the clock or the file"
            )
        return LeafPaths(cert_file, key_file, cert.not_valid_after_utc)


def _read_cert(path: Path, fix: str) -> x509.Certificate:
    """The first certificate of a PEM file, or CertError naming the file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CertError(f"{path}: cannot read ({e.strerror}); {fix}") from e
    try:
        return x509.load_pem_x509_certificates(data)[0]
    except (ValueError, IndexError) as e:
        raise CertError(f"{path}: not a PEM certificate ({e}); {fix}") from e


def _read_key(path: Path, fix: str) -> PrivateKeyTypes:
    """An unencrypted PEM private key, or CertError naming the file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CertError(f"{path}: cannot read ({e.strerror}); {fix}") from e
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CertError(f"{path}: not an unencrypted PEM private key ({e}); {fix}") from e
