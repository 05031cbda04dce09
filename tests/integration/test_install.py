"""sagaflow as a user gets it: a wheel built from this repository, installed into a fresh virtualenv, used
from an ordinary project folder that has its own config.py, config/ package, tasks.py and web.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

USER_FILES = {  # config.py and config/ both: Python takes the package, as in the user's own project
    "config.py": "SECRET = 'a module the package hides'\n",
    "config/__init__.py": "SECRET = 'the users own config package'\n",
    "config/celeryconfig.py": "broker_url = 'memory://'\n",
    "tasks.py": "def add(x, y):\n    return x + y\n",
    "web.py": "app = 'the users own web module'\n",
}


def _run(args, cwd, env=None, timeout=600):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin folder, project folder): the wheel installed non-editable into a new venv."""
    base = tmp_path_factory.mktemp("install")
    dist = base / "dist"
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "test-artifacts", ".sagaflow",
                                                                  "build", "*.egg-info", "__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(source)], cwd=base)
    (wheel,) = dist.glob("sagaflow-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        top_level = next(n for n in zf.namelist() if n.endswith(".dist-info/top_level.txt"))
        assert zf.read(top_level).decode().split() == ["sagaflow"]
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=base)
    # The core and the embedded broker the demo uses (issue 13: Flask, Flower, psycopg2 are extras).
    _run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(ROOT / "constraints.txt"), f"{wheel}[embedded]"],
         cwd=base)
    project = base / "project"
    for name, text in USER_FILES.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    return venv / "bin", project


def _env(project):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGAFLOW_", "PYTHON"))}
    return {**env, "SAGAFLOW_HOME": str(project / ".sagaflow")}


def test_imports_from_a_folder_with_its_own_config_tasks_and_web(installed):
    bin_, project = installed
    out = _run([str(bin_ / "python"), "-c",
                "import sagaflow; from sagaflow import SagaClient, Saga; import config, tasks, web; "
                "print(sagaflow.__file__); print(config.SECRET, tasks.add(1, 2), web.app)"],
               cwd=project, env=_env(project))
    first, second = out.splitlines()
    assert "site-packages" in first and str(ROOT) not in first
    assert second == "the users own config package 3 the users own web module"


def test_web_help_and_demo_work_from_that_folder(installed):
    bin_, project = installed
    assert "--host" in _run([str(bin_ / "sagaflow"), "web", "--help"], cwd=project, env=_env(project))
    out = _run([str(bin_ / "sagaflow"), "demo"], cwd=project, env=_env(project), timeout=300)
    assert "create_booking" in out and "compensated" in out
