"""The fleet front as an nginx configuration: the same allow list as ``coordinator.fleet_front``, in C.

Hub operators put a real reverse proxy in front of such services. This renders one for nginx (Debian's
``nginx-light`` has every module it needs) that serves exactly what the Python front serves on the
site-facing address, with TLS:

- ``POST /v1/fleet/<name>`` to the SuperLink (over TLS, checked against the consortium's CA), another
  method there gets 403;
- any method on ``/site/<...>`` to the coordinator (the presence stream stays open, unbuffered);
- ``GET /health`` answered here with ``ok``;
- anything else, a request target with an encoded slash, backslash or dot, or a path with dot segments,
  403 and the same sentence.

Bodies are streamed both ways (``proxy_request_buffering off``, ``proxy_buffering off``): a 400 MB model
is never held whole by the front. A payload a site fetches (``GET /site/blobs/SHA``) is authorised by the
coordinator, which answers with the file's place only (``X-Accel-Redirect``, because this front says it is
nginx in ``x-flip-accel``); nginx then sends the file itself, so the coordinator does not pump the bytes.
Request targets are passed on as sent, and the SuperNode
authentication headers with them. ``flip up --front nginx`` runs it for a local federation
(``coordinator.hubside``); ``deploy/nginx-fleet-front.conf`` is the same file rendered for a hub host.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from coordinator.blobs import ACCEL_HEADER, ACCEL_PREFIX
from coordinator.doors import FRONT, Doors
from coordinator.fleet_front import FORBIDDEN, MAX_PAYLOAD_BYTES
from coordinator.fleet_gate import ANNOUNCE_BODY_LIMIT, FLEET_BODY_LIMIT, SITE_BODY_LIMIT

NGINX = "nginx"

TEMPLATE = """\
# FLIP's fleet front for nginx: the only hub address that hospital sites reach.
# Rendered by coordinator/nginx_front.py; run with `nginx -c THIS_FILE -g 'daemon off;'`.
{user}worker_processes {workers};
pid {pid};
error_log {error_log} warn;
events {{ worker_connections {worker_connections}; }}

http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server_tokens off;
    # the doors (coordinator.doors.FRONT): a head within 10 s, no silence of 30 s in a body or of 60 s in an
    # answer, heads of at most 16 KiB, at most {per_peer} connections from one address
    client_header_timeout {head_seconds}s;
    client_body_timeout {body_idle_seconds}s;
    send_timeout {send_idle_seconds}s;
    keepalive_timeout {keep_alive_seconds}s;
    client_header_buffer_size 1k;
    large_client_header_buffers 4 {max_head_kib}k;
    reset_timedout_connection on;
    lingering_time {body_idle_seconds}s;
    map $remote_addr $flip_peer_key {{ ~^127\\. ""; "::1" ""; default $binary_remote_addr; }}  # loopback: the hub's own
    limit_conn_zone $flip_peer_key zone=flip_peer:1m;
    limit_conn flip_peer {per_peer};
    client_max_body_size {site_body};
    proxy_http_version 1.1;
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_set_header Connection "";
    proxy_set_header Host $http_host;
    proxy_connect_timeout 5s;
    proxy_send_timeout 120s;

    upstream flip_superlink {{ server {superlink}; keepalive 32; }}
    upstream flip_coordinator {{ server {coordinator}; keepalive 32; }}

    server {{
        listen {listen} ssl;
        ssl_certificate {certfile};
        ssl_certificate_key {keyfile};
        ssl_protocols TLSv1.2 TLSv1.3;
        default_type text/plain;

        # an encoded slash, backslash or dot, or a dot segment: the upstream could route elsewhere
        if ($request_uri ~* "(%2f|%5c|%2e|/\\.\\.?(/|$|\\?))") {{ return 403 "{forbidden}"; }}

        location = /health {{
            limit_except GET {{ deny all; }}
            return 200 "ok";
        }}
        location /v1/fleet/ {{
            limit_except POST {{ deny all; }}
            # a SuperNode's signed credential, well formed (the SuperLink checks the signature and the key)
            if ($http_flwr_public_key !~ "^[A-Za-z0-9+/]{{1,4096}}={{0,2}}$") {{ return 401 "{unsigned}"; }}
            if ($http_flwr_signature !~ "^[A-Za-z0-9+/]{{1,1024}}={{0,2}}$") {{ return 401 "{unsigned}"; }}
            if ($http_flwr_timestamp !~ "{timestamp}") {{ return 401 "{unsigned}"; }}
            client_max_body_size {fleet_body};  # FLIP's largest fleet body is 1 MiB and 134 bytes
            client_body_buffer_size {fleet_body};
            proxy_request_buffering on;  # read whole (and checked against the limit) before a byte is forwarded
            proxy_pass https://flip_superlink;
            proxy_ssl_trusted_certificate {superlink_ca};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;  # a name in the hub certificate (nginx matches names, not IP addresses)
            proxy_read_timeout 120s;
        }}
        location = /site/announce {{
            if ($http_authorization !~* "^(bearer|token) +[^ ]") {{ return 401 "{tokenless}"; }}
            client_max_body_size {announce_body};
            proxy_pass http://flip_coordinator;
        }}
        location /site/blobs/ {{
            if ($http_authorization !~* "^(bearer|token) +[^ ]") {{ return 401 "{tokenless}"; }}
            if ($http_transfer_encoding) {{ return 411 "a payload upload needs a Content-Length\\n"; }}
            client_max_body_size {max_payload};  # a payload streams through, checked by its Content-Length first
            proxy_pass http://flip_coordinator;
            proxy_read_timeout 120s;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header {accel_header} 1;  # the coordinator answers a payload with its file's place ...
        }}
        location /site/ {{
            if ($http_authorization !~* "^(bearer|token) +[^ ]") {{ return 401 "{tokenless}"; }}
            proxy_pass http://flip_coordinator;
            proxy_read_timeout 1d;  # the presence stream stays open while the site is online
        }}
        location {accel_prefix} {{
            internal;  # ... and nginx sends the file (X-Accel-Redirect); no request reaches this directly
            alias {payloads}/;
            default_type application/octet-stream;
        }}
        location / {{ return 403 "{forbidden}"; }}
        error_page 403 @forbidden;
        location @forbidden {{ return 403 "{forbidden}"; }}
    }}
}}
"""


@dataclass(frozen=True)
class NginxFront:
    """What the rendered configuration needs: addresses, certificates and a folder for nginx's own files."""

    listen: str  # HOST:PORT sites reach
    superlink: str  # HOST:PORT of the SuperLink (TLS)
    coordinator: str  # HOST:PORT of the coordinator (plain HTTP on the hub's loopback)
    certfile: str
    keyfile: str
    superlink_ca: str
    state: str  # nginx's pid, error log and temporary folders go here
    payloads: str = ""  # the coordinator's payload folder (coordinator.blobs), which nginx serves itself
    user: str | None = None  # the user nginx's workers run as ("root" when started as root: the state is private)
    max_payload: int = MAX_PAYLOAD_BYTES  # the largest payload upload (PUT /site/blobs/SHA) let through
    workers: str = "auto"
    doors: Doors = FRONT

    def render(self) -> str:
        doors = self.doors
        return TEMPLATE.format(
            user=f"user {self.user};\n" if self.user else "",
            worker_connections=doors.max_connections,
            head_seconds=_seconds(doors.head_seconds),
            body_idle_seconds=_seconds(doors.body_idle_seconds),
            send_idle_seconds=_seconds(doors.send_idle_seconds),
            keep_alive_seconds=doors.keep_alive_seconds,
            max_head_kib=max(1, doors.max_head_bytes // 1024),
            per_peer=doors.per_peer or doors.max_connections,
            fleet_body=FLEET_BODY_LIMIT,
            announce_body=ANNOUNCE_BODY_LIMIT,
            site_body=SITE_BODY_LIMIT,
            max_payload=self.max_payload,
            timestamp=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]{8,20}(Z|[+-][0-9]{2}:[0-9]{2})$",
            unsigned="a fleet call carries a SuperNode's signed credential (flwr-public-key, -timestamp, -signature)"
            "\\n",
            tokenless="a site route needs the site's token (Authorization)\\n",
            accel_header=ACCEL_HEADER,
            accel_prefix=ACCEL_PREFIX,
            payloads=self.payloads,
            workers=self.workers,
            pid=f"{self.state}/nginx.pid",
            error_log=f"{self.state}/nginx-error.log",
            temp=f"{self.state}/nginx-temp",
            superlink=self.superlink,
            coordinator=self.coordinator,
            listen=self.listen,
            certfile=self.certfile,
            keyfile=self.keyfile,
            superlink_ca=self.superlink_ca,
            forbidden=FORBIDDEN.replace("\n", "\\n"),
        )

    def write(self, path: Path) -> Path:
        (Path(self.state) / "nginx-temp").mkdir(parents=True, exist_ok=True)
        path.write_text(self.render())
        return path


def _seconds(value: float) -> int:
    return max(1, round(value))


def nginx_binary() -> str:
    """The nginx executable, or a sentence saying how to get one."""
    found = shutil.which(NGINX) or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )
    if found is None:
        raise FileNotFoundError("nginx is not installed: `apt-get install nginx-light` (or use the Python front)")
    return found


__all__ = ["NGINX", "TEMPLATE", "NginxFront", "nginx_binary"]
