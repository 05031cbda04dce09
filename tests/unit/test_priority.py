"""Run priorities (client.start(priority=)): one scale, 0 to 9 with 9 served first, mapped onto each
broker's (Redis serves its lowest number first, RabbitMQ its highest); a bad priority is refused before
anything is written; every message of a compiled chain carries it, its errbacks too."""

from __future__ import annotations

import pytest
from celery import Celery

from sagaflow import InvalidInput, Saga, SagaClient, Step
from sagaflow.runtime import compiler, publish


def act(ctx):
    return 1


@pytest.mark.parametrize("url,nine,zero", [("redis://localhost/0", 0, 9), ("amqp://guest@localhost//", 9, 0)])
def test_one_scale_mapped_onto_each_broker(url, nine, zero):
    app = Celery("p", broker=url)
    assert publish.broker_priority(9, app) == nine and publish.broker_priority(0, app) == zero
    assert publish.sagaflow_priority(publish.broker_priority(7, app), app) == 7
    assert publish.sagaflow_priority(None, app) is None


def test_every_link_and_its_errback_carry_the_priority():
    app = Celery("p", broker="redis://localhost/0")
    saga = Saga("prio_unit", [Step("a", act), Step("b", act)], register=False)
    with publish.priority(8):
        canvas = publish._stamped(compiler.compile_run(app, saga, "r1"), app)
    for link in canvas.tasks:
        assert link["options"]["priority"] == 1
        assert [e["options"]["priority"] for e in link["options"]["link_error"]] == [1]
    assert publish.current_priority() == publish.DEFAULT_PRIORITY  # outside the block: the default again


REFUSED = Saga("prio_refused", [Step("a", act)])


@pytest.mark.parametrize("bad", [-1, 10, 2.5, True, "9"])
def test_a_bad_priority_is_refused_before_anything_is_written(bad):
    class NoStore:
        def __getattr__(self, name):
            raise AssertionError(f"the store was used: {name}")

    with pytest.raises(InvalidInput, match="priority is an integer from 0 to 9"):
        SagaClient(store=NoStore()).start("prio_refused", {}, priority=bad)


# ---------------------------------------------------------------------------------------------- kept on the run


def _create(store, priority: int, **kwargs) -> str:
    (run, created), = store.create_runs("prio_kept", 1, [(f"r-{priority}-{len(kwargs)}", {}, None)],
                                        [], priority=priority, **kwargs)
    assert created
    return run.id


def test_the_run_row_keeps_its_priority(store):
    import datetime as dt

    assert store.run_priority(_create(store, 7)) == 7
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    assert store.run_priority(_create(store, 9, start_at=later)) == 9  # a delayed start keeps it for its start
    (plain, _), = store.create_runs("prio_kept", 1, [("r-default", {}, None)], [])
    assert store.run_priority(plain.id) == 0
    assert store.run_priority("no-such-run") == 0


def test_a_message_published_outside_the_runs_own_task_goes_at_the_runs_priority(store, monkeypatch):
    """The sweeper's re-drive, a delayed start fired, a queued run given its slot inside another run's task:
    each reads the run's priority from its row; inside the run's own task nothing is read."""
    app = Celery("p", broker="redis://localhost/0")
    saga = Saga("prio_kept", [Step("a", act)], register=False)
    urgent = _create(store, 9)
    monkeypatch.setattr(publish, "get_store", lambda: store)

    def sent(run_id):
        return publish._stamped(compiler.compile_run(app, saga, run_id), app, run_id).tasks[0]["options"]["priority"]

    assert sent(urgent) == publish.broker_priority(9, app)  # no task: the sweeper, an operator
    with publish.priority(2, "another-run"):  # inside another run's task (a slot handed over when it ended)
        assert sent(urgent) == publish.broker_priority(9, app)

    def no_read():
        raise AssertionError("read the store inside the run's own task")

    monkeypatch.setattr(publish, "get_store", no_read)
    with publish.priority(4, urgent):  # the run's own task: the priority its message came with
        assert sent(urgent) == publish.broker_priority(4, app)
    with publish.priority(None, urgent):  # client.start with no priority: the default, and no read (one round trip)
        assert sent(urgent) == publish.broker_priority(publish.DEFAULT_PRIORITY, app)


def test_a_priority_that_cannot_be_read_gives_the_default(monkeypatch):
    class Down:
        def run_priority(self, run_id):
            raise OSError("database down")

    monkeypatch.setattr(publish, "get_store", lambda: Down())
    assert publish.priority_of("some-run") == publish.DEFAULT_PRIORITY
