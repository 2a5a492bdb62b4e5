"""The layout rules a maintainer relies on, checked on the source so that a change that breaks one fails here."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = [
    "activities",
    "api",
    "cli",
    "db",
    "pve",
    "reconcile",
    "workflows",
    "worker.py",
    "boxctl.py",
    "payloads.py",
    "payloads_life.py",
    "payloads_lab.py",
    "logs.py",
    "settings.py",
    "temporal_client.py",
]
MAX_LINES = 400


def python_files(*names: str) -> list[Path]:
    files: list[Path] = []
    for name in names:
        path = ROOT / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize("layer", ["api", "db", "pve", "reconcile"])
def test_layers_below_the_worker_import_nothing_from_activities(layer: str) -> None:
    offending = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] == "activities")
        for path in python_files(layer)
    }
    assert {file: mods for file, mods in offending.items() if mods} == {}


def test_pve_and_db_take_plain_arguments_not_temporal_payloads() -> None:
    """db/ and pve/ may share the seed's messages and failure kinds, never the workflow's payload types."""
    shared_words = {"Failure"}
    taken: dict[str, list[str]] = {}
    for path in python_files("db", "pve"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "payloads":
                names = [a.name for a in node.names if a.name not in shared_words and not a.name.startswith("MSG_")]
                if names:
                    taken[str(path.relative_to(ROOT))] = names
            elif isinstance(node, ast.Import | ast.ImportFrom) and "temporalio" in imported_modules_of(node):
                taken[str(path.relative_to(ROOT))] = ["temporalio"]
    assert taken == {}


def imported_modules_of(node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[0] for alias in node.names}
    return {(node.module or "").split(".")[0]}


def test_no_live_patches_at_the_baseline() -> None:
    """Version 1.0 has no `workflow.patched`: a patch belongs in the README's table of live patches."""
    patched = [str(p.relative_to(ROOT)) for p in python_files(*PRODUCT) if "workflow.patched(" in p.read_text()]
    assert patched == []


def test_no_product_module_holds_two_concerns_worth_of_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in python_files(*PRODUCT)
        if "migrations" not in p.parts and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_every_top_level_module_of_the_product_is_installed() -> None:
    """`pip install .` (the image's) installs the top-level modules pyproject.toml names: one left out there is
    missing from the image and from an installed `boxctl`, though it imports fine from the checkout."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    installed = set(config["tool"]["setuptools"]["py-modules"])
    top_level = {path.stem for path in ROOT.glob("*.py")}
    assert top_level - installed == set()
