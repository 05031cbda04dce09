"""Sagas for the tests of signals (the test worker imports this module: SAGAFLOW_IMPORTS): approval gates
and child sagas. Every action and undo records its effect once (tasks/effects.py), with the usual knobs
(fail_at, fail_compensation, sleep) read from the run's input; a child run reads them from its own input,
which its parent builds from the parent's ``child`` key."""

from sagaflow import RetryPolicy, Saga, StepContext, handler
from sagaflow.model.declarative import parse_saga_file
from sagaflow.model.definition import registry
from sagaflow.tasks.effects import do, undo

FAST = RetryPolicy(max_attempts=3, initial_interval=0.05, backoff=2.0, max_interval=0.5)


def _action(name: str):
    def action(ctx: StepContext):
        do(ctx)
        return {"step": name, "seen": sorted(ctx.results)}

    action.__name__ = name
    return action


# ---------------------------------------------------------------------------------------------- gates

# reserve -> approve (gate, signal "approved") -> charge: charge returns what the approver sent.
approval = Saga("approval")


@approval.step(retry=FAST, compensation_retry=FAST)
def reserve(ctx: StepContext):
    do(ctx)
    return {"reserved": True}


@reserve.compensation
def release(ctx: StepContext):
    undo(ctx)


approval.gate("approve", signal="approved", timeout=120)


@approval.step(retry=FAST, compensation_retry=FAST)
def charge(ctx: StepContext):
    do(ctx)
    return {"approved_by": (ctx.results["approve"] or {}).get("by"), "reserved": ctx.results["reserve"]}


@charge.compensation
def refund(ctx: StepContext):
    undo(ctx)


# The same shape with a 1-second gate, for the timeout.
approval_quick = Saga("approval_quick")


@approval_quick.step(retry=FAST, compensation_retry=FAST)
def hold(ctx: StepContext):
    do(ctx)
    return {"held": True}


@hold.compensation
def unhold(ctx: StepContext):
    undo(ctx)


approval_quick.gate("sign_off", signal="signed", timeout=1)


@approval_quick.step(retry=FAST)
def ship(ctx: StepContext):
    do(ctx)
    return {"shipped": True}


# A gate as the last step: its signal finishes the run.
approval_last = Saga("approval_last")


@approval_last.step(retry=FAST, compensation_retry=FAST)
def draft(ctx: StepContext):
    do(ctx)
    return {"draft": 1}


@draft.compensation
def discard(ctx: StepContext):
    undo(ctx)


approval_last.gate("publish", signal="go", timeout=120)


# ---------------------------------------------------------------------------------------------- children

# A plain linear saga (the fast path), run as a child: c_reserve -> c_charge, each undone.
child_booking = Saga("child_booking")


@child_booking.step(retry=FAST, compensation_retry=FAST)
def c_reserve(ctx: StepContext):
    do(ctx)
    return {"seat": "12A", "input": ctx.input}


@c_reserve.compensation
def c_release(ctx: StepContext):
    undo(ctx)


@child_booking.step(retry=FAST, compensation_retry=FAST)
def c_charge(ctx: StepContext):
    do(ctx)
    return {"charged": ctx.results["c_reserve"]["seat"]}


@c_charge.compensation
def c_refund(ctx: StepContext):
    undo(ctx)


# p_book -> booking (child: child_booking, input from the parent's "child" key) -> p_confirm.
trip = Saga("trip")


@trip.step(retry=FAST, compensation_retry=FAST)
def p_book(ctx: StepContext):
    do(ctx)
    return {"trip": ctx.run_id[:8]}


@p_book.compensation
def p_unbook(ctx: StepContext):
    undo(ctx)


trip.child("booking", saga="child_booking", input=lambda ctx: {**ctx.input.get("child", {}),
                                                                 "trip": ctx.results["p_book"]["trip"]})


@trip.step(retry=FAST, compensation_retry=FAST)
def p_confirm(ctx: StepContext):
    do(ctx)
    return {"seat": ctx.results["booking"]["c_reserve"]["seat"]}


@p_confirm.compensation
def p_unconfirm(ctx: StepContext):
    undo(ctx)


# A child step with a compensation of its own: it runs once the child run is undone.
trip_undo = Saga("trip_undo")


@trip_undo.step(retry=FAST, compensation_retry=FAST)
def t_book(ctx: StepContext):
    do(ctx)
    return {"trip": ctx.run_id[:8]}


@t_book.compensation
def t_unbook(ctx: StepContext):
    undo(ctx)


trip_undo.child("t_booking", saga="child_booking", input=lambda ctx: {}, compensation=undo)


@trip_undo.step(retry=FAST)
def t_confirm(ctx: StepContext):
    do(ctx)
    return {}


# A child that waits at a gate of its own: trip_approval -> (child: approval) -> its gate "approved".
trip_approval = Saga("trip_approval")


@trip_approval.step(retry=FAST, compensation_retry=FAST)
def a_book(ctx: StepContext):
    do(ctx)
    return {"booked": True}


@a_book.compensation
def a_unbook(ctx: StepContext):
    undo(ctx)


trip_approval.child("approval_run", saga="approval", input=lambda ctx: {})


# A gate whose saga declares its payload required: an empty signal is refused (the status page's form too).
approval_signed = Saga("approval_signed")


@approval_signed.step(retry=FAST, compensation_retry=FAST)
def earmark(ctx: StepContext):
    do(ctx)
    return {"earmarked": True}


@earmark.compensation
def unearmark(ctx: StepContext):
    undo(ctx)


approval_signed.gate("countersign", signal="countersigned", timeout=300, payload_required=True)


@approval_signed.step(retry=FAST)
def pay_out(ctx: StepContext):
    do(ctx)
    return {"signed_by": ctx.results["countersign"].get("by")}


# ---------------------------------------------------------------------------------------------- children in parallel

KIDS = ("kid_a", "kid_b", "kid_c")


def _kid_input(name: str):
    """A branch's child input: the parent's ``kids.<branch>`` knobs (fail_at, sleep... for the child's steps)."""
    return lambda ctx: {**ctx.input.get("kids", {}).get(name, {}), "order": ctx.results["k_open"]["order"]}


# k_open -> (kid_a | kid_b | kid_c: three child runs of child_booking, at the same time) -> k_total.
kids = Saga("kids")


@kids.step(retry=FAST, compensation_retry=FAST)
def k_open(ctx: StepContext):
    do(ctx)
    return {"order": ctx.run_id[:8]}


@k_open.compensation
def k_close(ctx: StepContext):
    undo(ctx)


with kids.parallel():
    for _name in KIDS:
        kids.child(_name, saga="child_booking", input=_kid_input(_name))


@kids.step(retry=FAST, compensation_retry=FAST)
def k_total(ctx: StepContext):
    do(ctx)
    return {"charged": [ctx.results[name]["c_charge"]["charged"] for name in KIDS],
            "orders": [ctx.results[name]["c_reserve"]["input"]["order"] for name in KIDS]}


@k_total.compensation
def k_untotal(ctx: StepContext):
    undo(ctx)


# k_open -> (gated: a child waiting at its gate | failing: a child waiting at its gate, then failing when
# signalled | plain: a child_booking run): the test decides when each gated child ends.
kids_late = Saga("kids_late")
kids_late.step(k_open.action, name="k_open", retry=FAST, compensation_retry=FAST).compensation(k_close)
with kids_late.parallel():
    kids_late.child("gated", saga="approval", input=lambda ctx: {})
    kids_late.child("failing", saga="approval", input=lambda ctx: {"fail_at": "charge"})
    kids_late.child("plain", saga="child_booking", input=lambda ctx: {})


# k_open -> (two children waiting at their gates | a child_booking run whose c_charge sleeps): for the cancel.
kids_cancel = Saga("kids_cancel")
kids_cancel.step(k_open.action, name="k_open", retry=FAST, compensation_retry=FAST).compensation(k_close)
with kids_cancel.parallel():
    kids_cancel.child("gate_1", saga="approval", input=lambda ctx: {})
    kids_cancel.child("gate_2", saga="approval", input=lambda ctx: {})
    kids_cancel.child("sleepy", saga="child_booking", input=lambda ctx: {"sleep": {"c_charge": 2}})


# The same shape in the YAML form: the children take the parent's input.
handler("kids_yaml_open")(k_open.action)
handler("kids_yaml_close")(k_close)
handler("kids_yaml_total")(lambda ctx: (do(ctx), {"saw": sorted(ctx.results)})[1])
handler("kids_yaml_untotal")(undo)
KIDS_YAML = """
sagas:
  - name: kids_yaml
    defaults:
      retry: {max_attempts: 3, initial_interval: 0.05, max_interval: 0.5}
      compensation_retry: {max_attempts: 3, initial_interval: 0.05, max_interval: 0.5}
    steps:
      - {name: k_open, action: kids_yaml_open, compensation: kids_yaml_close}
      - parallel:
          - {child: y_a, saga: child_booking}
          - {child: y_b, saga: child_booking}
      - {name: y_total, action: kids_yaml_total, compensation: kids_yaml_untotal}
"""
for _saga in parse_saga_file("tests/sagas_signals.py (KIDS_YAML)", KIDS_YAML):
    registry.add(_saga)


# ---------------------------------------------------------------------------------------------- maps of child runs

# mk_open -> mk_second -> mk_quotes (one child run of child_booking per item, 3 at once; each child's input: the
# item's knobs plus the order) -> mk_total. The input's "items": one dict of child knobs per item (fail_at...).
map_kids = Saga("map_kids")


@map_kids.step(retry=FAST, compensation_retry=FAST)
def mk_open(ctx: StepContext):
    do(ctx)
    return {"order": ctx.run_id[:8]}


@mk_open.compensation
def mk_close(ctx: StepContext):
    undo(ctx)


@map_kids.step(retry=FAST, compensation_retry=FAST)
def mk_second(ctx: StepContext):
    do(ctx)
    return {}


@mk_second.compensation
def mk_unsecond(ctx: StepContext):
    undo(ctx)


map_kids.map("mk_quotes", child="child_booking", items=lambda ctx: ctx.input.get("items", [{}, {}, {}]),
             concurrency=3, input=lambda ctx: {**ctx.item, "order": ctx.run_id[:8]})


@map_kids.step(retry=FAST, compensation_retry=FAST)
def mk_total(ctx: StepContext):
    do(ctx)
    return {"charged": [r["c_charge"]["charged"] for r in ctx.results["mk_quotes"]]}


@mk_total.compensation
def mk_untotal(ctx: StepContext):
    undo(ctx)


# mk_open -> mk_gated (three child runs of approval, each waiting at its gate): a cancel while they wait.
map_kids_cancel = Saga("map_kids_cancel")
map_kids_cancel.step(mk_open.action, name="mk_open", retry=FAST, compensation_retry=FAST).compensation(mk_close)
map_kids_cancel.map("mk_gated", child="approval", items=lambda ctx: [0, 1, 2], concurrency=3, input=lambda ctx: {})
