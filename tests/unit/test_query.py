"""What an operator types (sagaflow/model/query.py): times and durations, and the clear errors for the rest."""

import datetime as dt

import pytest

from sagaflow.errors import InvalidInput
from sagaflow.model.query import parse_duration, parse_time

UTC = dt.timezone.utc


@pytest.mark.parametrize("text,expected", [
    ("2026-12-01", dt.datetime(2026, 12, 1, tzinfo=UTC)),
    ("2026-12-01T10:00", dt.datetime(2026, 12, 1, 10, tzinfo=UTC)),
    ("2026-12-01T10:00:00Z", dt.datetime(2026, 12, 1, 10, tzinfo=UTC)),
    ("2026-12-01T12:00:00+02:00", dt.datetime(2026, 12, 1, 10, tzinfo=UTC)),
])
def test_times(text, expected):
    assert parse_time(text, "since") == expected


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "", "２０２６-12-01", "1" * 100])
def test_bad_times(text):
    with pytest.raises(InvalidInput, match="since must be an ISO 8601 date or time"):
        parse_time(text, "since")


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000)])
def test_durations(text, seconds):
    assert parse_duration(text, "--older-than") == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["30", "0d", "-1d", "1w", "30 d", "1.5h", "", None])
def test_bad_durations(text):
    with pytest.raises(InvalidInput, match="--older-than must be a duration"):
        parse_duration(text, "--older-than")
