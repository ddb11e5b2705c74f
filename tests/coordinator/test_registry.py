"""The hub's register of sites (``coordinator.registry``) and ``flip certs``."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.registry import RegistryError, SiteRegistry


def test_a_registered_sites_token_names_it_and_only_its_hash_is_kept(tmp_path: Path) -> None:
    registry = SiteRegistry(tmp_path / "sites.json")
    token = registry.register("VA", 42, "sha256:ab")
    assert registry.identify(token) is not None and registry.identify(token).name == "VA"  # type: ignore[union-attr]
    assert registry.identify(token + "x") is None and registry.identify("") is None
    assert token not in (tmp_path / "sites.json").read_text()
    assert (tmp_path / "sites.json").stat().st_mode & 0o777 == 0o600
    with pytest.raises(RegistryError, match="already registered"):
        registry.register("VA", 43, "sha256:cd")
    renewed = SiteRegistry(tmp_path / "sites.json").register("VA", 43, "sha256:cd", replace=True)
    assert registry.identify(token) is None  # the old token is void: the running coordinator re-reads the file
    assert registry.identify(renewed).node_id == 43  # type: ignore[union-attr]
    with pytest.raises(RegistryError, match="not a site name"):
        registry.register("../x", 1, "sha256:ef")


def test_flip_certs_makes_a_ca_and_a_hub_certificate_for_its_names(tmp_path: Path) -> None:
    flip = Path(sys.executable).parent / "flip"
    done = subprocess.run(
        [flip, "certs", tmp_path / "pki", "--host", "hub.example.org", "--host", "10.0.0.5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "keep it offline" in done.stdout
    context = ssl.create_default_context(cafile=str(tmp_path / "pki" / "ca.pem"))
    context.load_cert_chain(tmp_path / "pki" / "superlink.pem", tmp_path / "pki" / "superlink.key")
    again = subprocess.run(
        [flip, "certs", tmp_path / "pki", "--host", "hub2.example.org", "--name", "hub2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and (tmp_path / "pki" / "hub2.pem").exists()  # the same CA signs it
