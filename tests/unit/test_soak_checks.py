"""The soak's invariant checks (tests/soak.py) catch what they claim to: a checker that cannot fail proves
nothing."""

from types import SimpleNamespace as NS

from tests.soak import check_run

COMPENSABLE = {"a", "b", "c"}


def run(status, *steps, terminal=True):
    events = [NS(kind=f"run_{status}")] if terminal else []
    st = [NS(name=n, status=s) for n, s in steps]
    return NS(status=status, steps=st, events=events, step=lambda name: next(x for x in st if x.name == name))


COMPENSATED = run("compensated", ("a", "compensated"), ("b", "compensated"), ("c", "failed"))
GOOD_UNDO = [("do", "a"), ("do", "b"), ("undo", "b"), ("undo", "a")]


def test_a_clean_compensated_run_passes():
    assert check_run(COMPENSATED, GOOD_UNDO, COMPENSABLE) == []


def test_undos_in_the_wrong_order_or_missing_or_doubled_are_caught():
    assert check_run(COMPENSATED, [("do", "a"), ("do", "b"), ("undo", "a"), ("undo", "b")], COMPENSABLE)
    assert check_run(COMPENSATED, [("do", "a"), ("do", "b"), ("undo", "b")], COMPENSABLE)
    assert check_run(COMPENSATED, GOOD_UNDO + [("undo", "a")], COMPENSABLE)


def test_an_effect_of_the_failed_step_is_caught():
    assert check_run(COMPENSATED, [("do", "a"), ("do", "b"), ("do", "c"), ("undo", "b"), ("undo", "a")],
                     COMPENSABLE)


def test_a_succeeded_run_with_an_undo_or_a_missing_action_is_caught():
    ok = run("succeeded", ("a", "succeeded"), ("b", "succeeded"))
    assert check_run(ok, [("do", "a"), ("do", "b")], COMPENSABLE) == []
    assert check_run(ok, [("do", "a")], COMPENSABLE)
    assert check_run(ok, [("do", "a"), ("do", "b"), ("undo", "b")], COMPENSABLE)


def test_a_run_left_open_or_finished_twice_is_caught():
    assert check_run(run("running", ("a", "running")), [], COMPENSABLE)
    twice = run("succeeded", ("a", "succeeded"))
    twice.events.append(NS(kind="run_succeeded"))
    assert check_run(twice, [("do", "a")], COMPENSABLE)


def test_compensation_failed_allows_only_the_undos_before_the_stuck_one():
    stuck = run("compensation_failed", ("a", "succeeded"), ("b", "compensation_failed"), ("c", "failed"))
    assert check_run(stuck, [("do", "a"), ("do", "b")], COMPENSABLE) == []
    assert check_run(stuck, [("do", "a"), ("do", "b"), ("undo", "a")], COMPENSABLE)
