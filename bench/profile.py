"""Profile the sagaflow worker with py-spy (pip install py-spy) and say where a step's time goes.

The recorder samples the worker's main process and its pool children, idle samples included, so the time a
pool process spends waiting on PostgreSQL or Redis shows up next to its Python time. The summary splits
the pool processes' samples inside tasks by the innermost frame's package (PostgreSQL wait, SQLAlchemy,
kombu/redis, JSON, Celery, sagaflow...) and lists the heaviest sagaflow and Celery functions inclusively.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.core import Bench


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("bench: --profile needs py-spy: pip install py-spy")
    return found


class Recorder:
    def __init__(self, pid: int, output: Path, rate: int = 100) -> None:
        self.argv = [py_spy(), "record", "--pid", str(pid), "--subprocesses", "--idle", "--nonblocking",
                     "--format", "raw", "--rate", str(rate), "--output", str(output)]
        self.output = output
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Recorder":
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not self.output.exists():
            raise SystemExit(f"bench: py-spy wrote no profile: {err.strip()[-500:]}")


# "Class.method (package/module.py:123)"; the first parts of a stack name its processes, outermost first.
FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^():]*)(?::\d+)?\)$")

# Innermost frame -> where the time goes. First match wins, tried on the frames from the innermost out.
CATEGORIES = [
    ("PostgreSQL round trip (driver wait)", lambda f, p: p.startswith("sqlalchemy/") and f in (
        "do_execute", "do_executemany", "do_commit", "do_rollback", "do_ping", "do_begin", "connect")),
    # The fast path's prepared statements call the driver (C, no Python frame) straight from _one.
    ("PostgreSQL round trip (fast path: driver wait in _one)", lambda f, p: p == "sagaflow/store/fastpath.py"
     and f == "_one"),
    ("Redis round trip (socket)", lambda f, p: p.startswith("redis/") and f in (
        "_read_from_socket", "read_response", "sendall", "send_packed_command", "can_read_destructive")),
    ("JSON encode/decode", lambda f, p: p.startswith("json/") or p.startswith("kombu/utils/json")),
    ("SQLAlchemy (Python)", lambda f, p: p.startswith("sqlalchemy/")),
    ("psycopg2 (Python)", lambda f, p: p.startswith("psycopg2/")),
    ("kombu / redis-py (Python)", lambda f, p: p.startswith(("kombu/", "redis/", "amqp/", "vine/"))),
    ("logging", lambda f, p: p.startswith("logging/")),
    ("sagaflow", lambda f, p: p.startswith(("sagaflow/", "bench/"))),
    ("Celery / billiard", lambda f, p: p.startswith(("celery/", "billiard/"))),
]

# Inclusive: the share of in-task samples whose stack holds one of these functions.
INCLUSIVE = [
    ("sagaflow: claim_step", "claim_step", "sagaflow/"),
    ("sagaflow: complete_step", "complete_step", "sagaflow/"),
    ("sagaflow: complete_last_step", "complete_last_step", "sagaflow/"),
    ("sagaflow: finish_run", "finish_run", "sagaflow/"),
    ("sagaflow: ensure_json", "ensure_json", "sagaflow/"),
    ("sagaflow: fail_and_compensate (W2: the failure begins the undos)", "fail_and_compensate", "sagaflow/"),
    ("sagaflow: begin_compensation (the errback's)", "begin_compensation", "sagaflow/"),
    ("sagaflow: claim_compensation", "claim_compensation", "sagaflow/"),
    ("sagaflow: complete_compensation", "complete_compensation", "sagaflow/"),
    ("celery: publish the next link (apply_async)", "apply_async", "celery/"),
    ("celery: task-sent event (events dispatcher publish)", "publish", "celery/events/"),
    ("kombu: LPUSH of a message (redis _put)", "_put", "kombu/transport/redis"),
    ("SQLAlchemy: compile a statement", "_compiler", "sqlalchemy/"),
    ("SQLAlchemy: pool checkout (pre-ping included)", "_checkout", "sqlalchemy/pool"),
]


def parse(raw: Path) -> list[tuple[str, list[tuple[str, str]], int]]:
    """[(process, [(function, file) root first], count)]"""
    samples = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        processes = [p for p in parts if p.startswith("process ")]
        process = processes[-1].split(":")[0] if processes else ""
        frames = []
        for part in parts[len(processes):]:
            m = FRAME.match(part)
            if m:
                frames.append((m.group("func").rsplit(".", 1)[-1], m.group("file")))
        samples.append((process, frames, int(count)))
    return samples


def summarize(raw: Path, top: int = 12) -> str:
    samples = parse(raw)
    processes = Counter()
    in_task = Counter()
    main_idle = Counter()
    categories = Counter()
    inclusive = Counter()
    self_time = Counter()
    for process, frames, count in samples:
        processes[process] += count
        if frames and frames[-1] == ("poll", "kombu/utils/eventio.py"):
            main_idle[process] += count
        if not any(f == "trace_task" and p.startswith("celery/") for f, p in frames):
            continue
        in_task[process] += count
        for name, matches in CATEGORIES:
            if any(matches(f, p) for f, p in reversed(frames)):
                categories[name] += count
                break
        else:
            categories["other"] += count
        for name, func, prefix in INCLUSIVE:
            if any(f == func and p.startswith(prefix) for f, p in frames):
                inclusive[name] += count
        if frames:
            f, p = frames[-1]
            self_time[f"{f} ({p})"] += count
    busy = sum(in_task.values())
    total = sum(processes.values())
    lines = [f"py-spy profile of the sagaflow worker: {total} samples (idle included) over {len(processes)} "
             f"processes"]
    for process, count in sorted(processes.items()):
        if in_task[process]:
            lines.append(f"  {process} (pool): {100 * in_task[process] / count:.0f}% inside tasks, the rest waiting "
                         f"for work")
        else:
            lines.append(f"  {process} (main): {100 * main_idle[process] / count:.0f}% idle in the event loop's "
                         f"poll, the rest consuming, acking, dispatching and sending events")
    if not busy:
        return "\n".join(lines)
    lines.append("where task time goes (innermost frame's package):")
    lines += [f"  {100 * c / busy:5.1f}%  {name}" for name, c in categories.most_common()]
    lines.append("inclusive (stack holds the function):")
    lines += [f"  {100 * inclusive[name] / busy:5.1f}%  {name}" for name, _, _ in INCLUSIVE]
    lines.append(f"top {top} innermost frames:")
    lines += [f"  {100 * c / busy:5.1f}%  {name}" for name, c in self_time.most_common(top)]
    return "\n".join(lines)


def phase_profile(bench: Bench) -> None:
    """The profile phase (--profile): a W1 and a W2 throughput batch, each with py-spy on the sagaflow worker."""
    from bench.figures import progress  # here: `python bench/profile.py RAW` summarizes on its own

    n = bench.sizes.throughput
    out = Path(bench.args.profile_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for workload, fail_at in (("w1", None), ("w2", 3)):
        raw = out / f"sagaflow-{workload}-throughput.txt"
        progress(f"profile: py-spy on the sagaflow worker during {n} {workload.upper()} runs at once -> {raw}")
        bench.warm_up(bench.sf, 4, fail_at)
        with Recorder(bench.workers["sagaflow"].pid, raw):
            result = bench.batch(bench.sf, n, 4, fail_at, f"profiled {workload.upper()} throughput")
        bench.sf.reset()
        if not result["ok"]:
            continue
        summary = summarize(raw)
        (out / f"sagaflow-{workload}-throughput-summary.txt").write_text(summary)
        progress(summary)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1])))
