"""The worker's depth check of raw task messages (sagaflow/inbound.py): measured and cut without recursion."""

import json

import pytest

from sagaflow.inbound import message_depth_limit, prune_text, text_depth, too_deep, value_depth


def nested_text(depth: int) -> bytes:
    return b"[" * depth + b'"x"' + b"]" * depth


@pytest.mark.parametrize("text,depth", [
    (b"1", 0), (b"[]", 1), (b'{"a": [1, {"b": []}]}', 4), (b'["[[[[", "]]]"]', 1), (b'["\\"[[["]', 1),
    (b'["\\\\", [["]"]]]', 3), (b'{"a\\"[": ["\\u005b"]}', 2),  # escapes: measured by the regex
    (b'{"a": "}}}", "b": [[["{"]]]}', 4), (nested_text(100_000), 100_000),
])
def test_text_depth_ignores_brackets_in_strings(text, depth):
    assert text_depth(text) == depth


def test_too_deep_counts_brackets_first_and_measures_only_past_the_limit():
    assert not too_deep(b'[[["' + b"[" * 50 + b'"]]]', 3)  # 53 brackets, but 50 of them in a string
    assert too_deep(nested_text(5), 4)
    assert not too_deep(nested_text(4), 4)


@pytest.mark.parametrize("depth", [5, 600, 5000, 100_000])
def test_prune_cuts_what_is_nested_deeper_than_the_limit(depth):
    raw = b'[[{"keep": "[{not a bracket", "deep": ' + nested_text(depth) + b'}], {"run_id": "r1", "index": 1}, {}]'
    value = json.loads(prune_text(raw, 4))
    assert value[1] == {"run_id": "r1", "index": 1}
    assert value[0][0]["keep"] == "[{not a bracket"
    assert value[0][0]["deep"] == [None]  # its first array is level 4 (kept), the next level 5 (cut)
    assert text_depth(prune_text(raw, 4)) <= 4


def test_prune_leaves_a_shallow_text_alone():
    raw = b'[{"a": [1, 2, {"b": "]]"}]}, {}, {"chain": null}]'
    assert prune_text(raw, 10) == raw


def test_value_depth_stops_once_past_the_limit():
    value = "x"
    for _ in range(100_000):
        value = [value]
    assert value_depth(value, 10) == 11
    assert value_depth({"a": [1, {"b": ()}], "c": 2}, 10) == 4
    assert value_depth("scalar", 10) == 0


def test_the_message_limit_leaves_room_for_the_envelope_and_stays_picklable():
    assert message_depth_limit(64) == 74
    assert message_depth_limit(10_000) == 256
