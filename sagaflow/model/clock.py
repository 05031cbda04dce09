"""The one place sagaflow reads the time and turns a delay into a message's countdown.

The store stamps every row with ``now()`` (leases, retry times, deadlines, events); the runtime schedules a
retry with ``countdown(delay)``. In production both are the wall clock. ``sagaflow.testing`` installs a clock
it moves itself (``use``): a delay then passes at once, the store sees the time it would be after the delay,
and a deadline or a gate's timeout can be reached without waiting for it.
"""

from __future__ import annotations

import datetime as dt
import threading


class Clock:
    """The wall clock: ``now`` is the time, ``countdown`` the delay itself."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def countdown(self, seconds: float) -> float:
        """The countdown a message scheduled ``seconds`` from now is published with."""
        return seconds


class ManualClock(Clock):
    """A clock that only moves when told (``advance``), plus the wall time elapsed since it was made (so rows
    written one after the other keep their order). A delay moves it forward at once and the message goes out
    with no countdown: a one-hour retry delay passes in no wall time. Thread-safe."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._lock = threading.Lock()
        self._real_start = dt.datetime.now(dt.timezone.utc)
        self._start = start or self._real_start
        self._skipped = dt.timedelta(0)

    def now(self) -> dt.datetime:
        elapsed = dt.datetime.now(dt.timezone.utc) - self._real_start
        with self._lock:
            return self._start + elapsed + self._skipped

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock only moves forward, got {seconds} s")
        with self._lock:
            self._skipped += dt.timedelta(seconds=seconds)

    def countdown(self, seconds: float) -> float:
        if seconds > 0:
            self.advance(seconds)
        return 0.0

    @property
    def skipped(self) -> float:
        """The seconds this clock was moved on, beyond the wall time."""
        with self._lock:
            return self._skipped.total_seconds()


_clock: Clock = Clock()


def now() -> dt.datetime:
    return _clock.now()


def countdown(seconds: float) -> float:
    return _clock.countdown(seconds)


def use(clock: Clock) -> Clock:
    """Install ``clock`` for this process; returns the one it replaces (to put back)."""
    global _clock
    previous, _clock = _clock, clock
    return previous


def current() -> Clock:
    return _clock
