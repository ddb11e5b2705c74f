"""hub_config's two profiles, built into real JupyterHub, DockerSpawner and OAuthenticator objects
(they talk to Docker or the identity provider only when they start, so no engine is needed here)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from traitlets.config import Config

from hub_config.profiles import (
    COORDINATOR_SCOPES,
    LAB_OFFLINE,
    SERVER_TOKEN_SCOPES,
    HubConfigError,
    configure,
)

PRODUCTION = {
    "FLIP_HUB_PROFILE": "production",
    "FLIP_HUB_TLS_CERT": "/srv/flip/tls/cert.pem",
    "FLIP_HUB_TLS_KEY": "/srv/flip/tls/key.pem",
    "FLIP_SINGLEUSER_IMAGE": "flip-singleuser:0.1.0",
    "FLIP_COORDINATOR_SERVICE_URL": "http://coordinator:8900",
    "FLIP_COORDINATOR_HUB_TOKEN": "s" * 64,
    "FLIP_OIDC_AUTHORIZE_URL": "https://idp.example/auth",
    "FLIP_OIDC_TOKEN_URL": "https://idp.example/token",
    "FLIP_OIDC_USERDATA_URL": "https://idp.example/userinfo",
    "FLIP_HUB_ALLOWED_GROUPS": "project-heart,project-breast",
}


def local_settings(tmp_path: Path) -> dict[str, Any]:
    settings = {
        "state": str(tmp_path / "hub"),
        "port": 18000,
        "hub_port": 18001,
        "proxy_api_port": 18002,
        "coordinator": {
            "url": "http://127.0.0.1:18003",
            "command": ["python", "-m", "coordinator"],
            "environment": {"FLWR_HOME": "/x"},
        },
        "users": ["alice", "bob"],
        "groups": {"project-heart": ["alice"]},
        "password": "pw",
        "notebooks": str(tmp_path / "notebooks"),
        "environment": {"FLIP_DATA_DIR": "/data"},
    }
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    return settings


def test_local_profile_runs_the_coordinator_as_a_managed_service_with_exactly_its_scopes(tmp_path: Path) -> None:
    local_settings(tmp_path)
    c = Config()
    assert configure(c, {"FLIP_HUB_PROFILE": "local", "FLIP_HUB_SETTINGS": str(tmp_path / "settings.json")}) == "local"
    assert c.JupyterHub.ip == "127.0.0.1" and c.JupyterHub.port == 18000 and c.JupyterHub.hub_port == 18001
    assert c.ConfigurableHTTPProxy.api_url == "http://127.0.0.1:18002"
    [service] = c.JupyterHub.services
    assert service["name"] == "coordinator" and service["command"] == ["python", "-m", "coordinator"]
    assert service["url"] == "http://127.0.0.1:18003"
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    assert roles["flip-coordinator"]["services"] == ["coordinator"]
    assert (
        sorted(roles["flip-coordinator"]["scopes"])
        == sorted(COORDINATOR_SCOPES)
        == ["list:groups", "read:users:groups"]
    )
    assert "access:services!service=coordinator" in roles["user"]["scopes"] and "self" in roles["user"]["scopes"]
    assert c.Spawner.server_token_scopes == SERVER_TOKEN_SCOPES
    assert c.Spawner.environment == {"FLIP_API_URL": "http://127.0.0.1:18003", "FLIP_DATA_DIR": "/data"}
    assert c.Spawner.cmd == [str(Path(sys.executable).parent / "jupyterhub-singleuser")]
    assert ("--allow-root" in c.Spawner.args) == (os.geteuid() == 0)
    assert set(LAB_OFFLINE) <= set(c.Spawner.args)
    assert c.JupyterHub.load_groups == {"project-heart": {"users": ["alice"]}}
    assert c.Authenticator.allowed_users == {"alice", "bob"} and c.JupyterHub.authenticator_class == "dummy"


def test_local_profile_copies_the_notebooks_into_a_new_home_but_never_over_a_users_file(tmp_path: Path) -> None:
    settings = local_settings(tmp_path)
    notebooks = Path(settings["notebooks"])
    notebooks.mkdir()
    (notebooks / "01_quickstart_heart.ipynb").write_text("{}")
    c = Config()
    configure(c, {"FLIP_HUB_PROFILE": "local", "FLIP_HUB_SETTINGS": str(tmp_path / "settings.json")})
    spawner = SimpleNamespace(
        home_dir_template=c.SimpleLocalProcessSpawner.home_dir_template, user=SimpleNamespace(name="alice")
    )  # the attributes the hook reads
    c.Spawner.pre_spawn_hook(spawner)
    copied = tmp_path / "hub" / "home" / "alice" / "01_quickstart_heart.ipynb"
    assert copied.read_text() == "{}"
    copied.write_text('{"edited": true}')
    c.Spawner.pre_spawn_hook(spawner)
    assert copied.read_text() == '{"edited": true}'


def test_production_profile_builds_docker_spawner_and_oidc_login() -> None:
    from dockerspawner import DockerSpawner
    from oauthenticator.generic import GenericOAuthenticator

    c = Config()
    assert configure(c, PRODUCTION) == "production"
    assert (c.JupyterHub.ssl_cert, c.JupyterHub.ssl_key) == ("/srv/flip/tls/cert.pem", "/srv/flip/tls/key.pem")
    spawner = DockerSpawner(config=c, user=SimpleNamespace(name="alice", id=1, url="/user/alice/"))
    assert spawner.image == "flip-singleuser:0.1.0" and spawner.network_name == "flip-hub"
    assert spawner.volume_binds == {"flip-user-alice": {"bind": "/home/jovyan/work", "mode": "rw"}}
    assert spawner.environment == {"FLIP_API_URL": "http://coordinator:8900"}
    assert spawner.server_token_scopes == SERVER_TOKEN_SCOPES and spawner.remove is True
    assert spawner.args == LAB_OFFLINE
    login = GenericOAuthenticator(config=c)
    assert login.allowed_groups == {"project-heart", "project-breast"} and login.manage_groups is True
    assert login.auth_state_groups_key == "oauth_user.groups"
    services = {s["name"]: s for s in c.JupyterHub.services}
    assert services["coordinator"]["url"] == "http://coordinator:8900" and "command" not in services["coordinator"]
    assert services["idle-culler"]["command"][1:] == ["-m", "jupyterhub_idle_culler", "--timeout=3600"]
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    assert roles["idle-culler"]["scopes"] == ["list:users", "read:users:activity", "read:servers", "delete:servers"]


@pytest.mark.parametrize(
    "missing", ["FLIP_HUB_TLS_CERT", "FLIP_COORDINATOR_HUB_TOKEN", "FLIP_OIDC_TOKEN_URL", "FLIP_HUB_ALLOWED_GROUPS"]
)
def test_production_profile_names_a_missing_setting(missing: str) -> None:
    with pytest.raises(HubConfigError, match=rf"\${missing} is not set"):
        configure(Config(), {k: v for k, v in PRODUCTION.items() if k != missing})


def test_an_unknown_profile_is_refused() -> None:
    with pytest.raises(HubConfigError, match="must be 'local' or 'production'"):
        configure(Config(), {"FLIP_HUB_PROFILE": "staging"})


def test_entra_id_reads_groups_from_the_id_token() -> None:
    from oauthenticator.generic import GenericOAuthenticator

    c = Config()
    configure(c, {**PRODUCTION, "FLIP_OIDC_USERDATA_FROM_ID_TOKEN": "1"})
    login = GenericOAuthenticator(config=c)
    assert login.userdata_from_id_token is True and not login.userdata_url
