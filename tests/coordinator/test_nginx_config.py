"""The nginx front's configuration (``coordinator.nginx_front``) keeps the Python front's doors: the same body
limits per route, credential shapes refused before a byte is forwarded, header and body timeouts and connection
limits; nginx itself accepts the file (``nginx -t``) where it is installed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from coordinator.doors import FRONT
from coordinator.fleet_gate import ANNOUNCE_BODY_LIMIT, FLEET_BODY_LIMIT, SITE_BODY_LIMIT
from coordinator.nginx_front import NginxFront, nginx_binary


def front(tmp_path: Path, **fields: object) -> NginxFront:
    return NginxFront(
        listen="127.0.0.1:9092",
        superlink="127.0.0.1:9091",
        coordinator="127.0.0.1:8900",
        certfile=str(tmp_path / "c.pem"),
        keyfile=str(tmp_path / "k.pem"),
        superlink_ca=str(tmp_path / "c.pem"),
        state=str(tmp_path / "state"),
        payloads=str(tmp_path / "payloads"),
        **fields,  # type: ignore[arg-type]
    )


def location(rendered: str, name: str) -> str:
    found = re.search(r"location " + re.escape(name) + r" \{(.*?)\n        \}", rendered, re.S)
    assert found, name
    return found.group(1)


def test_each_route_has_the_python_fronts_body_limit(tmp_path: Path) -> None:
    rendered = front(tmp_path, max_payload=12345).render()
    assert f"client_max_body_size {SITE_BODY_LIMIT};" in rendered.split("server {")[0]  # every other route
    fleet = location(rendered, "/v1/fleet/")
    assert f"client_max_body_size {FLEET_BODY_LIMIT};" in fleet
    assert "proxy_request_buffering on;" in fleet  # read whole before a byte is forwarded
    assert f"client_max_body_size {ANNOUNCE_BODY_LIMIT};" in location(rendered, "= /site/announce")
    blobs = location(rendered, "/site/blobs/")
    assert "client_max_body_size 12345;" in blobs and "return 411" in blobs


def test_credentials_are_required_before_forwarding(tmp_path: Path) -> None:
    rendered = front(tmp_path).render()
    fleet = location(rendered, "/v1/fleet/")
    for header in ("flwr_public_key", "flwr_signature", "flwr_timestamp"):
        assert re.search(r"if \(\$http_" + header + r" !~ \"[^\"]+\"\) \{ return 401", fleet), header
    for name in ("= /site/announce", "/site/blobs/", "/site/"):
        assert "if ($http_authorization !~*" in location(rendered, name)


def test_the_doors_are_nginxs_timeouts_and_limits(tmp_path: Path) -> None:
    rendered = front(tmp_path).render()
    assert f"client_header_timeout {round(FRONT.head_seconds)}s;" in rendered
    assert f"client_body_timeout {round(FRONT.body_idle_seconds)}s;" in rendered
    assert f"send_timeout {round(FRONT.send_idle_seconds)}s;" in rendered
    assert f"keepalive_timeout {FRONT.keep_alive_seconds}s;" in rendered
    assert f"limit_conn flip_peer {FRONT.per_peer};" in rendered
    assert f"worker_connections {FRONT.max_connections};" in rendered


def test_nginx_accepts_the_file(tmp_path: Path) -> None:
    try:
        binary = nginx_binary()
    except FileNotFoundError:
        pytest.skip("nginx is not installed here")
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        + ["-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.pem"), "-days", "1", "-subj", "/CN=x"],
        capture_output=True,
    )
    if made.returncode:
        pytest.skip("openssl cannot make a test certificate here")
    conf = front(tmp_path, user="root").write(tmp_path / "nginx.conf")
    checked = subprocess.run(
        [binary, "-t", "-c", str(conf), "-e", str(tmp_path / "error.log")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
