import logging

from sagaflow.logs import LogfmtFormatter


def test_logfmt_line_has_the_event_and_the_extra_fields_quoted_when_needed():
    record = logging.makeLogRecord({"name": "sagaflow.runtime", "levelname": "WARNING", "msg": "step_failed",
                                    "run_id": "r1", "error": 'ValueError: "bad" input'})
    line = LogfmtFormatter().format(record)
    assert "level=warning" in line and "event=step_failed" in line and "run_id=r1" in line
    assert 'error="ValueError: \\"bad\\" input"' in line
