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
