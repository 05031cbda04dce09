"""What the CLI prints for people: stored text with its control characters escaped, one line per item."""

import datetime as dt
import re

import click
import pytest

from sagaflow.cli import SECONDS, print_run
from sagaflow.model import Event, Run, StepState

EVIL = "x\x1b[2J\x1b]0;pwned\x07\r\nforged\x00\x9b\u2028\udcff"
ESCAPED = "x\\x1b[2J\\x1b]0;pwned\\x07\\r\\nforged\\x00\\x9b\\u2028\\udcff"
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _run() -> Run:
    step = StepState(index=0, name=f"step{EVIL}", status="failed", has_compensation=True, attempts=1,
                     compensation_attempts=0, result=None, error=EVIL, compensation_error=None, task_id=None,
                     compensation_task_id=None, started_at=NOW, finished_at=NOW, compensated_at=None)
    event = Event(id=1, kind=f"step_failed{EVIL}", step=f"step{EVIL}", at=NOW, detail={f"k{EVIL}": EVIL})
    return Run(id=f"id{EVIL}", saga=f"saga{EVIL}", saga_version=1, status="failed", input={"a": EVIL},
               idempotency_key=None, cancel_requested=False, error=EVIL, created_at=NOW, updated_at=NOW,
               finished_at=NOW, steps=(step,), events=(event,))


def test_a_run_is_printed_with_every_control_character_escaped(capsys):
    print_run(_run(), as_json=False)
    out = capsys.readouterr().out
    out.encode("utf-8")  # a lone surrogate would have made the print itself fail
    assert not RAW.search(out), out
    lines = out.splitlines()
    assert len(lines) == 4  # run, error, one step, one event
    assert lines[1] == f"error: {ESCAPED}"
    assert all(ESCAPED in line for line in lines)


def test_json_output_is_json_with_nothing_raw(capsys):
    print_run(_run(), as_json=True)
    out = capsys.readouterr().out
    assert not RAW.search(out) and out.isascii()


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "0", "-1", "abc", "1e999"])
def test_seconds_must_be_positive_and_finite(raw):
    with pytest.raises(click.BadParameter, match="seconds"):
        SECONDS.convert(raw, None, None)


def test_seconds_accepts_a_positive_number():
    assert SECONDS.convert("2.5", None, None) == 2.5 and SECONDS.convert(60.0, None, None) == 60.0
