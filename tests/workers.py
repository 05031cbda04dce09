"""Start and stop real `sagaflow worker` subprocesses (prefork pool) for the integration tests and the
soak. Never eager mode: it hides exactly the errback and chain behaviour under test (celery-facts.md, 8)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from sagaflow.config.settings import Settings
from tests.conftest import ARTIFACTS, ROOT


def start_worker(settings: Settings, name: str, concurrency: int = 4, log_name: str = "worker.log",
                 args: tuple[str, ...] = (), env: dict | None = None, app=None) -> subprocess.Popen:
    """Start a worker and wait until it answers a ping. ``args`` go to `sagaflow worker` (-Q, --beat...);
    ``env`` overrides settings; ``app`` is the Celery app to ping with (default: this process's)."""
    from sagaflow.app import celery_app

    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / log_name, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sagaflow", "worker", "-P", "prefork", "-c", str(concurrency), "-n", f"{name}@%h",
         *args],
        env={**os.environ, **settings.as_env(), **(env or {})}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stop_worker reaps pool children and beat with it
    )
    deadline = time.monotonic() + 60
    while not (app or celery_app).control.ping(destination=[f"{name}@{os.uname().nodename}"], timeout=0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"worker {name} did not start; see {ARTIFACTS / log_name}")
    return proc


def stop_worker(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Warm shutdown; then kill whatever is left of its process group (pool children and the embedded beat
    outlive a main process that was SIGKILLed)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
