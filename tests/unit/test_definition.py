import pytest

from sagaflow import DefinitionError, NonRetryableError, RetryPolicy, Saga, Step, UnknownSaga
from sagaflow.definition import Registry, registry


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
