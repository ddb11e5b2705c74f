"""Contract with the Flower SuperNode internals the site agent's fleet client uses (``site_agent/fleet.py``).

If flwr changes underneath, these fail loudly: the shape of the fleet connection, the object
transfer helpers, and (against a real ``flower-superlink``) that a FLIP site registers as a
node and finds no message waiting.
"""

from __future__ import annotations

import inspect
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.hubside import flower_env
from flip_core.util import free_port, wait_until
from site_agent import fleet


def test_fleet_connection_yields_the_eight_calls_flip_unpacks() -> None:
    from flwr.supernode import fleet_http_connection

    source = inspect.getsource(fleet_http_connection.http_request_response)
    assert (
        """yield (
                node.node_id,
                receive,
                send,
                get_run,
                get_fab,
                pull_object,
                push_object,
                confirm_message_received,
            )"""
        in source
    )
    params = list(inspect.signature(fleet_http_connection.http_request_response).parameters)
    assert params[:4] == ["server_address", "insecure", "root_certificates", "authentication_keys"]


def test_what_fleet_py_overrides_is_still_where_flower_reads_it() -> None:
    """fleet.py replaces flwr_exit (Flower ends a refused SuperNode's process; a site agent says why and may retry)
    and the heartbeat interval (so that a crashed site's key may rejoin within 20 s) in Flower's modules."""
    from flwr.common import constant
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    source = inspect.getsource(fleet_http_connection.http_request_response)
    assert "if not connection_initialized:" in source and "flwr_exit(" in source
    assert source.count("heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL") == 2  # activation and each heartbeat
    assert "HEARTBEAT_DEFAULT_INTERVAL - HEARTBEAT_CALL_TIMEOUT" in inspect.getsource(heartbeat.HeartbeatSender._run)
    assert constant.HEARTBEAT_MIN_INTERVAL <= fleet.HEARTBEAT_SECONDS and constant.HEARTBEAT_PATIENCE == 2
    assert fleet_http_connection.flwr_exit is fleet._refused
    assert heartbeat.HEARTBEAT_DEFAULT_INTERVAL == fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == 10.0
    with pytest.raises(fleet.FleetRefused) as refused:
        fleet_http_connection.flwr_exit(
            305, "Failed to initialize the connection to the SuperLink.\n[code: 2004] Failed to activate SuperNode."
        )
    assert refused.value.still_online


def test_object_helpers_keep_their_signatures() -> None:
    from flwr.supercore.inflatable import inflatable_utils

    assert {"initial_backoff", "backoff_cap", "max_time"} <= set(
        inspect.signature(inflatable_utils.pull_objects).parameters
    )
    assert list(inspect.signature(inflatable_utils.inflate_object_from_contents).parameters)[:2] == [
        "object_id",
        "object_contents",
    ]
    assert list(inspect.signature(inflatable_utils.push_object_contents_from_iterable).parameters)[:2] == [
        "object_contents",
        "push_object_fn",
    ]


def test_a_reply_keeps_the_id_flip_pins_before_sending() -> None:
    from flwr.app import ConfigRecord, Message, Metadata, RecordDict
    from flwr.app.message import make_message
    from flwr.supercore.inflatable.inflatable_object import get_object_tree, no_object_id_recompute

    # a message as the fleet API hands it over: metadata from the SuperLink, content pulled after
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=1,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600,
        message_type="train",
    )
    request = make_message(metadata, RecordDict({"flip": ConfigRecord({"step": b"x"})}))
    request.metadata.__dict__["_message_id"] = request.object_id
    reply = Message(RecordDict({"flip": ConfigRecord({"step": b"y"})}), reply_to=request)
    with no_object_id_recompute():
        reply.metadata.__dict__["_message_id"] = reply.object_id
        tree = get_object_tree(reply)
    assert tree.object_id == reply.metadata.message_id
    assert reply.metadata.reply_to_message_id == request.metadata.message_id
    assert len(tree.children) == 1 and len(tree.children[0].children) == 1  # message, content, one record


@pytest.fixture
def superlink(tmp_path: Path):
    port = free_port()
    log = tmp_path / "superlink.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
                "--database",
                ":flwr-in-memory:",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=flower_env(tmp_path / "flwr"),
        )
    try:
        yield f"127.0.0.1:{port}", process, log
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_a_site_registers_with_a_real_superlink_and_finds_no_message(superlink) -> None:
    address, process, log = superlink
    host, port = address.rsplit(":", 1)

    def listening() -> bool:
        if process.poll() is not None:
            return True
        with socket.socket() as sock:
            return sock.connect_ex((host, int(port))) == 0

    assert wait_until(listening, 60, 0.1) and process.poll() is None, log.read_text()
    with fleet.connect(address) as link:
        assert link.node_id > 0
        assert link.receive() is None
