"""Test doubles, every one named as a fake, one module per role (``from fakes import ...``).

Fakes stand in for a part in unit tests of pure logic; integration tests use the real parts.

- ``fakes.flower``: Flower's control API and Grid, as the coordinator and its server loop use them
- ``fakes.hub``: the coordinator as its parts see it (hub link, payload store and client, hub identity)
- ``fakes.upstreams``: the fleet front's upstreams (a SuperLink and a coordinator), as ASGI apps
- ``fakes.site``: what a site agent reads, without the files (an image loader), and a task process, without one
- ``fakes.notebook``: FlipClient as the magics and the ``flip`` commands call it, and an HTML widget
"""

from fakes.flower import GRID_NODES, FakeControl, FakeFlowerStatus, FakeGrid
from fakes.hub import FakeBulkStore, FakeFlakyBulk, FakeHub, FakeHubIdentity
from fakes.notebook import (
    FAKE_COX_ANSWER,
    FAKE_KM_ANSWER,
    FakeAirlockClient,
    FakeDisplay,
    FakeFailedRun,
    FakeHTMLWidget,
    FakeQueryClient,
    FakeRecordClient,
    FakeResponse,
    FakeRunConnection,
    FakeSurvivalConnection,
    FakeTrainClient,
    fake_cox_answer,
    fake_km_answer,
)
from fakes.site import FakeTaskProcess, FakeZygote, fake_images
from fakes.upstreams import FakeCoordinator, FakeSuperLink

__all__ = [
    "FAKE_COX_ANSWER",
    "FAKE_KM_ANSWER",
    "GRID_NODES",
    "FakeAirlockClient",
    "FakeBulkStore",
    "FakeControl",
    "FakeDisplay",
    "FakeFailedRun",
    "FakeCoordinator",
    "FakeFlakyBulk",
    "FakeFlowerStatus",
    "FakeGrid",
    "FakeHTMLWidget",
    "FakeHub",
    "FakeHubIdentity",
    "FakeQueryClient",
    "FakeRecordClient",
    "FakeResponse",
    "FakeRunConnection",
    "FakeSuperLink",
    "FakeSurvivalConnection",
    "FakeTaskProcess",
    "FakeZygote",
    "FakeTrainClient",
    "fake_cox_answer",
    "fake_images",
    "fake_km_answer",
]
