"""The "FLIP (Python 3)" kernel: installed by `flip kernel install`, its kernels start with the magics loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import start_new_kernel


def test_an_installed_flip_kernel_starts_with_the_magics_loaded(tmp_path: Path, monkeypatch) -> None:
    done = subprocess.run(
        [Path(sys.executable).parent / "flip", "kernel", "install", "--prefix", tmp_path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    spec_dir = tmp_path / "share" / "jupyter" / "kernels" / "flip"
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["display_name"] == "FLIP (Python 3)"
    assert Path(spec["argv"][0]).resolve() == Path(sys.executable).resolve()  # this environment's Python

    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))  # where Jupyter looks first
    monkeypatch.setenv("FLIP_HOME", str(tmp_path / "nowhere"))
    assert KernelSpecManager().get_kernel_spec("flip").display_name == "FLIP (Python 3)"
    kernel, client = start_new_kernel(kernel_name="flip")
    try:
        outputs: list[str] = []
        client.execute_interactive(
            "ip = get_ipython()\n"
            "print('flip_magics' in ip.extension_manager.loaded, 'flip_train' in ip.magics_manager.magics['cell'])\n"
            "ip.run_line_magic('flip_sites', '')",
            timeout=60,
            output_hook=lambda msg: outputs.append(
                str(msg["content"].get("text", "")) + str(msg["content"].get("evalue", ""))
            ),
        )
        said = "".join(outputs)
        assert "True True" in said, said
        assert "flip up" in said  # no federation here: the magic says how to get one, in a sentence
    finally:
        client.stop_channels()
        kernel.shutdown_kernel(now=True)
