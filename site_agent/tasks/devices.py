"""The site's compute device: the site admin chooses (``flip-site start --device``), the task obeys.

``auto`` takes the first GPU when the host has an NVIDIA driver with a GPU, else the CPU; ``cpu`` and
``cuda`` / ``cuda:N`` are taken as said. The agent resolves the choice once, without torch (it never
loads torch), announces it, and hands it to its task processes (``FLIP_TASK_DEVICE``); a task process
checks it against torch before its first step, and a cell reads it from ``config["device"]``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from flip_core.errors import ConfigError

ENV_DEVICE = "FLIP_TASK_DEVICE"  # FLIP_TASK_*: the agent's environment a task process gets
CHOICES = "auto, cpu, cuda or cuda:N"
_CUDA = re.compile(r"^cuda(:(\d{1,2}))?\Z")
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one folder per GPU the driver sees
# what a task process on a GPU needs of the host's /dev, bound into its sandbox
NVIDIA_CONTROL = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")


class DeviceError(ConfigError):
    """A device the site cannot use, stated as a sentence."""


def gpu_count(gpus: Path = NVIDIA_GPUS) -> int:
    try:
        return sum(1 for _ in gpus.iterdir())
    except OSError:
        return 0


def resolve(choice: str, gpus: int | None = None) -> str:
    """``choice`` as the device its tasks run on ("cpu", "cuda:N"); DeviceError for one this host lacks."""
    count = gpu_count() if gpus is None else gpus
    if choice == "auto":
        return "cuda:0" if count else "cpu"
    if choice == "cpu":
        return "cpu"
    match = _CUDA.match(choice)
    if match is None:
        raise DeviceError(f"unknown device {choice!r}: use {CHOICES}")
    index = int(match.group(2) or 0)
    if index >= count:
        have = f"{count} GPU(s)" if count else "no GPU the NVIDIA driver reports"
        raise DeviceError(f"device {choice!r} is not on this host (it has {have}): use --device cpu or auto")
    return f"cuda:{index}"


def device_nodes(device: str) -> tuple[str, ...]:
    """The /dev nodes a task on ``device`` needs in its sandbox: its GPU's and the driver's control nodes."""
    if not device.startswith("cuda"):
        return ()
    index = int(device.split(":")[1]) if ":" in device else 0
    nodes = (f"nvidia{index}", *NVIDIA_CONTROL)
    return tuple(f"/dev/{n}" for n in nodes if os.path.exists(f"/dev/{n}"))


def task_device() -> str:
    """The device this task process runs on, as the agent handed it over (the CPU when none was)."""
    return os.environ.get(ENV_DEVICE) or "cpu"


def check_with_torch(device: str) -> None:
    """In the task process, once torch is loaded: DeviceError when torch cannot use ``device``."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise DeviceError(f"the site's device {device} is not usable here (torch sees no CUDA device)")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise DeviceError(f"the site's device {device} is not usable here (torch sees {torch.cuda.device_count()})")
