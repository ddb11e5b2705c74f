"""A site's Flower node: one warm client of the SuperLink's fleet API.

This is the one site-side module that leans on Flower internals: the SuperNode's fleet
connection (``flwr.supernode.fleet_http_connection``: node registration, heartbeats, TLS and
node authentication, exactly as ``flower-supernode`` does them) and the transfer of a message's
content-addressed objects. It also replaces two things inside Flower's connection module: the
heartbeat interval (10 s, so that a crashed site's key may rejoin quickly) and ``flwr_exit`` (which
ends a SuperNode's whole process when the SuperLink refuses it; a site agent says why instead).
``tests/site_agent/test_fleet_contract.py`` fails loudly if any of them moves.

Why not ``flower-supernode`` itself: it polls the SuperLink every 3 s when idle and starts a
fresh ``flwr-clientapp`` process (importing Flower, then the app) for every message. The site
agent instead keeps this connection open for its lifetime, pulls when the coordinator rings
its doorbell (or on a slow idle poll), and hands each step to the run's warm task process.
The SuperLink sees an ordinary SuperNode: same routes, same objects, same authentication.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from flwr.app import Message, RecordDict
from flwr.supercore import heartbeat as flower_heartbeat
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    iterate_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import (
    inflate_object_from_contents,
    pull_objects,
    push_object_contents_from_iterable,
)
from flwr.supernode import fleet_http_connection
from flwr.supernode.fleet_http_connection import http_request_response

from flip_core.errors import FlipError

log = logging.getLogger(__name__)

# The SuperLink counts a node online until two heartbeat intervals after its last heartbeat, and will
# not let the same registered key in again before: a site agent that crashed (SIGKILL, power loss)
# could rejoin only after a minute at Flower's default of 30 s. 10 s is the least the SuperLink accepts.
HEARTBEAT_SECONDS = 10.0
# Flower's module constants (not exported; tests/site_agent/test_fleet_contract.py checks they are read)
fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_SECONDS  # type: ignore[attr-defined,assignment]
flower_heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_SECONDS  # type: ignore[attr-defined,assignment]
STILL_ONLINE_CODE = 2004  # FLEET_NODE_ACTIVATION_FAILED: the key's node still counts online, or is not registered


class FleetRefused(FlipError):
    """The SuperLink would not let this node in; the message is Flower's reason."""

    @property
    def still_online(self) -> bool:
        """Refused activation: this key's previous session may still count online (a crashed agent's, which
        ``release_session`` ends) — or the key is not registered there (Flower answers both alike)."""
        return f"[code: {STILL_ONLINE_CODE}]" in str(self)


def _refused(code: int, message: str | None = None, *args: Any, **kwargs: Any) -> None:
    # Flower's SuperNode ends the whole process here (flwr_exit, and os._exit 5 s later); a site agent says why
    raise FleetRefused(message or f"exit code {code}")


fleet_http_connection.flwr_exit = _refused  # type: ignore[attr-defined,assignment]  # http_request_response's own reference

# A message is visible before the hub has finished uploading its objects; Flower's default
# backoff then sleeps a whole second (PULL_INITIAL_BACKOFF). Retry quickly instead.
PULL_INITIAL_BACKOFF = 0.02
PULL_BACKOFF_CAP = 0.5
PULL_MAX_SECONDS = 600.0


@dataclass
class FleetConnection:
    """An open fleet session: this node's id and the calls a SuperNode makes."""

    node_id: int
    _receive: Callable[[], Any]
    _send: Callable[[Message, Any, float], tuple[set[str], str]]
    _pull_object: Callable[[int, str], bytes]
    _push_object: Callable[[int, str, str, bytes], None]
    _confirm: Callable[[int, str], None]

    def receive(self) -> Message | None:
        """The next message for this node with its content, or None when there is none."""
        got = self._receive()
        if got is None:
            return None
        message: Message = got[0]
        tree = got[1]
        run_id = message.metadata.run_id
        content_trees = list(tree.children)
        # The message object itself too, though its metadata came with the pull: confirming deletes
        # the message at the SuperLink, and it must not be deleted before the hub has finished
        # uploading it (the hub pushes a message's objects after making the message visible).
        ids = [t.object_id for t in iterate_object_tree(tree)]
        contents = pull_objects(
            ids,
            partial(self._pull_object, run_id),
            initial_backoff=PULL_INITIAL_BACKOFF,
            backoff_cap=PULL_BACKOFF_CAP,
            max_time=PULL_MAX_SECONDS,
        )
        self._confirm(run_id, message.metadata.message_id)
        if content_trees:
            # the content tree's root is a RecordDict (Flower types the inflated object as its base class)
            message.content = inflate_object_from_contents(content_trees[0].object_id, contents)  # type: ignore[assignment]
        return message

    def reply(self, message: Message, content: RecordDict, seconds: float) -> None:
        """Send ``content`` as the reply to ``message``; push only the objects the SuperLink lacks."""
        reply = Message(content, reply_to=message)
        run_id = message.metadata.run_id
        with no_object_id_recompute():
            reply.metadata.__dict__["_message_id"] = reply.object_id
            objects = get_all_nested_objects(reply)
            wanted, session = self._send(reply, get_object_tree(reply), seconds)
            push_object_contents_from_iterable(
                ((oid, obj.deflate()) for oid, obj in objects.items() if oid in wanted),
                partial(self._push_object, run_id, session),
            )


def release_session(address: str, *, root_certificates: bytes | str, authentication_keys: Any, node_id: int) -> None:
    """Tell the SuperLink that this key's node ``node_id`` is offline: the session of an agent that crashed,
    which the SuperLink would otherwise count online (refusing the key) for up to two heartbeat intervals.
    Signed with the node's own key: the SuperLink accepts it only for the node that key registered."""
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    private_key, public_key = authentication_keys
    interceptors: list[Any] = [
        RuntimeVersionHttpInterceptor(component_name="SuperNode"),
        NodeAuthHttpInterceptor(private_key, public_key),
    ]
    with FleetHttpClient.from_server_address(address, False, root_certificates, interceptors=interceptors) as client:
        client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))


@contextmanager
def connect(
    address: str, *, root_certificates: bytes | str | None = None, authentication_keys: Any = None
) -> Iterator[FleetConnection]:
    """Register this node with the SuperLink at ``address`` and keep it registered while open.

    Without ``root_certificates`` the connection is plain HTTP (a local federation); with them
    it is TLS, and ``authentication_keys`` (an ECDSA key pair registered by the hub operator)
    authenticate the node.
    """
    insecure = root_certificates is None
    with http_request_response(address, insecure, root_certificates, authentication_keys) as conn:
        node_id, receive, send, _get_run, _get_fab, pull_object, push_object, confirm = conn
        yield FleetConnection(int(node_id), receive, send, pull_object, push_object, confirm)
