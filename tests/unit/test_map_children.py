"""Maps whose items are child runs (issue 18): how one is defined (Python, the plain form, YAML), and the
definitions refused, with an error that names the step (and the line, in YAML)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sagaflow import DefinitionError, Map, Saga, SagaFileError, StepKind
from sagaflow.model import StepSpec
from sagaflow.model.declarative import HandlerRegistry
from tests.helpers import load_yaml_sagas


def act(ctx):
    return ctx.item


def test_a_map_of_child_runs_in_python_names_its_saga_and_undoes_its_children():
    saga = Saga("mk_py", register=False)
    step = saga.map("quotes", child="get_quote", items=lambda ctx: ctx.input["suppliers"], concurrency=5,
                    input=lambda ctx: {"supplier": ctx.item})
    assert saga.steps == [step]
    assert step.kind is StepKind.MAP and step.child_saga == "get_quote" and step.action is None
    assert step.map_concurrency == 5 and step.runs_children
    assert step.child_input(SimpleNamespace(item="acme")) == {"supplier": "acme"}
    spec = StepSpec.of(step)
    assert spec.has_compensation and spec.non_atomic  # its undo compensates the children that succeeded


def test_the_plain_form_takes_a_child_instead_of_an_action():
    step = Map("quotes", child="get_quote", items=lambda ctx: [])
    assert step.child_saga == "get_quote" and step.child_input is None and step.map_concurrency == 10


def test_a_map_with_both_an_action_and_a_child_is_refused():
    with pytest.raises(DefinitionError, match="map 'quotes': a map has either an action .* or a child saga"):
        Map("quotes", act, lambda ctx: [], child="get_quote")
    saga = Saga("mk_both", register=False)
    with pytest.raises(DefinitionError, match="map 'act': a map has either an action or a child saga, never both"):
        saga.map(act, child="get_quote", items=lambda ctx: [])
    assert saga.steps == []


def test_a_map_with_neither_an_action_nor_a_child_is_refused():
    with pytest.raises(DefinitionError, match="never both and never neither"):
        Map("quotes", None, lambda ctx: [])


@pytest.mark.parametrize("options, message", [
    (dict(child="not a name"), "map 'quotes': saga must be a saga name, got 'not a name'"),
    (dict(child="get_quote", input={"x": 1}), r"map 'quotes': input must be callable \(ctx -> dict\)"),
    (dict(child="get_quote", concurrency=0), "concurrency must be an integer >= 1"),
])
def test_a_bad_map_of_child_runs_is_refused(options, message):
    saga = Saga("mk_bad", register=False)
    with pytest.raises(DefinitionError, match=message):
        saga.map("quotes", items=lambda ctx: [], **options)
    assert saga.steps == []


def test_a_name_or_an_input_without_a_child_is_refused():
    saga = Saga("mk_noname", register=False)
    with pytest.raises(DefinitionError, match="go with child="):
        saga.map("quotes", items=lambda ctx: [])
    with pytest.raises(DefinitionError, match="needs a name"):
        saga.map(child="get_quote", items=lambda ctx: [])


def test_an_input_on_a_step_that_starts_no_child_is_refused():
    with pytest.raises(DefinitionError, match="only a child step or a map names a child saga"):
        Map("each", act, lambda ctx: [], input=lambda ctx: {})


@pytest.fixture
def hreg():
    reg = HandlerRegistry()
    reg.register("act", act)
    return reg


def test_a_map_of_child_runs_in_yaml(tmp_path, hreg):
    [saga] = load_yaml_sagas(tmp_path, hreg, """
        sagas:
          - name: mk_yaml
            steps:
              - {action: act}
              - {map: quotes, child: get_quote, items: input.suppliers, concurrency: 5}
        """)
    step = saga.steps[1]
    assert step.kind is StepKind.MAP and step.child_saga == "get_quote" and step.map_concurrency == 5
    assert step.action is None and step.child_input is None  # each child's input: {"item": ..., "index": ...}


@pytest.mark.parametrize("entry, message", [
    ("{map: quotes, action: act, child: get_quote, items: input.xs}",
     r"sagas.yaml:4: .*map 'quotes': a map has either an action .* or a child .*never both"),
    ("{map: quotes, items: input.xs}", r"sagas.yaml:4: .*never both and never neither"),
    ("{map: quotes, child: 'no such', items: input.xs}", r"sagas.yaml:4: .*child must be a saga name"),
    ("{map: quotes, child: get_quote}", "a map step needs the key 'items'"),
])
def test_a_bad_map_of_child_runs_in_yaml_is_refused_naming_the_line(tmp_path, hreg, entry, message):
    with pytest.raises(SagaFileError, match=message):
        load_yaml_sagas(tmp_path, hreg, f"""
            sagas:
              - name: mk_bad
                steps:
                  - {entry}
            """)


# ---------------------------------------------------------------------------------------------- the harness

harness_kid = Saga("harness_kid")
KID_UNDONE: list[int] = []


@harness_kid.step
def kid_price(ctx):
    if ctx.input["item"] == "bad":
        from sagaflow import NonRetryableError

        raise NonRetryableError(f"item {ctx.input['index']} is bad")
    return {"price": len(ctx.input["item"]), "index": ctx.input["index"]}


@kid_price.compensation
def kid_unprice(ctx):
    KID_UNDONE.append(ctx.input["index"])


harness_kids = Saga("harness_kids")
harness_kids.map("quotes", child="harness_kid", items=lambda ctx: ctx.input["xs"], concurrency=2)


def test_a_map_of_child_runs_runs_in_the_testing_harness_as_on_a_worker():
    from sagaflow.app import get_store
    from sagaflow.testing import SagaHarness

    with SagaHarness() as harness:
        run = harness.run("harness_kids", {"xs": ["a", "bb", "ccc"]})
        assert run.status == "succeeded", run
        assert run.step("quotes").result == [{"kid_price": {"price": n + 1, "index": n}} for n in range(3)]
        KID_UNDONE.clear()
        failed = harness.run("harness_kids", {"xs": ["a", "bb", "bad", "dddd", "e"]})
        assert failed.status == "compensated", failed
        assert "item 2 failed: child run" in failed.step("quotes").error
        items = get_store().map_summary(failed.id)[0]["items"]
        completed = {it["item"] for it in items if it["status"] == "compensated"}
        # every child that succeeded (before item 2 failed, or beside it) is undone, once
        assert completed and sorted(KID_UNDONE) == sorted(completed) and 2 not in completed
        assert {it["status"] for it in items} <= {"compensated", "failed", "skipped"}
