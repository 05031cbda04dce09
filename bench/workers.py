"""The worker subprocesses: started, waited for until they answer a ping (or, a DBOS executor, until it says it
is ready), measured (RSS), paused and resumed, and stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from bench.services import ROOT


class Worker:
    """A worker subprocess: `sagaflow worker`, `celery -A bench.plain worker`, a peer's worker or executor."""

    def __init__(self, label: str, argv: list[str], env: dict, log: Path, ping: Callable[[str], bool],
                 hostname: str, hostname_arg: bool = True) -> None:
        self.label, self.log, self.hostname = label, log, hostname
        self._ping = ping
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv + (["-n", hostname] if hostname_arg else []), env=env, cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT)
        node = hostname.replace("%h", os.uname().nodename)
        deadline = time.monotonic() + 90
        while not self._ping(node):
            time.sleep(0.1)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
                raise SystemExit(f"bench: the {label} worker did not start; see {log}. It ended with:\n{tail}")
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

    def signal_stop(self) -> None:
        """Pause the process (SIGSTOP), e.g. an executor that polls while idle and would load the machine
        while other sides are measured."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGSTOP)

    def signal_continue(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.signal_continue()  # a paused process cannot act on SIGTERM
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
