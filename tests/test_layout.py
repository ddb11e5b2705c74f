"""The house's shape: short functions and files in the product packages, the kernel spec in one place,
typed packages."""

from __future__ import annotations

import ast
import json
import tomllib

from flip_magics.kernelspec import kernel_spec, spec_file

from helpers import REPO

PRODUCT = ("flip_core", "flip_magics", "site_agent", "coordinator", "flip_local", "hub_config")
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500


def _sources() -> list:
    return sorted(p for package in PRODUCT for p in (REPO / package).rglob("*.py"))


def test_no_product_function_is_longer_than_80_lines() -> None:
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_no_product_file_is_longer_than_500_lines() -> None:
    long = [
        f"{p.relative_to(REPO)} ({n} lines)"
        for p in _sources()
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    ]
    assert long == []


def test_the_kernel_spec_is_the_one_file_in_kernels() -> None:
    shipped = REPO / "kernels" / "flip" / "kernel.json"
    assert spec_file() == shipped
    spec = json.loads(shipped.read_text())
    assert spec["argv"][1:] == ["-m", "ipykernel_launcher", "-f", "{connection_file}", "--ext=flip_magics"]
    assert kernel_spec("/opt/python")["argv"] == ["/opt/python", *spec["argv"][1:]]
    data_files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    assert data_files == {"share/jupyter/kernels/flip": ["kernels/flip/kernel.json"]}  # the wheel ships the same file


def test_every_product_package_is_typed() -> None:
    assert [p for p in PRODUCT if p != "hub_config" and not (REPO / p / "py.typed").exists()] == []
