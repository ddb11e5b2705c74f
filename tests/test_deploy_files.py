"""deploy/: the compose files and images a real multi-host deployment starts from.

There is no container engine here, so nothing is built or started: ``docker-compose config``
(Debian's 1.29, which `make test` installs as root) validates each compose file against its
example env file without one, and the tests assert on the configuration it prints: what is
published, what is mounted, which secrets are required. The Dockerfiles are read as text:
exactly torch 2.13.0 (CPU) before the project, the kernel installed, not root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
HUB, HUB_ENV = DEPLOY / "compose.hub.yml", DEPLOY / "hub.env.example"
SITE, SITE_ENV = DEPLOY / "compose.site.yml", DEPLOY / "site.env.example"
TORCH = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
REQUIRED = re.compile(r"\$\{(\w+):\?([^}]*)\}")
ANY_VAR = re.compile(r"\$\{(\w+)")


def _compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail(
            "docker-compose is not on PATH: `make test` installs it when run as root "
            "(apt-get install docker-compose); install it that way to check deploy/'s compose files"
        )
    return path


def _config(compose: Path, env_file: Path) -> subprocess.CompletedProcess[str]:
    # A bare environment: a variable set in the caller's shell would override the env file's.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(
        [_compose(), "-f", str(compose), "--env-file", str(env_file), "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _parsed(compose: Path, env_file: Path) -> dict[str, Any]:
    done = _config(compose, env_file)
    assert done.returncode == 0, f"docker-compose config {compose.name} failed:\n{done.stderr}"
    return yaml.safe_load(done.stdout)


@pytest.fixture(scope="module")
def hub() -> dict[str, Any]:
    return _parsed(HUB, HUB_ENV)


@pytest.fixture(scope="module")
def site() -> dict[str, Any]:
    return _parsed(SITE, SITE_ENV)


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value for key, value in pairs}


def _uncommented(compose: Path) -> str:
    return "\n".join(line for line in compose.read_text().splitlines() if not line.lstrip().startswith("#"))


def _required(compose: Path) -> dict[str, str]:
    """Each variable the compose file requires (${VAR:?message}) and its message."""
    return dict(REQUIRED.findall(_uncommented(compose)))


def _published(service: dict[str, Any]) -> list[tuple[int, int]]:
    return [(int(p["published"]), int(p["target"])) for p in service.get("ports", [])]


def _volumes(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only), from 1.29's short syntax or Compose v2's long one."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, mode = (volume.split(":") + ["rw"])[:3]
            mounts[target] = (source, mode == "ro")
        else:
            mounts[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
    return mounts


def test_coordinator_publishes_only_the_fleet_port(hub: dict[str, Any]) -> None:
    services = hub["services"]
    assert _published(services["coordinator"]) == [(9092, 9092)]
    assert _published(services["jupyterhub"]) == [(443, 8443)]
    assert not services["singleuser"].get("ports")
    env = services["coordinator"]["environment"]
    assert env["JUPYTERHUB_API_URL"] == "http://jupyterhub:8081/hub/api"
    assert env["JUPYTERHUB_SERVICE_NAME"] == "coordinator"
    assert env["JUPYTERHUB_API_TOKEN"] == services["jupyterhub"]["environment"]["FLIP_COORDINATOR_HUB_TOKEN"]
    assert env["FLIP_HUB_NAME"] == _env_file(HUB_ENV)["FLIP_HUB_NAME"]
    assert _volumes(services["coordinator"])["/var/lib/flip"] == ("flip-state", False)
    # 443 (web) and 9092 (sites): nothing else on the hub host is published.
    assert sorted(port for service in services.values() for port, _ in _published(service)) == [443, 9092]
    assert hub["volumes"]["flip-state"]["name"] == "flip-state"


def test_jupyterhub_spawns_on_the_docker_socket_with_tls(hub: dict[str, Any]) -> None:
    services = hub["services"]
    hub_service = services["jupyterhub"]
    volumes = _volumes(hub_service)
    assert volumes["/var/run/docker.sock"] == ("/var/run/docker.sock", False)
    assert volumes["/srv/jupyterhub"] == ("hub-data", False)
    env = hub_service["environment"]
    assert env["FLIP_HUB_PROFILE"] == "production"
    for key in ("FLIP_HUB_TLS_CERT", "FLIP_HUB_TLS_KEY"):
        assert env[key].startswith("/srv/flip/tls/")
    assert volumes["/srv/flip/tls"] == (str(DEPLOY / "tls"), True)
    # Users' containers join the compose network by its explicit name and reach the coordinator there.
    assert hub["networks"]["flip-hub"]["name"] == env["FLIP_DOCKER_NETWORK"] == "flip-hub"
    assert set(hub_service["networks"]) == set(services["coordinator"]["networks"]) == {"flip-hub"}
    assert env["FLIP_COORDINATOR_SERVICE_URL"] == "http://coordinator:8900"
    assert env["FLIP_HUB_CONNECT_HOST"] == "jupyterhub"
    assert env["FLIP_OIDC_GROUPS_CLAIM"] == "groups" and env["FLIP_IDLE_TIMEOUT"] == "3600"
    # The single-user image is built under the very tag the spawner starts, and `up` leaves it alone.
    singleuser = services["singleuser"]
    assert singleuser["image"] == env["FLIP_SINGLEUSER_IMAGE"] == _env_file(HUB_ENV)["FLIP_SINGLEUSER_IMAGE"]
    assert singleuser["profiles"] == ["build"]
    assert singleuser["build"]["dockerfile"] == "deploy/singleuser.Dockerfile"
    assert Path(singleuser["build"]["context"]) == ROOT


def test_site_publishes_nothing_and_reads_data_read_only(site: dict[str, Any]) -> None:
    service = site["services"]["site"]
    assert not service.get("ports") and not service.get("expose")
    volumes = _volumes(service)
    env = _env_file(SITE_ENV)
    assert volumes["/data"] == (env["FLIP_SITE_DATA"], True)
    assert volumes["/site"] == (env["FLIP_SITE_DIR"], False)
    assert service["restart"] == "unless-stopped"
    assert service["build"]["dockerfile"] == "deploy/site.Dockerfile"


def test_every_variable_has_an_example_and_every_example_is_used() -> None:
    for compose, env_file in ((HUB, HUB_ENV), (SITE, SITE_ENV)):
        used = set(ANY_VAR.findall(_uncommented(compose)))
        given = set(_env_file(env_file))
        assert used == given, (
            f"{compose.name} uses {sorted(used - given)} not in {env_file.name}; "
            f"{env_file.name} sets {sorted(given - used)} that {compose.name} does not use"
        )


@pytest.mark.parametrize(
    "compose,env_file,name",
    [
        (HUB, HUB_ENV, "FLIP_COORDINATOR_HUB_TOKEN"),
        (SITE, SITE_ENV, "FLIP_SITE_DATA"),
    ],
    ids=["hub", "site"],
)
def test_a_missing_secret_fails_config_with_its_message(
    tmp_path: Path, compose: Path, env_file: Path, name: str
) -> None:
    lacking = tmp_path / f"without-{name}.env"
    lacking.write_text(
        "".join(line + "\n" for line in env_file.read_text().splitlines() if not line.startswith(f"{name}="))
    )
    done = _config(compose, lacking)
    assert done.returncode != 0, f"{compose.name}: config passed without {name}"
    assert _required(compose)[name] in done.stderr, done.stderr


def test_the_required_variables_include_the_secrets() -> None:
    assert {
        "FLIP_COORDINATOR_HUB_TOKEN",
        "OAUTH_CLIENT_SECRET",
        "FLIP_HUB_NAME",
        "FLIP_SINGLEUSER_IMAGE",
        "FLIP_HUB_ALLOWED_GROUPS",
    } <= set(_required(HUB))
    assert set(_required(SITE)) == {"FLIP_SITE_DATA"}
    # Every message says which variable and which env file (the same mechanism as the two run above).
    for compose, env_file in ((HUB, "hub.env"), (SITE, "site.env")):
        for name, message in _required(compose).items():
            assert message.startswith(f"set {name} in {env_file} ("), f"{compose.name}: {name}: {message!r}"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: continuations joined, comments dropped."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip() if " " in line.strip() else "")
        for line in joined.splitlines()
        if line.strip()
    ]


IMAGES = ["singleuser", "hub", "coordinator", "site"]
WITH_PROJECT = ["singleuser", "coordinator", "site"]


@pytest.mark.parametrize("image", IMAGES)
def test_image_is_python_3_11_slim(image: str) -> None:
    steps = _instructions(DEPLOY / f"{image}.Dockerfile")
    assert steps[0] == ("FROM", "python:3.11-slim")


@pytest.mark.parametrize("image", WITH_PROJECT)
def test_exact_cpu_torch_is_installed_before_the_project(image: str) -> None:
    runs = [args for kind, args in _instructions(DEPLOY / f"{image}.Dockerfile") if kind == "RUN"]
    torch = [i for i, args in enumerate(runs) if TORCH in args]
    project = [i for i, args in enumerate(runs) if re.search(r"pip install \"?/src\b", args)]
    assert len(torch) == 1 and project, f"{image}: want one `{TORCH}` and a `pip install /src`: {runs}"
    assert torch[0] < project[0], f"{image}: torch must be installed before the project"
    # No other step names torch: pip must never get to resolve it.
    assert all("torch" not in args for i, args in enumerate(runs) if i != torch[0])


@pytest.mark.parametrize("image", WITH_PROJECT)
def test_image_copies_every_package_the_project_installs(image: str) -> None:
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    copied = {args.split()[0] for kind, args in _instructions(DEPLOY / f"{image}.Dockerfile") if kind == "COPY"}
    tops = {p.removesuffix("*").split(".")[0] for p in found["include"]}  # "site_agent*": site_agent and below
    assert tops <= copied, f"{image}: `pip install /src` would miss a package"


def test_singleuser_image_installs_the_kernel_and_the_notebooks() -> None:
    steps = _instructions(DEPLOY / "singleuser.Dockerfile")
    runs = [args for kind, args in steps if kind == "RUN"]
    assert any("pip install /src" in args and "flip kernel install" in args for args in runs)
    assert ("COPY", "notebooks /srv/flip/notebooks") in steps
    assert ("CMD", '["jupyterhub-singleuser"]') in steps and ("EXPOSE", "8888") in steps


def test_hub_image_pins_its_packages_and_reads_the_production_config() -> None:
    steps = _instructions(DEPLOY / "hub.Dockerfile")
    runs = " ".join(args for kind, args in steps if kind == "RUN")
    for pin in (
        "jupyterhub==6.1.1",
        "dockerspawner==14.0.0",
        "oauthenticator==17.4.0",
        "jupyterhub-idle-culler==2.0.0",
        "configurable-http-proxy==0.4.0",
    ):
        assert pin in runs.split()
    assert ("COPY", "hub_config /srv/flip/hub_config") in steps
    env = " ".join(args for kind, args in steps if kind == "ENV")
    assert "PYTHONPATH=/srv/flip" in env and "FLIP_HUB_PROFILE=production" in env
    assert ("WORKDIR", "/srv/jupyterhub") in steps
    assert steps[-1] == ("CMD", '["jupyterhub", "-f", "/srv/flip/hub_config/jupyterhub_config.py"]')


def test_coordinator_image_serves_the_fleet_and_the_researcher_api() -> None:
    steps = _instructions(DEPLOY / "coordinator.Dockerfile")
    cmd = [args for kind, args in steps if kind == "CMD"][-1]
    for part in (
        "flip serve",
        "--state /var/lib/flip",
        "--fleet-port 9092",
        "--coordinator-port 8900",
        '--hub-name "$FLIP_HUB_NAME"',
    ):
        assert part in cmd
    assert ("EXPOSE", "9092 8900") in steps


@pytest.mark.parametrize("image,user", [("singleuser", "jovyan"), ("site", "flip"), ("coordinator", "flip")])
def test_image_does_not_run_as_root(image: str, user: str) -> None:
    steps = _instructions(DEPLOY / f"{image}.Dockerfile")
    users = [args for kind, args in steps if kind == "USER"]
    assert users and users[-1] == user, f"{image}: the last USER must be {user}, not root"
    created = " ".join(args for kind, args in steps if kind == "RUN")
    assert re.search(rf"useradd [^&]*--uid 1000 [^&]*\b{user}\b", created)


def test_site_image_starts_the_joined_agent_from_its_volume() -> None:
    steps = _instructions(DEPLOY / "site.Dockerfile")
    assert ("VOLUME", "/site") in steps
    assert steps[-1] == ("CMD", '["flip-site", "start", "/site"]')
    assert not [args for kind, args in steps if kind == "EXPOSE"]


def test_the_nginx_fleet_front_example_is_what_flip_serve_renders() -> None:
    """deploy/nginx-fleet-front.conf is the renderer's output for the example addresses (no drift), and it
    serves only the fleet API (POST), the site routes and /health, with the Python front's sentence."""
    from coordinator.fleet_front import FORBIDDEN
    from coordinator.nginx_front import NginxFront

    shipped = (DEPLOY / "nginx-fleet-front.conf").read_text()
    rendered = NginxFront(
        listen="0.0.0.0:9092",
        superlink="127.0.0.1:9091",
        coordinator="127.0.0.1:8900",
        certfile="/var/lib/flip/pki/superlink.pem",
        keyfile="/var/lib/flip/pki/superlink.key",
        superlink_ca="/var/lib/flip/pki/ca.pem",
        state="/var/lib/flip/nginx",
        payloads="/var/lib/flip/coordinator/blobs",
    ).render()
    assert shipped.split("\n", 2)[2] == rendered  # after its two lines of explanation
    locations = re.findall(r"location ([^{]+)\{", rendered)
    assert [loc.strip() for loc in locations] == [
        "= /health",
        "/v1/fleet/",
        "= /site/announce",
        "/site/blobs/",
        "/site/",
        "/_flip_payloads/",
        "/",
        "@forbidden",
    ]
    assert re.search(r"location /_flip_payloads/ \{\s*internal;", rendered)  # never reached from outside
    assert "limit_except POST" in rendered and "proxy_request_buffering off" in rendered
    assert FORBIDDEN.strip() in rendered
