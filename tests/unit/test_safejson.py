"""What JSON may enter (sagaflow/safejson.py): depth, size and strings, checked without recursion."""

import pytest

from sagaflow.errors import InvalidInput
from sagaflow.safejson import JsonLimits, check_text, ensure_json, loads, text_depth


def nested(depth: int):
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_depth_at_the_limit_passes_and_one_more_is_refused():
    limits = JsonLimits(max_depth=64)
    assert ensure_json({"a": nested(63)}, "input", limits) == {"a": nested(63)}
    with pytest.raises(InvalidInput, match="deeper than 64 .*SAGAFLOW_JSON_MAX_DEPTH"):
        ensure_json({"a": nested(64)}, "input", limits)


def test_a_value_far_deeper_than_the_recursion_limit_is_refused_not_crashed():
    with pytest.raises(InvalidInput, match="deeper than"):
        ensure_json(nested(100_000), "input")
    with pytest.raises(InvalidInput, match="deeper than"):
        loads("[" * 100_000 + "]" * 100_000, "the body")


def test_a_cycle_is_refused_by_the_depth_limit():
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(InvalidInput, match="deeper than"):
        ensure_json(cycle, "input")


def test_size_is_counted_as_utf8_json():
    limits = JsonLimits(max_bytes=20)
    assert ensure_json({"k": "é" * 6}, "input", limits)  # 20 bytes: {"k":"éééééé"}
    with pytest.raises(InvalidInput, match="over the limit of 20 .*SAGAFLOW_JSON_MAX_BYTES"):
        ensure_json({"k": "é" * 7}, "input", limits)
    with pytest.raises(InvalidInput, match="over the limit"):
        loads(b'{"k": "' + b"x" * 20 + b'"}', "the body", limits)


@pytest.mark.parametrize("bad", ["a\x00b", "\ud800", "x\udfffy"])
def test_nul_and_lone_surrogates_are_refused_in_values_keys_and_text(bad):
    with pytest.raises(InvalidInput, match="NUL|surrogate"):
        ensure_json({"k": bad}, "input")
    with pytest.raises(InvalidInput, match="NUL|surrogate"):
        ensure_json({bad: 1}, "input")
    with pytest.raises(InvalidInput, match="NUL|surrogate"):
        check_text(bad, "the key")


def test_escaped_nul_and_surrogates_in_json_text_are_refused():
    with pytest.raises(InvalidInput, match="surrogate"):
        loads('{"k": "\\ud800"}', "the body")
    with pytest.raises(InvalidInput, match="NUL"):
        loads('{"k": "\\u0000"}', "the body")
    assert loads('{"k": "\\ud83d\\ude00"}', "the body") == {"k": "\U0001F600"}  # a pair is fine


def test_not_json_is_refused():
    for value in ({1, 2}, object(), float("nan"), float("inf")):
        with pytest.raises(InvalidInput, match="not JSON"):
            ensure_json({"k": value}, "input")
    with pytest.raises(InvalidInput, match="not valid JSON"):
        loads("[NaN]", "the body")
    with pytest.raises(InvalidInput, match="not UTF-8"):
        loads('{"k": "é"}'.encode("utf-16"), "the body")


def test_tuples_become_lists():
    assert ensure_json({"t": (1, 2)}, "input") == {"t": [1, 2]}


def test_text_depth_ignores_brackets_inside_strings():
    assert text_depth('{"a": "[[[[{{{", "b": [1, {"c": "\\"]]]"}]}') == 3
    assert text_depth("1") == 0
