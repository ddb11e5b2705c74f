"""The "FLIP (Python 3)" Jupyter kernel: an IPython kernel of this environment with FLIP's magics loaded.

``flip kernel install`` writes its spec where Jupyter looks (``--sys-prefix``, the default: this
environment's ``share/jupyter/kernels/flip``; ``--user``; or ``--prefix DIR``). Its kernels run
this environment's Python, so they import the FLIP that installed them, and they find the
coordinator as any notebook here does (the local federation's connection file, or
``%flip_connect URL --token T``).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

KERNEL_NAME = "flip"
DISPLAY_NAME = "FLIP (Python 3)"


def kernel_spec(python: str = sys.executable) -> dict:
    return {
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}", "--ext=flip_magics"],
        "display_name": DISPLAY_NAME,
        "language": "python",
        "metadata": {"debugger": True},
    }


def install(*, user: bool = False, prefix: str | None = None) -> Path:
    """Install the kernel spec (this environment's prefix unless ``user`` or ``prefix``); where it went."""
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernel.json").write_text(json.dumps(kernel_spec(), indent=1))
        where = KernelSpecManager().install_kernel_spec(
            tmp, KERNEL_NAME, user=user, prefix=prefix if (prefix or user) else sys.prefix)
    return Path(where)
