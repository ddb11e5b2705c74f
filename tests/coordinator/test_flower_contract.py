"""Contract with the Flower internals FLIP relies on. If flwr changes underneath, this fails loudly.

FLIP leans on: the control HTTP client and FAB builder that ``flwr run`` uses
(``coordinator/flower_control.py``) and the message/record API used by the ServerApp. The
site side's reliance (the fleet connection) is pinned in ``tests/site_agent/test_fleet_contract.py``.
"""

from __future__ import annotations

import inspect
import zipfile
from importlib import metadata
from io import BytesIO

from coordinator.flower_control import RUN_ID_KEY, build_fab


def test_flower_is_the_pinned_version() -> None:
    assert metadata.version("flwr") == "1.42.0"


def test_fab_builds_with_flips_two_components() -> None:
    fab = build_fab()
    names = zipfile.ZipFile(BytesIO(fab.content)).namelist()
    assert {"flip_task/server.py", "flip_task/client.py", "pyproject.toml"} <= set(names)
    assert len(fab.hash_str) == 64
    pyproject = zipfile.ZipFile(BytesIO(fab.content)).read("pyproject.toml").decode()
    assert f'{RUN_ID_KEY} = ""' in pyproject


def test_control_client_and_requests_have_the_fields_flip_uses() -> None:
    from flwr.common.config import parse_config_args
    from flwr.common.serde import user_config_to_proto
    from flwr.proto.control_pb2 import (
        ListRunsRequest,
        RegisterNodeRequest,
        StartRunRequest,
        StopRunRequest,
        StreamLogsRequest,
        UnregisterNodeRequest,
    )
    from flwr.supercore.control import ControlHttpClient

    assert {"public_key", "name"} <= set(RegisterNodeRequest.DESCRIPTOR.fields_by_name)  # flip site register
    assert "node_id" in UnregisterNodeRequest.DESCRIPTOR.fields_by_name
    for method in ("StartRun", "StopRun", "ListRuns", "StreamLogs", "RegisterNode", "UnregisterNode"):
        assert callable(getattr(ControlHttpClient, method))
    assert list(inspect.signature(ControlHttpClient.from_server_address).parameters)[:3] == [
        "server_address",
        "insecure",
        "root_certificates",
    ]
    assert {"fab", "override_config"} <= set(StartRunRequest.DESCRIPTOR.fields_by_name)
    assert "run_id" in ListRunsRequest.DESCRIPTOR.fields_by_name
    assert "run_id" in StopRunRequest.DESCRIPTOR.fields_by_name
    assert {"run_id", "after_timestamp"} <= set(StreamLogsRequest.DESCRIPTOR.fields_by_name)
    overrides = user_config_to_proto(parse_config_args([f'{RUN_ID_KEY}="abc"']))
    assert overrides[RUN_ID_KEY].string == "abc"


def test_message_api_used_by_the_server_loop() -> None:
    from flwr.app import Message, RecordDict
    from flwr.serverapp import Grid

    for method in ("push_messages", "pull_messages", "get_node_ids"):
        assert callable(getattr(Grid, method))
    from typing import get_overloads

    shapes = [set(inspect.signature(o).parameters) for o in get_overloads(Message.__init__)]
    assert {"content", "dst_node_id", "message_type", "group_id"} in [
        s & {"content", "dst_node_id", "message_type", "group_id"} for s in shapes
    ]
    assert {"content", "reply_to"} in [s & {"content", "reply_to"} for s in shapes]
    assert RecordDict.__name__ == "RecordDict"


def test_the_grid_still_pulls_reply_objects_through_the_name_flip_patches() -> None:
    import flwr.superlink.grid.http_grid as http_grid
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    assert "pull_objects(" in inspect.getsource(http_grid.HttpGrid.pull_messages)
    assert http_grid.pull_objects is pull_objects  # no test leaves it patched
    params = inspect.signature(pull_objects).parameters
    assert {"max_time", "initial_backoff", "backoff_cap"} <= set(params)


def test_tuned_pulls_give_up_when_told_a_site_is_gone_and_flowers_own_pull_is_back_after() -> None:
    import flwr.superlink.grid.http_grid as http_grid
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError

    from coordinator import flower_tuning

    def never_there(object_id: str) -> bytes:
        raise ObjectUnavailableError(object_id)

    flowers = http_grid.pull_objects
    with flower_tuning.tuned_grid_pulls(lambda: True):
        assert http_grid.pull_objects is flower_tuning._pull_objects
        try:
            http_grid.pull_objects(["abc"], never_there)
        except ObjectPullError:
            pass
        else:
            raise AssertionError("the pull did not give up")
    assert http_grid.pull_objects is flowers


def test_the_query_line_sends_flowers_own_query_message_type() -> None:
    from flwr.app import MessageType
    from flwr.app.metadata import validate_message_type

    from flip_core.query import MESSAGE_TYPE_QUERY

    assert MessageType.QUERY == MESSAGE_TYPE_QUERY
    assert validate_message_type(MESSAGE_TYPE_QUERY)
