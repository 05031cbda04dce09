"""The canvas the compiler builds: one task per step with its own bind=True .si errback."""

import functools

from celery import signature

from sagaflow import tasks  # noqa: F401
from sagaflow.app import celery_app
from sagaflow.model.definition import registry
from sagaflow.runtime.compiler import compile_compensation, compile_run


def test_forward_chain_has_one_named_task_per_step():
    saga = registry.get("create_booking")
    links = compile_run(celery_app, saga, "run-1").tasks
    assert [s.task for s in links] == [
        "create_booking.create_invoice", "create_booking.send_email", "create_booking.send_whatsapp",
        "create_booking.add_calendar",
    ]  # no finish task: the last step's completion finishes the run
    assert links[0].args == ({},) and links[1].args == ()
    assert links[2].kwargs == {"run_id": "run-1", "index": 2, "version": 1}
    for index, link in enumerate(links):
        (errback,) = map(signature, link.options["link_error"])
        assert errback.task == "sagaflow.on_step_failed" and errback.immutable
        assert tuple(errback.args) == ("run-1", index)
    assert links[0].options["soft_time_limit"] == 10 and links[0].options["time_limit"] == 15


def test_errback_tasks_are_bound_so_celery_sends_them_as_messages():
    # celery-facts.md 0.3: a bind=True errback is published as a task, not called in the failing process.
    for name in ("sagaflow.on_step_failed", "sagaflow.on_compensation_failed"):
        # Celery's _call_task_errbacks calls an errback in-process unless its __header__ is a partial,
        # which is what bind=True makes it.
        assert isinstance(celery_app.tasks[name].__header__, functools.partial)


def test_backward_chain_undoes_the_given_steps_in_order_then_finishes():
    saga = registry.get("collect_payment")
    links = compile_compensation(celery_app, saga, "run-2", [1, 0]).tasks
    assert [s.task for s in links] == [
        "collect_payment.create_invoice.compensate", "collect_payment.process_payment.compensate",
    ]  # no finish task: the last undo's completion ends the run
    assert all(link.immutable for link in links)
    assert [tuple(signature(link.options["link_error"][0]).args) for link in links] == [("run-2", 1), ("run-2", 0)]


def test_a_resumed_chain_starts_at_the_given_step_with_the_results_so_far():
    # What the recovery sweeper publishes for a run that stalled at step 2.
    saga = registry.get("create_booking")
    results = {"create_invoice": {"invoice_id": "i"}, "send_email": {"message_id": "m"}}
    links = compile_run(celery_app, saga, "run-3", start=2, results=results).tasks
    assert [s.task for s in links] == ["create_booking.send_whatsapp", "create_booking.add_calendar"]
    assert links[0].args == (results,) and links[1].args == ()
    assert [tuple(signature(link.options["link_error"][0]).args) for link in links] == [("run-3", 2), ("run-3", 3)]
    finish = compile_run(celery_app, saga, "run-3", start=4, results=results)  # only the finishing is left
    assert finish.task == "sagaflow.finish" and finish.args == (results,)
    assert tuple(signature(finish.options["link_error"][0]).args) == ("run-3", 4)


def test_every_step_task_has_the_default_time_limit_which_a_step_timeout_overrides_per_message():
    from sagaflow.app import get_settings

    default = get_settings().default_step_timeout
    step_tasks = [t for name, t in celery_app.tasks.items() if name.startswith("create_booking.")]
    assert len(step_tasks) == 8  # 4 actions, 4 compensations
    for t in step_tasks:
        assert (t.soft_time_limit, t.time_limit) == (default, default + 5), t.name


def test_a_long_saga_is_published_in_windows_whose_last_step_publishes_the_next():
    from sagaflow import Saga, Step
    from sagaflow.runtime.compiler import CHAIN_WINDOW

    saga = Saga("windowed", [Step(f"s{i}", lambda ctx: None) for i in range(CHAIN_WINDOW * 2 + 3)], register=False)
    first = compile_run(celery_app, saga, "run-4").tasks
    assert [s.task for s in first] == [f"windowed.s{i}" for i in range(CHAIN_WINDOW)]
    assert [bool(s.kwargs.get("window_end")) for s in first] == [False] * (CHAIN_WINDOW - 1) + [True]
    last = compile_run(celery_app, saga, "run-4", start=CHAIN_WINDOW * 2, results={"x": 1}).tasks
    assert [s.task for s in last] == [f"windowed.s{i}" for i in range(CHAIN_WINDOW * 2, CHAIN_WINDOW * 2 + 3)]
    assert not any(s.kwargs.get("window_end") for s in last)  # the saga's last step finishes the run instead
    assert last[0].args == ({"x": 1},)


def test_gates_child_steps_and_groups_end_chains_and_a_group_fans_out_without_a_chord():
    from sagaflow import Parallel, Saga, Step
    from sagaflow.runtime.compiler import Fanout

    def noop(ctx):
        return None

    saga = Saga("t_segments", [Step("a", noop), Step("b", noop), Parallel(Step("c", noop), Step("d", noop)),
                               Step("e", noop)], register=False)
    saga.gate("approve", signal="approved", timeout=60)
    saga.step(noop, name="f")
    first = compile_run(celery_app, saga, "r").tasks
    assert [s.task for s in first] == ["t_segments.a", "t_segments.b"]
    assert first[-1].kwargs["window_end"] is True  # b publishes the group
    group = compile_run(celery_app, saga, "r", start=2, results={"a": 1})
    assert isinstance(group, Fanout)
    assert [(s.task, s.args, s.kwargs["branch"]) for s in group.tasks] == [
        ("t_segments.c", ({"a": 1},), True), ("t_segments.d", ({"a": 1},), True)]
    assert compile_run(celery_app, saga, "r", start=3).tasks[0].task == "t_segments.c"  # a group is whole
    after = compile_run(celery_app, saga, "r", start=4)
    assert [s.task for s in after.tasks] == ["t_segments.e", "t_segments.approve"]
    assert after.tasks[-1].kwargs["window_end"] is True  # the gate publishes f once it passes
    last = compile_run(celery_app, saga, "r", start=6)
    assert "window_end" not in (last.tasks[0].kwargs if hasattr(last, "tasks") else last.kwargs)
