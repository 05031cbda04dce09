"""The house's layout holds: one installed top-level name, no module reaching for the repository's top-level
folders by their bare names, and every module importable on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import ROOT

MAPPED = {"sagaflow.web": "web", "sagaflow.tasks": "tasks", "sagaflow.config": "config"}
SOURCE_FOLDERS = ("sagaflow", *MAPPED.values())


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _modules() -> list[str]:
    """Every importable module of the installed package, by its installed name."""
    names = []
    folders = {"sagaflow": ROOT / "sagaflow", **{pkg: ROOT / folder for pkg, folder in MAPPED.items()}}
    for package, folder in folders.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            if "migrations" in rel.parts or (package == "sagaflow" and rel.parts[0] in MAPPED.values()):
                continue
            if rel.name == "__main__":  # runs the command when imported: not a module to import
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            names.append(".".join([package, *parts]))
    return sorted(set(names))


def test_the_wheel_installs_every_package_under_sagaflow_and_maps_the_top_level_folders():
    setuptools = _pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"] == MAPPED
    packages = set(setuptools["packages"])
    assert all(p == "sagaflow" or p.startswith("sagaflow.") for p in packages)
    on_disk = {".".join(("sagaflow", *p.parent.relative_to(ROOT / "sagaflow").parts)).rstrip(".")
               for p in (ROOT / "sagaflow").rglob("__init__.py")} | set(MAPPED)
    assert packages == on_disk, "pyproject.toml [tool.setuptools] packages must list every package folder"


def test_no_code_imports_the_top_level_folders_by_their_bare_names():
    offenders = []
    for folder in (*SOURCE_FOLDERS, "tests", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                              if n.split(".")[0] in MAPPED.values()]
    assert not offenders, "import these as sagaflow.<name>:\n" + "\n".join(offenders)


@pytest.mark.parametrize("module", _modules())
def test_every_module_imports_alone_in_a_fresh_interpreter(module, tmp_path):
    # From an empty folder, so nothing of the repository's top level is on sys.path.
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "SAGAFLOW_HOME": str(tmp_path / "home")}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
