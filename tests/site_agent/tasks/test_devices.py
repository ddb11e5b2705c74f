"""The site's device choice (``flip-site start --device``), resolved without torch."""

from __future__ import annotations

from pathlib import Path

import pytest

from site_agent.tasks.devices import DeviceError, device_nodes, gpu_count, resolve


def test_auto_takes_the_first_gpu_when_the_driver_reports_one_else_the_cpu() -> None:
    assert resolve("auto", gpus=0) == "cpu"
    assert resolve("auto", gpus=2) == "cuda:0"
    assert resolve("cpu", gpus=2) == "cpu"
    assert resolve("cuda", gpus=1) == "cuda:0" and resolve("cuda:1", gpus=2) == "cuda:1"


def test_a_device_the_host_lacks_or_a_wrong_name_is_refused_in_a_sentence() -> None:
    with pytest.raises(DeviceError, match="'cuda:1' is not on this host \\(it has 1 GPU"):
        resolve("cuda:1", gpus=1)
    with pytest.raises(DeviceError, match="no GPU the NVIDIA driver reports"):
        resolve("cuda", gpus=0)
    with pytest.raises(DeviceError, match="unknown device 'gpu': use auto, cpu, cuda or cuda:N"):
        resolve("gpu", gpus=1)


def test_gpus_are_counted_from_the_drivers_folder(tmp_path: Path) -> None:
    assert gpu_count(tmp_path / "absent") == 0
    for bus in ("0000:01:00.0", "0000:02:00.0"):
        (tmp_path / bus).mkdir()
    assert gpu_count(tmp_path) == 2


def test_a_cpu_task_gets_no_device_node() -> None:
    assert device_nodes("cpu") == ()
