"""Behaviour tests for flip_core.certs: the CA, server certificates, SuperNode keys.

Some tests call Flower internals on purpose: ``flwr supernode register``'s key loader,
``flower-supernode``'s private-key loader and the SuperLink's signature check. They are
exactly the code that will read these files in production, so if Flower changes them,
these tests should fail loudly.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from flip_core.certs import (
    CertError,
    fingerprint,
    load_ca,
    load_site_keys,
    make_ca,
    make_server_cert,
    make_site_keys,
    public_key_bytes,
)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def pki(tmp_path: Path):
    folder = tmp_path / "pki"
    ca = make_ca(folder)
    server = make_server_cert(folder, "superlink", ["127.0.0.1", "localhost", "hub.example.org", "::1"])
    return folder, ca, server


# --- CA and server certificates -------------------------------------------------------------


def test_server_cert_is_issued_by_the_ca_for_the_given_hosts(pki) -> None:
    folder, ca, server = pki
    ca_cert, cert = _cert(ca.cert), _cert(server.cert)
    cert.verify_directly_issued_by(ca_cert)
    assert server.ca == ca.cert
    assert (server.cert, server.key) == (folder / "superlink.pem", folder / "superlink.key")

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "hub.example.org"}

    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc


def test_ca_is_a_p384_ca_that_can_only_sign_leaf_certificates(pki) -> None:
    _, ca, _ = pki
    ca_cert = _cert(ca.cert)
    ca_cert.verify_directly_issued_by(ca_cert)
    constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert isinstance(ca_cert.public_key().curve, ec.SECP384R1)
    assert load_ca(ca.cert.parent) == ca


def test_key_files_are_private_and_a_new_folder_is_too(pki) -> None:
    folder, ca, server = pki
    assert _mode(folder) == 0o700
    assert _mode(ca.key) == 0o600
    assert _mode(server.key) == 0o600


def test_make_ca_refuses_to_replace_a_ca_unless_forced(pki) -> None:
    folder, ca, _ = pki
    before = ca.cert.read_bytes()
    with pytest.raises(CertError, match="already exists"):
        make_ca(folder)
    assert ca.cert.read_bytes() == before
    make_ca(folder, force=True)
    assert ca.cert.read_bytes() != before
    assert _mode(ca.key) == 0o600


def _serve_once(server_cert) -> tuple[int, threading.Thread]:
    """Accept one TLS connection on 127.0.0.1 with ``server_cert``; reply b"ok" if the handshake succeeds."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_cert.cert, server_cert.key)
    listener = socket.create_server(("127.0.0.1", 0))  # listening before the client connects
    listener.settimeout(10)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            conn.settimeout(10)
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass  # the client rejected us; the client side asserts that

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def _connect(port: int, cafile: Path, server_hostname: str) -> bytes:
    context = ssl.create_default_context(cafile=str(cafile))
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default; keep the certificates up to it
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            return tls.recv(2)


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost"])
def test_tls_handshake_succeeds_for_a_client_trusting_only_the_ca(pki, hostname: str) -> None:
    _, ca, server = pki
    port, thread = _serve_once(server)
    assert _connect(port, ca.cert, hostname) == b"ok"
    thread.join(10)


def test_tls_handshake_fails_against_another_ca(pki, tmp_path: Path) -> None:
    _, _, server = pki
    other = make_ca(tmp_path / "other")
    port, thread = _serve_once(server)
    with pytest.raises(ssl.SSLCertVerificationError):
        _connect(port, other.cert, "127.0.0.1")
    thread.join(10)


def test_tls_handshake_fails_for_a_host_not_in_the_certificate(pki) -> None:
    _, ca, server = pki
    port, thread = _serve_once(server)
    with pytest.raises(ssl.SSLCertVerificationError):
        _connect(port, ca.cert, "elsewhere.example.org")
    thread.join(10)


def test_server_cert_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="make_ca"):
        make_server_cert(tmp_path, "superlink", ["127.0.0.1"])
    with pytest.raises(CertError, match="make_ca"):
        load_ca(tmp_path)
    make_ca(tmp_path)
    for name in ("../escape", "a/b", "", ".hidden", "sp ace", "ca"):
        with pytest.raises(CertError):
            make_server_cert(tmp_path, name, ["127.0.0.1"])
    with pytest.raises(CertError, match="at least one"):
        make_server_cert(tmp_path, "superlink", [])
    with pytest.raises(CertError, match="neither an IP"):
        make_server_cert(tmp_path, "superlink", ["not a host"])
    (tmp_path / "ca.key").write_text("garbage")
    with pytest.raises(CertError, match="ca.key"):
        make_server_cert(tmp_path, "superlink", ["127.0.0.1"])


# --- SuperNode keys --------------------------------------------------------------------------


def test_site_keys_are_openssh_ecdsa_p384(tmp_path: Path) -> None:
    keys = make_site_keys(tmp_path / "keys", "hospital-a")
    assert (keys.private, keys.public) == (tmp_path / "keys/hospital-a.key", tmp_path / "keys/hospital-a.pub")
    line = keys.public.read_text()
    assert line.startswith("ecdsa-sha2-nistp384 ")
    assert line.endswith(" hospital-a\n") and line.count("\n") == 1
    assert keys.private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert _mode(keys.private) == 0o600
    assert isinstance(load_site_keys(keys.private)[0].curve, ec.SECP384R1)


def test_make_site_keys_refuses_to_replace_keys_unless_forced(tmp_path: Path) -> None:
    keys = make_site_keys(tmp_path, "hospital-a")
    before = keys.public.read_bytes()
    with pytest.raises(CertError, match="already exist"):
        make_site_keys(tmp_path, "hospital-a")
    assert keys.public.read_bytes() == before
    make_site_keys(tmp_path, "hospital-a", force=True)
    assert keys.public.read_bytes() != before
    with pytest.raises(CertError, match="safe file name"):
        make_site_keys(tmp_path, "../hospital")


def test_loaded_site_keys_are_a_matching_pair_as_flower_supernode_loads_them(tmp_path: Path) -> None:
    # Internal: flower-supernode's own --auth-supernode-private-key loader.
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    keys = make_site_keys(tmp_path, "hospital-a")
    private, public = load_site_keys(keys.private)
    signature = private.sign(b"message", ec.ECDSA(hashes.SHA256()))
    public.verify(signature, b"message", ec.ECDSA(hashes.SHA256()))

    args = argparse.Namespace(auth_supernode_private_key=str(keys.private), auth_supernode_public_key=None)
    flower_private, flower_public = _try_setup_client_authentication(args)
    assert flower_private.private_numbers() == private.private_numbers()
    assert flower_public.public_numbers() == public.public_numbers()


def test_node_signature_verifies_the_way_the_superlink_checks_it(tmp_path: Path) -> None:
    # Internal: the primitives the SuperNode signs with and the SuperLink's node-auth checks use
    # (flwr/superlink/routers/fleet/node_auth.py: authenticate_node).
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, sign_message, verify_signature

    keys = make_site_keys(tmp_path, "hospital-a")
    private, _ = load_site_keys(keys.private)
    timestamp = datetime.datetime.now(datetime.UTC).isoformat().encode("ascii")
    signature = sign_message(private, timestamp)
    registered = bytes_to_public_key(public_key_bytes(keys.public))
    assert verify_signature(registered, timestamp, signature)
    assert not verify_signature(registered, timestamp + b"x", signature)


def test_public_key_bytes_are_what_flwr_register_sends_and_the_supernode_presents(tmp_path: Path) -> None:
    # Internal: `flwr supernode register`'s loader, the SuperNode's serialiser, the SuperLink's checks.
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, public_key_to_bytes, uses_nist_ec_curve

    keys = make_site_keys(tmp_path, "hospital-a")
    sent = public_key_bytes(keys.public)
    assert sent == try_load_public_key(keys.public)
    # The SuperLink looks nodes up by exact bytes, so the SuperNode must present the same ones.
    assert sent == public_key_to_bytes(load_site_keys(keys.private)[1])
    assert uses_nist_ec_curve(bytes_to_public_key(sent))


def test_fingerprints(pki, tmp_path: Path) -> None:
    _, ca, server = pki
    keys = make_site_keys(tmp_path, "hospital-a")
    for path in (ca.cert, server.cert, keys.public):
        assert fingerprint(path).startswith("sha256:") and len(fingerprint(path)) == len("sha256:") + 64
    assert len({fingerprint(ca.cert), fingerprint(server.cert), fingerprint(keys.public)}) == 3
    with pytest.raises(CertError):
        fingerprint(keys.private)


def test_site_key_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="Cannot read"):
        load_site_keys(tmp_path / "missing.key")
    with pytest.raises(CertError, match="Cannot read"):
        public_key_bytes(tmp_path / "missing.pub")

    garbage = tmp_path / "garbage"
    garbage.write_text("not a key\n")
    with pytest.raises(CertError, match="OpenSSH private key"):
        load_site_keys(garbage)
    with pytest.raises(CertError, match="OpenSSH public key"):
        public_key_bytes(garbage)

    ed = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "ed.key").write_bytes(
        ed.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    (tmp_path / "ed.pub").write_bytes(
        ed.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(CertError, match="ECDSA"):
        load_site_keys(tmp_path / "ed.key")
    with pytest.raises(CertError, match="ECDSA"):
        public_key_bytes(tmp_path / "ed.pub")

    ca = make_ca(tmp_path / "pki")  # an ECDSA key, but PEM: flower-supernode would reject it too
    with pytest.raises(CertError, match="OpenSSH private key"):
        load_site_keys(ca.key)
