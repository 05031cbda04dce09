"""``sagaflow.__version__`` and ``sagaflow --version`` say the installed distribution's version."""

import importlib.metadata
import tomllib
from pathlib import Path

from click.testing import CliRunner

import sagaflow
from sagaflow.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_version_is_the_installed_distributions():
    assert sagaflow.__version__ == importlib.metadata.version("sagaflow")
    # pip install -e . read it from pyproject.toml: the one place it is written
    assert sagaflow.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_cli_version_option_prints_name_and_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"sagaflow {sagaflow.__version__}\n"
