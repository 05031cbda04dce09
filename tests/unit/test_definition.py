import random

import pytest

from sagaflow import DefinitionError, NonRetryableError, RetryKind, RetryPolicy, Saga, Step, UnknownSaga
from sagaflow.model.definition import Registry, registry


def noop(ctx):
    return None


@pytest.fixture
def fresh():
    names = []

    def make(name, *args, **kwargs):
        names.append(name)
        return Saga(name, *args, **kwargs)

    yield make
    for name in names:
        registry.remove(name)


def test_decorator_form_pairs_each_action_with_its_compensation(fresh):
    saga = fresh("unit_decorated", version=2)

    @saga.step(timeout=5)
    def reserve(ctx):
        return 1

    @reserve.compensation(retry=RetryPolicy(max_attempts=7))
    def release(ctx):
        return None

    @saga.step
    def notify(ctx):
        return None

    assert [s.name for s in saga.steps] == ["reserve", "notify"]
    assert reserve.compensate is release and reserve.compensation_retry.max_attempts == 7
    assert reserve.timeout == 5 and notify.compensate is None
    assert registry.get("unit_decorated") is saga and registry.get("unit_decorated", 2) is saga


def test_plain_form_for_sagas_assembled_at_run_time(fresh):
    saga = fresh("unit_plain", steps=[Step("a", noop, noop), Step("b", noop)])
    assert [(s.name, s.compensate is not None) for s in saga.steps] == [("a", True), ("b", False)]


@pytest.mark.parametrize("make,message", [
    (lambda: Saga("bad name", register=False), "must be an identifier"),
    (lambda: Saga("x", version=0, register=False), "version"),
    (lambda: Step("a.b", noop), "must be an identifier"),
    (lambda: Step("a", "not callable"), "action must be callable"),
    (lambda: Step("a", noop, compensation=3), "compensation must be callable"),
    (lambda: Step("a", noop, timeout=0), "timeout"),
    (lambda: Saga("x", steps=[Step("a", noop), Step("a", noop)], register=False), "already has a step"),
    (lambda: RetryPolicy(max_attempts=0), "max_attempts"),
    (lambda: RetryPolicy(backoff=0.5), "backoff"),
    (lambda: RetryPolicy(non_retryable=("ValueError",)), "exception classes"),
])
def test_invalid_definitions_are_refused_with_a_clear_error(make, message):
    with pytest.raises(DefinitionError, match=message):
        make()


def test_second_compensation_for_a_step_is_refused():
    step = Step("a", noop, noop)
    with pytest.raises(DefinitionError, match="already has a compensation"):
        step.compensation(noop)


def test_registry_versions_and_unknown_names():
    reg = Registry()
    v1 = Saga("s", register=False)
    v2 = Saga("s", version=2, register=False)
    reg.add(v1)
    reg.add(v2)
    assert reg.get("s") is v2 and reg.get("s", 1) is v1
    with pytest.raises(UnknownSaga, match="has no version 3"):
        reg.get("s", 3)
    with pytest.raises(UnknownSaga, match="unknown saga 'nope' \\(registered: s\\)"):
        reg.get("nope")
    with pytest.raises(DefinitionError, match="bump the version"):
        reg.add(Saga("s", register=False))


def test_listeners_hear_of_existing_sagas_and_of_each_new_step():
    reg = Registry()
    seen = []
    saga = Saga("s", steps=[Step("a", noop)], register=False)
    reg.add(saga)
    reg.listen(lambda s: seen.append([st.name for st in s.steps]))
    assert seen == [["a"]]


def test_retry_delay_grows_exponentially_up_to_the_cap():
    policy = RetryPolicy(initial_interval=1, backoff=2, max_interval=5, jitter=False)
    assert [policy.delay(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]


def test_jitter_stays_between_half_and_all_of_the_delay():
    policy = RetryPolicy(initial_interval=4, backoff=1, max_interval=10)
    assert policy.delay(1, rand=lambda: 0.0) == 2
    assert policy.delay(1, rand=lambda: 0.999999) == pytest.approx(4, rel=1e-5)


class Rejected(Exception):
    pass


def test_retry_decision_respects_attempts_and_non_retryable_types():
    policy = RetryPolicy(max_attempts=3, non_retryable=(Rejected,))
    assert policy.allows_retry(ValueError(), 1) and policy.allows_retry(ValueError(), 2)
    assert not policy.allows_retry(ValueError(), 3)
    assert not policy.allows_retry(Rejected(), 1)
    assert not policy.allows_retry(NonRetryableError(), 1)


# ---------------------------------------------------------------------------------------------- retry kinds


def test_the_default_kind_is_exponential_and_the_old_constructor_still_works():
    positional = RetryPolicy(4, 0.5, 3.0, 10.0, False, (Rejected,))
    assert positional.kind is RetryKind.EXPONENTIAL and positional.kind == "exponential"
    assert (positional.max_attempts, positional.backoff, positional.non_retryable) == (4, 3.0, (Rejected,))
    assert [positional.delay(n) for n in range(1, 5)] == [0.5, 1.5, 4.5, 10.0]
    assert RetryPolicy().backoff == 2.0 and RetryPolicy() == RetryPolicy(backoff=2.0)


def test_exponential_delays_without_jitter_are_exact_and_capped():
    policy = RetryPolicy(kind="exponential", initial_interval=0.25, backoff=3, max_interval=5, jitter=False)
    assert [policy.delay(n) for n in range(1, 6)] == [0.25, 0.75, 2.25, 5, 5]


def test_exponential_delay_of_a_huge_attempt_number_is_the_cap():
    policy = RetryPolicy(initial_interval=1, backoff=10, max_interval=30, jitter=False)
    assert policy.delay(100_000) == 30


def test_linear_delays_grow_by_the_increment_up_to_the_cap():
    policy = RetryPolicy(kind="linear", initial_interval=1, increment=2, max_interval=6, jitter=False)
    assert [policy.delay(n) for n in range(1, 6)] == [1, 3, 5, 6, 6]


def test_linear_increment_defaults_to_the_initial_interval():
    policy = RetryPolicy(kind=RetryKind.LINEAR, initial_interval=0.5, max_interval=60, jitter=False)
    assert policy.increment == 0.5
    assert [policy.delay(n) for n in range(1, 5)] == [0.5, 1.0, 1.5, 2.0]


def test_fixed_delays_are_the_same_every_time_and_capped():
    policy = RetryPolicy(kind="fixed", initial_interval=0.2, jitter=False)
    assert [policy.delay(n) for n in range(1, 6)] == [0.2] * 5
    assert RetryPolicy(kind="fixed", initial_interval=90, max_interval=30, jitter=False).delay(1) == 30


@pytest.mark.parametrize("policy", [
    RetryPolicy(kind="exponential", initial_interval=0.5, backoff=2, max_interval=5),
    RetryPolicy(kind="linear", initial_interval=0.5, increment=1, max_interval=3),
    RetryPolicy(kind="fixed", initial_interval=2, max_interval=3),
])
def test_jitter_keeps_every_kind_between_half_and_all_of_its_nominal_delay(policy):
    nominal = [policy.nominal_delay(n) for n in range(1, 8)]
    rng = random.Random(7)
    for n, expected in enumerate(nominal, start=1):
        drawn = [policy.delay(n, rand=rng.random) for _ in range(200)]
        assert all(expected / 2 <= d <= expected for d in drawn), (n, expected, min(drawn), max(drawn))
        assert max(drawn) - min(drawn) > expected / 4  # it does spread
    assert policy.delay(3, rand=lambda: 0.0) == nominal[2] / 2


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="expo"), "retry kind must be one of 'exponential', 'linear', 'fixed', got 'expo'"),
    (dict(kind=None), "retry kind must be one of .* got None"),
    (dict(max_attempts=True), "max_attempts must be an integer >= 1, got True"),
    (dict(max_attempts=2.5), "max_attempts must be an integer >= 1, got 2.5"),
    (dict(initial_interval=-1), "initial_interval must be a number of seconds >= 0, got -1"),
    (dict(initial_interval="1"), "initial_interval must be a number of seconds >= 0, got '1'"),
    (dict(max_interval=float("nan")), "max_interval must be a number of seconds >= 0, got nan"),
    (dict(jitter="yes"), "jitter must be True or False, got 'yes'"),
    (dict(backoff=0.5), "backoff must be a number >= 1, got 0.5"),
    (dict(kind="linear", backoff=2), "backoff applies to kind 'exponential' only, got backoff=2 with kind 'linear'"),
    (dict(kind="fixed", backoff=2), "backoff applies to kind 'exponential' only"),
    (dict(kind="linear", increment=-0.1), "increment must be a number of seconds >= 0, got -0.1"),
    (dict(increment=1), "increment applies to kind 'linear' only, got increment=1 with kind 'exponential'"),
    (dict(non_retryable=ValueError), "non_retryable must be a tuple of exception classes"),
])
def test_bad_retry_arguments_are_refused_naming_the_value(kwargs, message):
    with pytest.raises(DefinitionError, match=message):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize("make,message", [
    (lambda: Step("a", noop, timeout="10"), "timeout must be a number of seconds > 0, got '10'"),
    (lambda: Step("a", noop, retry={"kind": "fixed"}), "retry must be a RetryPolicy"),
    (lambda: Step("a", noop, queue=""), "queue must be a non-empty string"),
    (lambda: Step("a", noop, lease="1"), "lease must be a number of seconds > 0, got '1'"),
])
def test_bad_step_options_are_refused_naming_the_value(make, message):
    with pytest.raises(DefinitionError, match=message):
        make()


# ------------------------------------------------------------------ gates, child steps, groups, step flags

def test_gates_child_steps_groups_and_flags_are_recorded_and_make_a_saga_non_linear():
    from sagaflow import Parallel, StepKind

    plain = Saga("t_linear", [Step("a", lambda c: 1)], register=False)
    assert plain.linear
    s = Saga("t_shapes", [
        Step("a", lambda c: 1, lambda c: None, non_atomic=True),
        Parallel(Step("b", lambda c: 1), Step("c", lambda c: 1, best_effort=True)),
        Step("d", lambda c: 1, pivot=True),
    ], register=False)
    s.gate("approve", signal="approved", timeout=60)
    s.child("sub", saga="t_linear")
    assert not s.linear
    assert [st.group for st in s.steps] == [None, 1, 1, None, None, None]
    assert s.groups() == {1: [1, 2]}
    assert s.steps[4].kind is StepKind.GATE and s.steps[4].signal == "approved"
    assert s.steps[5].kind is StepKind.CHILD and s.steps[5].child_saga == "t_linear"


def test_the_decorator_form_groups_steps_with_a_context_manager():
    s = Saga("t_group_decorators", register=False)

    @s.step
    def first(ctx):
        return 1

    with s.parallel():
        @s.step
        def left(ctx):
            return 1

        @s.step
        def right(ctx):
            return 2

    assert [st.group for st in s.steps] == [None, 1, 1]


@pytest.mark.parametrize("build, message", [
    (lambda: Step("a", lambda c: 1, best_effort=True, pivot=True), "cannot be best-effort"),
    (lambda: Step("a", lambda c: 1, pivot="yes"), "pivot must be True or False"),
    (lambda: Saga("t_bad", register=False).gate("g", signal="bad name", timeout=5), "signal must be an identifier"),
    (lambda: Step("g", None, kind="gate", signal="ok"), "give a timeout"),
    (lambda: Step("a", lambda c: 1, signal="ok"), "only a gate waits"),
    (lambda: Saga("t_bad", register=False).child("c", saga="no such"), "saga must be a saga name"),
    (lambda: Saga("t_bad", register=False).child("c", saga="x", input="nope"), "input must be callable"),
    (lambda: Step("a", lambda c: 1, kind="loop"), "kind must be one of"),
    (lambda: Saga("t_bad", [Step("a", lambda c: 1), __import__("sagaflow").Parallel(Step("b", lambda c: 1))],
                  register=False), "at least two steps"),
])
def test_bad_shapes_are_refused_with_a_clear_error(build, message):
    with pytest.raises(DefinitionError, match=message):
        build()


def test_gates_and_pivots_do_not_run_in_parallel_groups():
    from sagaflow import Parallel

    with pytest.raises(DefinitionError, match="cannot be in a parallel group"):
        Saga("t_bad", [Parallel(Step("a", lambda c: 1), Step("b", lambda c: 1, pivot=True))], register=False)
    s = Saga("t_bad2", register=False)
    with pytest.raises(DefinitionError, match="cannot be in a parallel group"):
        with s.parallel():
            s.step(lambda c: 1, name="x")
            s.gate("g", signal="go", timeout=5)


def test_child_steps_run_as_branches_of_a_parallel_group_but_sleeps_do_not():
    from sagaflow import Parallel
    from sagaflow.model.definition import StepKind

    s = Saga("t_kids", register=False)
    with s.parallel():
        s.step(lambda c: 1, name="x")
        s.child("sub", saga="other")
        s.child("sub2", saga="other", input=lambda ctx: {"n": 2})
    assert [(st.name, st.kind, st.group) for st in s.steps] == [
        ("x", StepKind.ACTION, 0), ("sub", StepKind.CHILD, 0), ("sub2", StepKind.CHILD, 0)]
    assert s.groups() == {0: [0, 1, 2]} and not s.linear
    plain = Saga("t_kids2", [Step("a", lambda c: 1),
                             Parallel(Step("k1", None, kind="child", child_saga="other"),
                                      Step("k2", None, kind="child", child_saga="other"))], register=False)
    assert [st.group for st in plain.steps] == [None, 1, 1]
    bad = Saga("t_bad3", register=False)
    with pytest.raises(DefinitionError, match="cannot be in a parallel group"):
        with bad.parallel():
            bad.step(lambda c: 1, name="x")
            bad.sleep("nap", 5)
