"""The worker subprocesses: started, waited for until they answer a ping, measured (RSS) and stopped."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Callable

from bench.services import ROOT


class Worker:
    """A worker subprocess: `sagaflow worker` or `celery -A bench.plain worker`, prefork."""

    def __init__(self, label: str, argv: list[str], env: dict, log: Path, ping: Callable[[str], bool],
                 hostname: str) -> None:
        self.label, self.log, self.hostname = label, log, hostname
        self._ping = ping
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv + ["-n", hostname], env=env, cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT)
        node = hostname.replace("%h", os.uname().nodename)
        deadline = time.monotonic() + 90
        while not self._ping(node):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"bench: the {label} worker did not start; see {log}")
        self.rss_at_start = self.rss()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.pid:
                found.append(int(entry))
        return sorted(found)

    def rss(self) -> dict[str, float]:
        """Resident memory in MB of the main process and of each pool child."""
        out = {}
        for pid in [self.pid, *self.children()]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            kb = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))
            out["main" if pid == self.pid else f"child {pid}"] = kb / 1024
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
