"""Declarative sagas: handlers by name, and a saga file checked at load time with errors that name the
file, the line, the saga, the step and the handler."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sagaflow import DefinitionError, RetryKind, RetryPolicy, Saga, SagaFileError, Step, handler
from sagaflow.app import celery_app
from sagaflow.config.settings import Settings
from sagaflow.model.declarative import HandlerRegistry, load_saga_file, load_saga_files
from sagaflow.model.declarative import handlers as global_handlers
from sagaflow.model.definition import DEFAULT_COMPENSATION_RETRY, DEFAULT_RETRY, Registry
from sagaflow.runtime.compiler import compile_run
from tests.conftest import ROOT


def ingest(ctx):
    return {"upload_id": 1}


def delete_uploaded_file(ctx):
    return None


def parse(ctx):
    return {"document_id": 2}


@pytest.fixture
def hreg():
    reg = HandlerRegistry()
    for fn in (ingest, delete_uploaded_file, parse):
        reg.register(fn.__name__, fn)
    return reg


@pytest.fixture
def sreg():
    return Registry()


@pytest.fixture
def write(tmp_path):
    def write(text: str, name: str = "sagas.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


@pytest.fixture
def load(write, hreg, sreg):
    def load(text: str):
        return load_saga_file(write(text), handlers=hreg, registry=sreg)

    return load


@pytest.fixture
def error(write, hreg, sreg):
    def error(text: str) -> SagaFileError:
        path = write(text)
        with pytest.raises(SagaFileError) as info:
            load_saga_file(path, handlers=hreg, registry=sreg)
        assert str(info.value).startswith(str(path))
        assert sreg.all() == []  # all or nothing
        return info.value

    return error


VALID = """
sagas:
  - name: ingest_document
    version: 2
    defaults:
      retry: {kind: linear, max_attempts: 4, initial_interval: 0.5, increment: 1, max_interval: 3, jitter: false}
      timeout: 30
    steps:
      - action: ingest
        compensation: delete_uploaded_file
        retry: {kind: fixed, initial_interval: 0.2, jitter: off}
        compensation_retry: {max_attempts: 7}
      - name: parse_again
        action: parse
        timeout: 5
        lease: 2
        queue: heavy
  - name: only_parse
    steps:
      - {action: parse}
"""


# ---------------------------------------------------------------------------------------------- valid files


def test_a_valid_file_registers_its_sagas_with_handlers_options_and_defaults(load, sreg):
    sagas = load(VALID)

    assert [(s.name, s.version) for s in sagas] == [("ingest_document", 2), ("only_parse", 1)]
    assert sreg.get("ingest_document") is sagas[0] and sreg.get("only_parse", 1) is sagas[1]
    first, second = sagas[0].steps
    assert (first.name, first.action, first.compensate) == ("ingest", ingest, delete_uploaded_file)
    assert first.retry == RetryPolicy(kind="fixed", initial_interval=0.2, jitter=False)  # its own, not merged
    assert first.compensation_retry == RetryPolicy(max_attempts=7)
    assert first.timeout == 30 and first.queue is None
    assert (second.name, second.action, second.compensate) == ("parse_again", parse, None)
    assert second.retry.kind is RetryKind.LINEAR and [second.retry.delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.5, 2.5, 3]
    assert second.compensation_retry is DEFAULT_COMPENSATION_RETRY
    assert (second.timeout, second.lease, second.queue) == (5, 2, "heavy") and first.lease is None
    assert sagas[1].steps[0].retry is DEFAULT_RETRY


def test_loaded_sagas_compile_like_python_ones(load):
    saga = load(VALID)[0]
    links = compile_run(celery_app, saga, "run-1").tasks
    assert [s.task for s in links] == ["ingest_document.ingest", "ingest_document.parse_again"]
    assert links[0].kwargs["version"] == 2
    assert links[0].options["soft_time_limit"] == 30 and links[1].options["soft_time_limit"] == 5
    assert links[1].options["queue"] == "heavy"


def test_loading_the_same_unchanged_file_again_changes_nothing(write, hreg, sreg):
    path = write(VALID)
    first = load_saga_file(path, handlers=hreg, registry=sreg)
    assert load_saga_files([path, path], handlers=hreg, registry=sreg) == first + first
    assert len(sreg.all()) == 2


def test_changing_a_loaded_file_without_a_new_version_is_refused(write, hreg, sreg):
    path = write(VALID)
    load_saga_file(path, handlers=hreg, registry=sreg)
    write(VALID.replace("timeout: 5", "timeout: 6"))
    with pytest.raises(SagaFileError, match=r"saga 'ingest_document' version 2: is already registered \(by a "
                                            r"saga file, with other steps or options\); bump the version"):
        load_saga_file(path, handlers=hreg, registry=sreg)


def test_a_file_edited_to_add_a_version_loads_again_and_registers_only_the_new_one(write, hreg, sreg):
    path = write(VALID)
    v2, only_parse = load_saga_file(path, handlers=hreg, registry=sreg)
    write(VALID + "  - name: ingest_document\n    version: 3\n    steps: [{action: parse}]\n")
    again = load_saga_file(path, handlers=hreg, registry=sreg)
    assert again[:2] == [v2, only_parse]  # the very objects registered the first time
    assert [(s.name, s.version) for s in sreg.all()] == [("ingest_document", 2), ("ingest_document", 3),
                                                          ("only_parse", 1)]
    assert sreg.get("ingest_document") is again[2]


def test_a_saga_that_a_module_already_registered_is_refused_and_nothing_is_registered(write, hreg, sreg):
    sreg.add(Saga("only_parse", [Step("x", parse)], register=False))
    with pytest.raises(SagaFileError, match=r"saga 'only_parse' version 1: is already registered \(by a Python"):
        load_saga_file(write(VALID), handlers=hreg, registry=sreg)
    assert [s.name for s in sreg.all()] == ["only_parse"]


def test_the_shipped_example_file_loads_with_the_handlers_of_tasks(sreg):
    from sagaflow import tasks  # noqa: F401  registers the handlers

    (saga,) = load_saga_file(ROOT / "config" / "sagas.yaml", registry=sreg)
    assert (saga.name, saga.version) == ("ingest_document", 1)
    assert [(s.name, s.action.__name__, s.compensate.__name__) for s in saga.steps] == [
        ("ingest", "ingest_upload", "delete_uploaded_file"),
        ("parse", "parse_document", "delete_parsed_document"),
        ("embed", "embed_chunks", "delete_embeddings"),
        ("publish", "expose_index", "unpublish"),
    ]
    assert [s.retry.kind.value for s in saga.steps] == ["fixed", "linear", "exponential", "exponential"]


def test_json_is_yaml_too(write, hreg, sreg):
    path = write('{"sagas": [{"name": "j", "steps": [{"action": "ingest", "compensation": "delete_uploaded_file"}]}]}',
                 name="sagas.json")
    (saga,) = load_saga_file(path, handlers=hreg, registry=sreg)
    assert saga.steps[0].compensate is delete_uploaded_file


def test_yaml_anchors_share_a_retry_policy_and_merge_keys_may_be_overridden(load):
    (saga,) = load("""
        sagas:
          - name: anchored
            steps:
              - action: ingest
                retry: &quick {kind: fixed, initial_interval: 0.1, max_attempts: 2}
              - action: parse
                retry: {<<: *quick, max_attempts: 5}
        """)
    assert saga.steps[0].retry == RetryPolicy(kind="fixed", initial_interval=0.1, max_attempts=2)
    assert saga.steps[1].retry == RetryPolicy(kind="fixed", initial_interval=0.1, max_attempts=5)


def test_settings_resolve_saga_files_to_absolute_paths_and_pass_them_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({"SAGAFLOW_SAGA_FILES": "a.yaml, sub/b.yaml,"})
    assert settings.saga_files == (tmp_path / "a.yaml", tmp_path / "sub" / "b.yaml")
    assert Settings.from_env(settings.as_env()).saga_files == settings.saga_files
    assert Settings.from_env({}).saga_files == ()


# ---------------------------------------------------------------------------------------------- handlers


def test_handler_decorator_forms_and_clashes():
    reg = HandlerRegistry()

    @handler(registry=reg)
    def plain(ctx):
        return 1

    @handler("renamed", registry=reg)
    def original(ctx):
        return 2

    assert reg.get("plain") is plain and reg.get("renamed") is original and reg.get("original") is None
    assert reg.names() == ["plain", "renamed"]
    with pytest.raises(DefinitionError, match=r"handler 'plain' is already registered by .*test_declarative"):
        reg.register("plain", lambda ctx: None)
    with pytest.raises(DefinitionError, match="handler name 'a-b' must be an identifier"):
        reg.register("a-b", plain)
    with pytest.raises(DefinitionError, match="handler 'x' must be callable"):
        reg.register("x", 3)


def test_the_examples_register_their_handlers_in_the_global_registry():
    from sagaflow.tasks.ingest import delete_uploaded_file, ingest_upload

    assert global_handlers.get("ingest") is ingest_upload
    assert global_handlers.get("delete_uploaded_file") is delete_uploaded_file


# ---------------------------------------------------------------------------------------------- errors


def test_an_unknown_action_handler_names_file_line_saga_step_and_handler(error):
    exc = error("""
        sagas:
          - name: ingest_document
            steps:
              - action: ingest
                compensation: delete_uploaded_file
              - action: parze
        """)
    assert str(exc) == (
        f"{exc.path}:6: saga 'ingest_document' version 1, step 'parze': unknown handler 'parze' for the action "
        f"(did you mean 'parse'?); registered handlers: delete_uploaded_file, ingest, parse")
    assert (exc.line, exc.saga, exc.version, exc.step, exc.handler) == (6, "ingest_document", 1, "parze", "parze")


def test_an_unknown_compensation_handler_is_named_too(error):
    exc = error("""
        sagas:
          - name: ingest_document
            version: 3
            steps:
              - name: upload
                action: ingest
                compensation: delete_uploaded_fil
        """)
    assert "sagas.yaml:7: saga 'ingest_document' version 3, step 'upload': unknown handler 'delete_uploaded_fil' " \
           "for the compensation (did you mean 'delete_uploaded_file'?)" in str(exc)
    assert exc.handler == "delete_uploaded_fil"


def test_with_no_handlers_registered_the_error_says_where_they_come_from(write, sreg):
    path = write("sagas:\n  - {name: s, steps: [{action: ingest}]}\n")
    with pytest.raises(SagaFileError, match="unknown handler 'ingest' for the action; no handlers are registered: "
                                            "the modules in SAGAFLOW_IMPORTS register them with @handler"):
        load_saga_file(path, handlers=HandlerRegistry(), registry=sreg)


@pytest.mark.parametrize("text,line,message", [
    # unknown keys, at every level, with a hint
    ("sagas: []\nextra: 1\n", 2, "unknown key 'extra' in the file; allowed: sagas"),
    ("sagas:\n  - name: s\n    stepz: []\n", 3,
     "saga 's' version 1: unknown key 'stepz' in a saga (did you mean 'steps'?)"),
    ("sagas:\n  - name: s\n    steps:\n      - action: ingest\n        timout: 3\n", 5,
     "saga 's' version 1, step 'ingest': unknown key 'timout' in a step (did you mean 'timeout'?)"),
    ("sagas:\n  - name: s\n    steps:\n      - action: ingest\n        retry: {kind: fixed, interval: 1}\n", 5,
     "step 'ingest': unknown key 'interval' in 'retry'"),
    ("sagas:\n  - name: s\n    defaults: {compensation: parse}\n    steps: [{action: ingest}]\n", 3,
     "saga 's' version 1: unknown key 'compensation' in defaults (did you mean 'compensation_retry'?); allowed: "
     "compensation_retry, compensation_timeout, lease, queue, retry, timeout"),
    ("sagas:\n  - name: s\n    steps:\n      - action: ingest\n        lease: -1\n", 5,
     "step 'ingest': lease must be a number of seconds > 0, got an integer -1"),
    # missing or malformed structure
    ("", None, "the file is empty; it needs a `sagas:` list"),
    ("- 1\n", 1, "the file must be a mapping, got a list"),
    ("sagas: {name: s}\n", 1, "sagas must be a list, got a mapping"),
    ("sagas:\n  - steps: [{action: ingest}]\n", 2, "a saga needs the key 'name'"),
    ("sagas:\n  - name: s\n", 2, "a saga needs the key 'steps'"),
    ("sagas:\n  - name: s\n    steps: []\n", 3, "saga 's' version 1: steps must be a non-empty list, got a list"),
    ("sagas:\n  - name: s\n    steps: ingest\n", 3, "steps must be a non-empty list, got a string"),
    ("sagas:\n  - name: s\n    steps: [ingest]\n", 3, "a step must be a mapping, got a string"),
    ("sagas:\n  - name: s\n    steps:\n      - compensation: parse\n", 4, "a step needs the key 'action'"),
    # wrong types
    ("sagas:\n  - name: bad name\n    steps: [{action: ingest}]\n", 2,
     "saga name must be an identifier (letters, digits, underscore), got 'bad name'"),
    ("sagas:\n  - name: s\n    version: '2'\n    steps: [{action: ingest}]\n", 3,
     "version must be an integer >= 1, got a string '2'"),
    ("sagas:\n  - name: s\n    version: 0\n    steps: [{action: ingest}]\n", 3, "version must be an integer >= 1"),
    ("sagas:\n  - name: s\n    steps:\n      - action: 7\n", 4,
     "action must be a handler name (a string), got an integer 7"),
    ("sagas:\n  - name: s\n    steps:\n      - action: ingest\n        name: a.b\n", 5,
     "step name must be an identifier (letters, digits, underscore), got 'a.b'"),
    ("sagas:\n  - name: s\n    steps:\n      - action: ingest\n        timeout: ten\n", 5,
     "step 'ingest': timeout must be a number of seconds > 0, got a string 'ten'"),
    ("sagas:\n  - name: s\n    steps:\n      - action: ingest\n        timeout: 0\n", 5,
     "timeout must be a number of seconds > 0"),
    ("sagas:\n  - name: s\n    steps:\n      - action: ingest\n        queue: 5\n", 5,
     "queue must be a non-empty string"),
    ("sagas:\n  - name: s\n    steps:\n      - action: ingest\n        retry: 3\n", 5,
     "'retry' must be a mapping, got an integer"),
    ("sagas:\n  - name: s\n    steps:\n      - action: ingest\n        retry:\n          max_attempts: three\n", 6,
     "retry.max_attempts must be an integer, got a string 'three'"),
    ("sagas:\n  - name: s\n    steps:\n      - action: ingest\n        retry: {jitter: maybe}\n", 5,
     "retry.jitter must be true or false, got a string 'maybe'"),
    ("sagas:\n  - name: s\n    steps:\n      - action: ingest\n        retry: {initial_interval: '1s'}\n", 5,
     "retry.initial_interval must be a number, got a string '1s'"),
    ("sagas:\n  - name: s\n    steps:\n      - action: ingest\n        compensation_retry: {kind: random}\n", 5,
     "step 'ingest': compensation_retry: retry kind must be one of 'exponential', 'linear', 'fixed', got 'random'"),
    ("sagas:\n  - name: s\n    steps:\n      - action: ingest\n        retry: {kind: linear, backoff: 3}\n", 5,
     "retry: backoff applies to kind 'exponential' only, got backoff=3 with kind 'linear'"),
    ("sagas:\n  - name: s\n    steps:\n      - action: ingest\n        retry: {max_attempts: 0}\n", 5,
     "retry: max_attempts must be an integer >= 1, got 0"),
    ("sagas:\n  - name: s\n    description: 5\n    steps: [{action: ingest}]\n", 3, "description must be a string"),
    ("sagas:\n  - name: s\n    steps: [{action: ingest}]\n    1: x\n", 4, "keys must be strings, got an integer 1"),
    # duplicates
    ("sagas:\n  - name: s\n    steps:\n      - action: ingest\n      - action: ingest\n", 5,
     "saga 's' version 1, step 'ingest': duplicate step name 'ingest'; give one of them its own `name:`"),
    ("sagas:\n  - name: s\n    steps:\n      - {name: a, action: ingest}\n      - {name: a, action: parse}\n", 5,
     "duplicate step name 'a'"),
    ("sagas:\n  - name: s\n    steps:\n      - action: ingest\n        retry: {max_attempts: 2}\n"
     "        retry: {max_attempts: 9}\n", 6, "duplicate key 'retry'"),
    ("sagas:\n  - {name: s, steps: [{action: ingest}]}\n  - {name: s, steps: [{action: parse}]}\n", 3,
     "saga 's' version 1: defined twice in this file; bump the version"),
    # not YAML
    ("sagas:\n  - name: s\n    steps: [{action: ingest}\n", 4, "not valid YAML"),
])
def test_invalid_files_are_refused_with_the_file_line_and_what_is_wrong(error, text, line, message):
    exc = error(text)
    assert exc.line == line, str(exc)
    assert message in str(exc)
    assert str(exc).startswith(f"{exc.path}:{line}: " if line else f"{exc.path}: ")


def test_a_missing_file_is_named(tmp_path, hreg, sreg):
    with pytest.raises(SagaFileError, match=r"nope\.yaml: cannot read the saga file: No such file or directory"):
        load_saga_file(tmp_path / "nope.yaml", handlers=hreg, registry=sreg)


def test_a_file_that_is_not_utf8_is_named(tmp_path, hreg, sreg):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("sagas: [] # caf\xe9\n".encode("latin-1"))
    with pytest.raises(SagaFileError, match=r"latin1\.yaml: the saga file is not UTF-8 text"):
        load_saga_file(path, handlers=hreg, registry=sreg)


def test_one_bad_saga_registers_none_of_the_file(error):
    error(VALID + "  - name: third\n    steps: [{action: nowhere}]\n")


# ---------------------------------------------------------------------------------------------- issue-5 shapes

def test_step_flags_parallel_groups_gates_and_child_steps_in_a_file(load):
    from sagaflow import StepKind

    (saga,) = load("""
        sagas:
          - name: shaped
            steps:
              - {action: ingest, compensation: delete_uploaded_file, non_atomic: true}
              - parallel:
                  - {name: left, action: parse, best_effort: true}
                  - {name: right, action: parse, compensation: delete_uploaded_file}
              - {gate: approve, signal: approved, timeout: 3600}
              - {child: publish_all, saga: only_parse}
              - {name: commit, action: parse, pivot: true}
        """)
    assert [s.name for s in saga.steps] == ["ingest", "left", "right", "approve", "publish_all", "commit"]
    assert saga.steps[0].non_atomic and saga.steps[1].best_effort and saga.steps[5].pivot
    assert [s.group for s in saga.steps] == [None, 1, 1, None, None, None]
    assert saga.steps[3].kind is StepKind.GATE and (saga.steps[3].signal, saga.steps[3].timeout) == ("approved", 3600)
    assert saga.steps[4].kind is StepKind.CHILD and saga.steps[4].child_saga == "only_parse"
    assert not saga.linear


def test_child_steps_as_branches_of_a_parallel_group_in_a_file(load):
    from sagaflow import StepKind

    (saga,) = load("""
        sagas:
          - name: suppliers
            steps:
              - {action: ingest, compensation: delete_uploaded_file}
              - parallel:
                  - {child: supplier_a, saga: only_parse}
                  - {child: supplier_b, saga: only_parse, compensation: delete_uploaded_file}
                  - {name: local, action: parse}
              - {name: total, action: parse}
        """)
    assert [(s.name, s.kind, s.group) for s in saga.steps] == [
        ("ingest", StepKind.ACTION, None), ("supplier_a", StepKind.CHILD, 1), ("supplier_b", StepKind.CHILD, 1),
        ("local", StepKind.ACTION, 1), ("total", StepKind.ACTION, None)]
    assert saga.steps[2].compensate is not None


@pytest.mark.parametrize("steps, line, message", [
    ("      - {action: ingest, pivot: yes please}\n", 4, "pivot must be true or false"),
    ("      - {parallel: [{action: ingest}]}\n", 4, "parallel must list at least two steps"),
    ("      - parallel:\n          - {action: ingest}\n"
     "          - {parallel: [{action: parse}, {name: p2, action: parse}]}\n",
     6, "parallel groups do not nest"),
    ("      - parallel:\n          - {action: ingest}\n          - {action: parse, pivot: true}\n", 6,
     "cannot be in a parallel group"),
    ("      - parallel:\n          - {action: ingest}\n          - {sleep: nap, seconds: 5}\n", 6,
     "a gate, a sleep, a map or a pivot cannot be in a parallel group"),
    ("      - {gate: approve, signal: approved}\n", 4, "a gate step needs the key 'timeout'"),
    ("      - {gate: approve, signal: approved, timeout: 5, action: ingest}\n", 4, "unknown key 'action'"),
    ("      - {child: sub, saga: 'not a name'}\n", 4, "saga must be a saga name"),
    ("      - {action: ingest}\n      - parallel:\n          - {action: parse}\n          - {action: ingest}\n", 7,
     "duplicate step name 'ingest'"),
])
def test_bad_issue_5_shapes_name_the_line_and_the_problem(error, steps, line, message):
    failure = error("sagas:\n  - name: s\n    steps:\n" + steps)
    assert message in str(failure) and failure.line == line, (str(failure), failure.line)


def test_a_saga_deadline_and_a_compensation_timeout_are_read_and_checked(load, error):
    saga = load("""
sagas:
  - name: with_limits
    deadline: 120
    defaults: {compensation_timeout: 40}
    steps:
      - {action: ingest, compensation: delete_uploaded_file, compensation_timeout: 9.5}
      - {action: parse}
""")[0]
    assert saga.deadline == 120
    assert [s.compensation_timeout for s in saga.steps] == [9.5, 40]


def test_a_bad_deadline_or_compensation_timeout_is_refused(error):
    for bad, message in (("deadline: 0", "deadline must be a number of seconds > 0"),
                         ("deadline: soon", "deadline must be a number of seconds > 0"),
                         ("defaults: {compensation_timeout: -1}", "compensation_timeout must be a number of seconds")):
        assert message in str(error(f"""
sagas:
  - name: bad_limits
    {bad}
    steps:
      - {{action: parse}}
"""))
