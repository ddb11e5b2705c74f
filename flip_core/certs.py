"""The consortium's keys and certificates, made with ``cryptography`` (no openssl subprocess).

Two kinds of credential:

- TLS: one consortium CA (``ca.pem``/``ca.key``, ECDSA P-384) signs each server's
  certificate (``<name>.pem``/``<name>.key``, ECDSA P-256). Clients trust ``ca.pem`` only.
- SuperNode authentication: each site holds an ECDSA P-384 key pair in OpenSSH format,
  as ``ssh-keygen -t ecdsa -b 384`` makes it. ``flower-supernode`` reads the private key
  (``--auth-supernode-private-key``); the SuperLink learns the public key through the
  control API's ``RegisterNode``.

Private key files are written with mode 0600, new folders with 0700.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flip_core.errors import ConfigError

_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_DNS_NAME = re.compile(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_CLOCK_SKEW = datetime.timedelta(minutes=5)
_T = TypeVar("_T")


SITE_KEYS = "keys"  # in a site's directory: its key pair, the consortium's CA certificate, its Flower node id


class CertError(ConfigError):
    """A key or certificate is missing, malformed, or would be overwritten."""


@dataclass(frozen=True)
class CA:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerCert:
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class SiteKeys:
    private: Path
    public: Path


def make_ca(folder: Path, *, name: str = "FLIP consortium CA", days: int = 825, force: bool = False) -> CA:
    """Create a self-signed CA in ``folder`` (``ca.pem``, ``ca.key``); refuse to replace one unless ``force``."""
    ca = CA(cert=folder / "ca.pem", key=folder / "ca.key")
    if not force and (ca.cert.exists() or ca.key.exists()):
        raise CertError(
            f"A CA already exists in {folder}. Replacing it would invalidate every certificate "
            "it signed; pass force=True only if you mean to reissue them all."
        )
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _make_folder(folder)
    _write(ca.key, _pem_private_key(key), private=True)
    _write(ca.cert, cert.public_bytes(serialization.Encoding.PEM))
    return ca


def load_ca(folder: Path) -> CA:
    """The CA in ``folder``; CertError if ``ca.pem`` or ``ca.key`` is missing."""
    ca = CA(cert=folder / "ca.pem", key=folder / "ca.key")
    missing = [p.name for p in (ca.cert, ca.key) if not p.is_file()]
    if missing:
        raise CertError(f"No CA in {folder}: {' and '.join(missing)} missing. Create one with make_ca first.")
    return ca


def make_server_cert(folder: Path, name: str, hosts: list[str], *, days: int = 825) -> ServerCert:
    """Issue ``<name>.pem``/``<name>.key`` in ``folder``, signed by its CA, valid for ``hosts`` (IPs or DNS names)."""
    _check_name(name, "server name")
    if name == "ca":
        raise CertError("The server name 'ca' would overwrite the CA's own files; choose another name.")
    if not hosts:
        raise CertError("A server certificate needs at least one host name or IP address.")
    ca = load_ca(folder)
    ca_cert = _read(ca.cert, x509.load_pem_x509_certificate, "a PEM certificate")
    ca_key = _read(ca.key, lambda data: serialization.load_pem_private_key(data, None), "a PEM private key")
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):  # make_ca makes an EC key; any other is not ours
        raise CertError(f"{ca.key} holds a {type(ca_key).__name__}, not the consortium CA's EC key.")
    ca_public = ca_cert.public_key()
    if not isinstance(ca_public, ec.EllipticCurvePublicKey):
        raise CertError(f"{ca.cert} is not the consortium CA's certificate (not an EC key).")
    start, end = _validity(days)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(end, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server = ServerCert(cert=folder / f"{name}.pem", key=folder / f"{name}.key", ca=ca.cert)
    _write(server.key, _pem_private_key(key), private=True)
    _write(server.cert, cert.public_bytes(serialization.Encoding.PEM))
    return server


def make_site_keys(folder: Path, site: str, *, force: bool = False) -> SiteKeys:
    """Write a site's SuperNode key pair, ``<site>.key`` (OpenSSH, no passphrase) and ``<site>.pub``."""
    _check_name(site, "site name")
    keys = SiteKeys(private=folder / f"{site}.key", public=folder / f"{site}.pub")
    if not force and (keys.private.exists() or keys.public.exists()):
        raise CertError(
            f"Keys for site {site!r} already exist in {folder}. Replacing them locks the site out "
            "until its new public key is registered; pass force=True if that is what you want."
        )
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _make_folder(folder)
    _write(keys.private, private, private=True)
    _write(keys.public, public + f" {site}\n".encode())
    return keys


def load_site_keys(private: Path) -> tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey]:
    """The site's key pair as Flower's fleet connection takes it (``authentication_keys``).

    Reads the file the way ``flower-supernode --auth-supernode-private-key`` does
    (flwr/supernode/cli/flower_supernode.py, ``_try_setup_client_authentication``):
    an unencrypted OpenSSH private key that must be ECDSA.
    """
    key = _read(
        private, lambda data: serialization.load_ssh_private_key(data, None), "an unencrypted OpenSSH private key"
    )
    ecdsa = _ecdsa_private(key, private)
    return ecdsa, ecdsa.public_key()


def public_key_bytes(public: Path) -> bytes:
    """The site's public key as the control API's ``RegisterNode`` takes it: PEM SubjectPublicKeyInfo.

    Mirrors ``flwr supernode register`` (flwr/cli/supernode/register.py, ``try_load_public_key``):
    an OpenSSH ECDSA public key, serialised with flwr.supercore.primitives.asymmetric's
    ``public_key_to_bytes``. The SuperNode sends the same bytes when it authenticates, and the
    SuperLink finds the node by comparing them exactly.
    """
    key = _read(public, serialization.load_ssh_public_key, "an OpenSSH public key")
    ecdsa = _ecdsa_public(key, public)
    return ecdsa.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(cert_or_pub: Path) -> str:
    """``sha256:<hex>`` of a PEM certificate's DER, or of an OpenSSH public key's blob (as ``ssh-keygen -l``)."""
    if b"-----BEGIN CERTIFICATE-----" in _read(cert_or_pub, bytes, "readable"):
        cert = _read(cert_or_pub, x509.load_pem_x509_certificate, "a PEM certificate")
        raw = cert.public_bytes(serialization.Encoding.DER)
    else:
        key = _read(cert_or_pub, serialization.load_ssh_public_key, "a PEM certificate or an OpenSSH public key")
        raw = base64.b64decode(
            key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
        )
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    if days < 1:
        raise CertError(f"A certificate must be valid for at least one day, not {days}.")
    now = datetime.datetime.now(datetime.UTC)
    return now - _CLOCK_SKEW, now + datetime.timedelta(days=days)


def _not_ecdsa(key: object, path: Path) -> CertError:
    return CertError(
        f"{path} holds a {type(key).__name__}, but Flower SuperNode authentication needs an "
        "ECDSA key. Make one with make_site_keys."
    )


def _ecdsa_private(key: object, path: Path) -> ec.EllipticCurvePrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise _not_ecdsa(key, path)
    return key


def _ecdsa_public(key: object, path: Path) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise _not_ecdsa(key, path)
    return key


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not _DNS_NAME.fullmatch(host):
        raise CertError(
            f"{host!r} is neither an IP address nor a DNS name; give hosts like 10.0.0.5 or hub.example.org."
        )
    return x509.DNSName(host)


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise CertError(
            f"The {what} {name!r} is not a safe file name: use 1-64 letters, digits, '.', '-' "
            "or '_', not starting with '.'."
        )


def _read(path: Path, parse: Callable[[bytes], _T], what: str) -> _T:
    """``parse`` applied to the file's bytes; CertError if it cannot be read or parsed."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CertError(f"Cannot read {path}: {err.strerror or err}. Check the path.") from err
    try:
        return parse(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise CertError(f"{path} is not {what} ({err}).") from err


def _pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _make_folder(folder: Path) -> None:
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)
        os.chmod(folder, 0o700)


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600 if ``private`` else 0644."""
    tmp = path.with_name(f".{path.name}.tmp")
    mode = 0o600 if private else 0o644
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as file:
        os.fchmod(file.fileno(), mode)  # O_CREAT's mode does not apply to a leftover file
        file.write(data)
    os.replace(tmp, path)
