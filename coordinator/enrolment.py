"""A site joins the federation: its public key registered with the SuperLink (so its node may
connect) and a token of its own in the coordinator's register (so its agent may speak for it).

``flip site register`` calls :func:`register_site` on the hub side of a running federation
(``flip serve`` or ``flip up``); ``flip up`` calls :func:`register_key` for each local site.
"""

from __future__ import annotations

from pathlib import Path

from coordinator.config import CoordinatorConfig
from coordinator.flower_control import FlowerControl
from coordinator.registry import RegistryError, SiteRegistry
from flip_core.certs import fingerprint, public_key_bytes


def register_key(control: FlowerControl, registry: SiteRegistry, name: str, public: Path, replace: bool = False) -> str:
    """Register a site's public key with the SuperLink and give it a coordinator token (returned)."""
    old = {s.name: s for s in registry.sites()}.get(name)
    if old is not None and not replace:
        raise RegistryError(
            f"site {name!r} is already registered (node {old.node_id}); --replace gives it a new key and token"
        )
    node_id = control.register_node(public_key_bytes(public), name)
    if old is not None:
        control.unregister_node(old.node_id)  # its old key no longer joins
    return registry.register(name, node_id, fingerprint(public), replace=replace)


def register_site(name: str, public: Path, config_path: Path, *, replace: bool = False) -> tuple[int, str]:
    """``flip site register``: the site's Flower node id and its coordinator token."""
    if not config_path.exists():
        raise RegistryError(f"no coordinator config at {config_path} (give --config)")
    config = CoordinatorConfig.load(config_path)
    if not config.superlink_ca:
        raise RegistryError("this federation runs --insecure: its SuperLink takes any node, nothing to register")
    registry = SiteRegistry(config.registry_path)
    control = FlowerControl(config.superlink_control, Path(config.superlink_ca))
    try:
        if not control.ready():
            raise RegistryError(
                f"the SuperLink's control API at {config.superlink_control} does not answer: "
                "is the hub side running (flip up, flip serve)?"
            )
        token = register_key(control, registry, name, public, replace)
    finally:
        control.close()
    return {s.name: s for s in registry.sites()}[name].node_id, token
