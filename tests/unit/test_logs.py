import logging
import re

import pytest

from sagaflow.logs import LogfmtFormatter, escape_controls, setup_logging


def test_logfmt_line_has_the_event_and_the_extra_fields_quoted_when_needed():
    record = logging.makeLogRecord({"name": "sagaflow.runtime", "levelname": "WARNING", "msg": "step_failed",
                                    "run_id": "r1", "error": 'ValueError: "bad" input'})
    line = LogfmtFormatter().format(record)
    assert "level=warning" in line and "event=step_failed" in line and "run_id=r1" in line
    assert 'error="ValueError: \\"bad\\" input"' in line


# A reader of the format: key=value pairs, a quoted value decoded with its backslash escapes.
_PAIR = re.compile(r'([^ =]+)=("(?:[^"\\]|\\.)*"|[^ "]*)(?: |$)')
_ESCAPE = re.compile(r'\\(x[0-9a-f]{2}|u[0-9a-f]{4}|[nrt"\\])')
_SIMPLE = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


def _decode(value: str) -> str:
    if not value.startswith('"'):
        return value
    return _ESCAPE.sub(lambda m: _SIMPLE.get(m.group(1)) or chr(int(m.group(1)[1:], 16)), value[1:-1])


def parse(line: str) -> dict:
    pairs = _PAIR.findall(line)
    assert " ".join(f"{k}={v}" for k, v in pairs) == line, f"not logfmt: {line!r}"
    return {k: _decode(v) for k, v in pairs}


def _line(msg="step_failed", **extra) -> str:
    return LogfmtFormatter().format(logging.makeLogRecord({"name": "sagaflow.web", "levelname": "INFO",
                                                           "msg": msg, **extra}))


# One of each class of control character, and its escape.
CONTROLS = [
    ("\x00", "\\x00"),  # NUL
    ("\x01", "\\x01"),
    ("\t", "\\t"),
    ("\n", "\\n"),
    ("\x0b", "\\x0b"),  # vertical tab
    ("\x0c", "\\x0c"),  # form feed
    ("\r", "\\r"),
    ("\x1b", "\\x1b"),  # ESC: terminal escape sequences
    ("\x1f", "\\x1f"),
    ("\x7f", "\\x7f"),  # DEL
    ("\x80", "\\x80"),  # C1
    ("\x85", "\\x85"),  # NEL, a line break for str.splitlines
    ("\x9b", "\\x9b"),  # CSI
    ("\x9f", "\\x9f"),
    ("\u2028", "\\u2028"),  # line separator
    ("\u2029", "\\u2029"),  # paragraph separator
    ("\udcff", "\\udcff"),  # a lone surrogate (argv bytes decoded with surrogateescape): not UTF-8
]


@pytest.mark.parametrize("char,escape", CONTROLS, ids=[f"U+{ord(c):04X}" for c, _ in CONTROLS])
def test_every_control_character_is_escaped_in_a_quoted_value_a_reader_can_decode(char, escape):
    value = f"a{char}b"
    line = _line(path=value)
    assert f'path="a{escape}b"' in line
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]", line)
    assert len(line.splitlines()) == 1
    line.encode("utf-8")  # a lone surrogate would make the handler fail here
    assert parse(line)["path"] == value


@pytest.mark.parametrize("char,escape", CONTROLS, ids=[f"U+{ord(c):04X}" for c, _ in CONTROLS])
def test_the_event_name_and_keys_are_escaped_too(char, escape):
    line = _line(msg=f"evil{char}event", **{f"k{char}": "v"})
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]", line)
    fields = parse(line)
    assert fields["event"] == f"evil{char}event"
    assert f"k{escape}" in fields


def test_a_value_with_crlf_cannot_forge_a_second_log_line():
    forged = "/x\r\nts=2026-01-01T00:00:00 level=error logger=sagaflow.runtime event=run_failed run_id=forged"
    line = _line(msg="request", path=forged)
    assert len(line.splitlines()) == 1 and "\r" not in line and "\n" not in line
    fields = parse(line)
    assert fields["path"] == forged
    assert fields["event"] == "request" and fields["level"] == "info" and "run_id" not in fields


def test_a_key_cannot_forge_another_field():
    line = _line(**{"a=1 level": "x", 'q"': "y", "b\\": "z"})
    fields = parse(line)
    assert fields["level"] == "info"
    assert fields["a\\x3d1\\x20level"] == "x" and fields["q\\x22"] == "y" and fields["b\\x5c"] == "z"


def test_quotes_backslashes_and_escape_lookalikes_round_trip():
    for value in ['say "hi"', "C:\\temp\\x1b", "\\n is not a newline", "", "a=b", "plain"]:
        assert parse(_line(v=value))["v"] == value


def test_an_exception_is_one_escaped_value():
    try:
        raise ValueError("bad\r\ninput\x1b[2J")
    except ValueError:
        import sys

        exc_info = sys.exc_info()
    record = logging.makeLogRecord({"name": "sagaflow.runtime", "levelname": "ERROR", "msg": "step_crashed",
                                    "exc_info": exc_info})
    line = LogfmtFormatter().format(record)
    assert len(line.splitlines()) == 1 and "\x1b" not in line and "\r" not in line
    exc = parse(line)["exc"]
    assert exc.startswith("Traceback") and exc.endswith("ValueError: bad\r\ninput\x1b[2J")


def test_escape_controls_for_people():
    assert escape_controls("ok\x1b[2J\r\n\x00\u2028\x9b\udcff") == "ok\\x1b[2J\\r\\n\\x00\\u2028\\x9b\\udcff"
    # text and backslashes stay
    assert escape_controls("caf\u00e9 \u65e5\u672c C:\\x") == "caf\u00e9 \u65e5\u672c C:\\x"


def test_an_unknown_log_level_is_a_clear_value_error():
    with pytest.raises(ValueError, match="SAGAFLOW_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"):
        setup_logging("LOUD")
    setup_logging("warn")  # the names logging knows still work, in any case
    assert logging.getLogger("sagaflow").level == logging.WARNING
