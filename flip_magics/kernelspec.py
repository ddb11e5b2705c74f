"""The "FLIP (Python 3)" Jupyter kernel: an IPython kernel of this environment with FLIP's magics loaded.

Its spec is one file, ``kernels/flip/kernel.json`` at the top of the checkout; the wheel installs
the same file as ``share/jupyter/kernels/flip`` (the single-user image gets it that way), where
Jupyter runs ``python`` as the server's own interpreter. ``flip kernel install`` writes it where
Jupyter looks (``--sys-prefix``, the default: this environment's ``share/jupyter/kernels/flip``;
``--user``; or ``--prefix DIR``) with this environment's interpreter in place of ``python``, so its
kernels import the FLIP that installed them from any Jupyter.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

KERNEL_NAME = "flip"
DISPLAY_NAME = "FLIP (Python 3)"
_CHECKOUT_SPEC = Path(__file__).resolve().parents[1] / "kernels" / KERNEL_NAME / "kernel.json"
_INSTALLED_SPEC = Path(sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME / "kernel.json"


def spec_file() -> Path:
    """The kernel spec FLIP ships: the checkout's (a development install), else the one the wheel installed."""
    return _CHECKOUT_SPEC if _CHECKOUT_SPEC.is_file() else _INSTALLED_SPEC


def kernel_spec(python: str = sys.executable) -> dict[str, Any]:
    """The shipped spec, its kernels run by ``python``."""
    spec: dict[str, Any] = json.loads(spec_file().read_text())
    spec["argv"] = [python, *spec["argv"][1:]]
    return spec


def install(*, user: bool = False, prefix: str | None = None) -> Path:
    """Install the kernel spec (this environment's prefix unless ``user`` or ``prefix``); where it went."""
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernel.json").write_text(json.dumps(kernel_spec(), indent=1))
        where = KernelSpecManager().install_kernel_spec(
            tmp, KERNEL_NAME, user=user, prefix=prefix if (prefix or user) else sys.prefix
        )
    return Path(where)
