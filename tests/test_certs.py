"""Tests for enforcer.certs: the local CA, per-service leaves and operator-supplied pairs."""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enforcer.http.certs import CertError, CertStore, LeafPaths

T0 = datetime(2030, 1, 1, tzinfo=UTC)


class Clock:
    """A settable clock to inject into CertStore."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    """A clock fixed at T0 that tests can move."""
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> CertStore:
    """A CertStore in a fresh state directory with the injected clock."""
    return CertStore(tmp_path / "state", clock=clock)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _self_signed(
    tmp_path: Path, name: str, *, not_after: datetime, not_before: datetime | None = None
) -> tuple[Path, Path]:
    """Write an operator-style self-signed cert/key pair and return their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or not_after - timedelta(days=365))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


# -- CA --------------------------------------------------------------------------------------


def test_ca_created_once_and_reused_across_instances(tmp_path: Path, clock: Clock) -> None:
    """A second CertStore on the same state dir returns the CA the first one created."""
    first = CertStore(tmp_path, clock=clock).ca_pem()
    second = CertStore(tmp_path, clock=clock).ca_pem()
    assert first == second
    assert first.startswith(b"-----BEGIN CERTIFICATE-----")


def test_concurrent_first_start_creates_one_ca(tmp_path: Path, clock: Clock) -> None:
    """Many stores racing to create the CA all end up with the same single CA."""
    stores = [CertStore(tmp_path, clock=clock) for _ in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        pems = set(pool.map(lambda s: s.ca_pem(), stores))
    assert len(pems) == 1
    leftovers = [p.name for p in (tmp_path / "ca").iterdir()]
    assert sorted(leftovers) == [".lock", "ca.crt", "ca.key"]


def test_ca_key_and_dir_permissions(store: CertStore) -> None:
    """The CA key is mode 0600 and its directory 0700."""
    store.ca_pem()
    assert _mode(store.ca_dir) == 0o700
    assert _mode(store.ca_dir / "ca.key") == 0o600


def test_ca_dir_with_loose_permissions_is_tightened(store: CertStore) -> None:
    """A pre-existing group/world-accessible CA dir is tightened to 0700."""
    store.ca_dir.mkdir(parents=True, mode=0o755)
    store.ca_dir.chmod(0o755)
    store.ca_pem()
    assert _mode(store.ca_dir) == 0o700


def test_ca_certificate_profile(store: CertStore, clock: Clock) -> None:
    """The CA is self-signed EC P-256, CA:true pathlen 0, keyCertSign+cRLSign, ~10 years."""
    ca = x509.load_pem_x509_certificate(store.ca_pem())
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    assert bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    assert ku.crl_sign
    assert not ku.digital_signature
    cn = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(cn, str)
    assert cn.startswith("enforcer local CA ")
    assert len(cn) <= 64
    assert ca.not_valid_after_utc - clock.now > timedelta(days=3640)


def test_ca_key_mismatch_is_reported(store: CertStore, tmp_path: Path) -> None:
    """A CA key that does not match the CA certificate gives a CertError naming the key file."""
    store.ca_pem()
    _, other_key = _self_signed(tmp_path, "other.example", not_after=T0 + timedelta(days=9))
    (store.ca_dir / "ca.key").write_bytes(other_key.read_bytes())
    with pytest.raises(CertError, match=r"ca\.key"):
        CertStore(store.ca_dir.parent).ca_pem()


# -- leaves ----------------------------------------------------------------------------------


def test_leaf_sans_exactly_the_hosts(store: CertStore, clock: Clock) -> None:
    """The leaf's SANs are the hosts (IP literals as IPAddress) plus the extra IPs, nothing else."""
    leaf = store.ensure_leaf(
        "app", ["app.example", "*.app.example", "192.0.2.7"], extra_ips=["2001:db8::1"]
    )
    cert = _cert(leaf.cert)
    assert _sans(cert) == [
        x509.DNSName("app.example"),
        x509.DNSName("*.app.example"),
        x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
        x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
    ]
    assert leaf.cert == store.certs_dir / "app.crt"
    assert leaf.key == store.certs_dir / "app.key"
    assert leaf.not_after == cert.not_valid_after_utc == T0 + timedelta(days=90)


def test_leaf_profile(store: CertStore) -> None:
    """The leaf is EC P-256, serverAuth, not a CA, signed by the local CA, key mode 0600."""
    leaf = store.ensure_leaf("app", ["app.example"])
    cert = _cert(leaf.cert)
    ca = x509.load_pem_x509_certificate(store.ca_pem())
    cert.verify_directly_issued_by(ca)
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert pub.curve.name == "secp256r1"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _mode(leaf.key) == 0o600
    assert _mode(store.certs_dir) == 0o700
    assert cert.serial_number > 0


def test_leaf_reused_when_unchanged(store: CertStore) -> None:
    """Asking again with the same hosts returns the same certificate (same serial)."""
    a = store.ensure_leaf("app", ["app.example", "www.app.example"])
    serial = _cert(a.cert).serial_number
    b = CertStore(store.ca_dir.parent, clock=lambda: T0).ensure_leaf(
        "app", ["app.example", "www.app.example"]
    )
    assert b == a
    assert _cert(b.cert).serial_number == serial


def test_leaf_reminted_when_hosts_change(store: CertStore) -> None:
    """A changed host list mints a new certificate with exactly the new SANs."""
    a = store.ensure_leaf("app", ["app.example"])
    serial = _cert(a.cert).serial_number
    b = store.ensure_leaf("app", ["app.example", "new.example"])
    assert _cert(b.cert).serial_number != serial
    assert _sans(_cert(b.cert)) == [x509.DNSName("app.example"), x509.DNSName("new.example")]
    c = store.ensure_leaf("app", ["new.example"])
    assert _sans(_cert(c.cert)) == [x509.DNSName("new.example")]


@pytest.mark.parametrize(("days_later", "renewed"), [(59, False), (61, True)])
def test_leaf_renewed_near_expiry(
    store: CertStore, clock: Clock, days_later: int, renewed: bool
) -> None:
    """A 90-day leaf is kept until 30 days before it expires, then re-minted."""
    a = store.ensure_leaf("app", ["app.example"])
    clock.now = T0 + timedelta(days=days_later)
    b = store.ensure_leaf("app", ["app.example"])
    assert (b.not_after != a.not_after) is renewed
    if renewed:
        assert b.not_after == clock.now + timedelta(days=90)


def test_leaf_reminted_when_ca_changes(store: CertStore, clock: Clock) -> None:
    """A leaf not issued by the current CA (CA dir replaced) is re-minted."""
    a = store.ensure_leaf("app", ["app.example"])
    serial = _cert(a.cert).serial_number
    for p in store.ca_dir.iterdir():
        p.unlink()
    fresh = CertStore(store.ca_dir.parent, clock=clock)
    b = fresh.ensure_leaf("app", ["app.example"])
    assert _cert(b.cert).serial_number != serial
    _cert(b.cert).verify_directly_issued_by(x509.load_pem_x509_certificate(fresh.ca_pem()))


@pytest.mark.parametrize(
    "host",
    [
        "App.example",
        "app.example.",
        "",
        "a_b.example",
        "foo.*.example",
        "*x.example",
        "*.com",
        "-a.example",
        "a..example",
        "bücher.example",
        "a" * 64 + ".example",
        ("a" * 60 + ".") * 4 + "abcdefghijklm",
    ],
)
def test_invalid_hosts_rejected(store: CertStore, host: str) -> None:
    """Hosts that are not lower-case DNS names (or IP literals) raise CertError."""
    with pytest.raises(CertError, match="host"):
        store.ensure_leaf("app", [host])
    assert not (store.certs_dir / "app.crt").exists()


def test_bad_service_name_and_extra_ip_rejected(store: CertStore) -> None:
    """A service name unfit for a file name, or a non-IP extra address, raises CertError."""
    with pytest.raises(CertError, match="service name"):
        store.ensure_leaf("../evil", ["app.example"])
    with pytest.raises(CertError, match="not an IP literal"):
        store.ensure_leaf("app", ["app.example"], extra_ips=["app.example"])
    with pytest.raises(CertError, match="at least one host"):
        store.ensure_leaf("app", [])


def test_no_temporary_files_left(store: CertStore) -> None:
    """After minting, the certs dir holds only the pair and the lock file."""
    store.ensure_leaf("app", ["app.example"])
    store.ensure_leaf("app", ["app2.example"])
    assert sorted(p.name for p in store.certs_dir.iterdir()) == [".lock", "app.crt", "app.key"]


# -- operator-supplied -----------------------------------------------------------------------


def test_operator_leaf_valid_pair(store: CertStore, tmp_path: Path) -> None:
    """A matching, current operator pair is returned as-is with its notAfter."""
    end = T0 + timedelta(days=10)
    cert_file, key_file = _self_signed(tmp_path, "op.example", not_after=end)
    assert store.operator_leaf(cert_file, key_file) == LeafPaths(cert_file, key_file, end)
    assert not store.certs_dir.exists()  # nothing minted


def test_operator_leaf_mismatched_key(store: CertStore, tmp_path: Path) -> None:
    """A key that belongs to another certificate gives CertError naming the key file."""
    cert_file, _ = _self_signed(tmp_path, "op.example", not_after=T0 + timedelta(days=10))
    _, other_key = _self_signed(tmp_path, "other.example", not_after=T0 + timedelta(days=10))
    with pytest.raises(CertError, match=r"other\.example\.key.*does not belong"):
        store.operator_leaf(cert_file, other_key)


@pytest.mark.parametrize(
    ("not_before", "not_after", "message"),
    [
        (T0 - timedelta(days=30), T0 - timedelta(days=1), "expired"),
        (T0 + timedelta(days=1), T0 + timedelta(days=30), "not valid before"),
    ],
)
def test_operator_leaf_outside_validity(
    store: CertStore, tmp_path: Path, not_before: datetime, not_after: datetime, message: str
) -> None:
    """An expired or not-yet-valid operator certificate gives CertError naming the cert file."""
    cert_file, key_file = _self_signed(
        tmp_path, "op.example", not_before=not_before, not_after=not_after
    )
    with pytest.raises(CertError, match=rf"op\.example\.crt.*{message}"):
        store.operator_leaf(cert_file, key_file)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c, k: c.unlink(),
        lambda c, k: c.write_text("not a cert"),
        lambda c, k: k.write_text("not a key"),
    ],
)
def test_operator_leaf_unreadable_files(
    store: CertStore, tmp_path: Path, breakage: Callable[[Path, Path], object]
) -> None:
    """A missing or non-PEM file gives CertError naming that file."""
    cert_file, key_file = _self_signed(tmp_path, "op.example", not_after=T0 + timedelta(days=9))
    breakage(cert_file, key_file)
    with pytest.raises(CertError, match=r"op\.example\.(crt|key)"):
        store.operator_leaf(cert_file, key_file)
