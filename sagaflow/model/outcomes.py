"""What the store's transitions decide, for the runtime to act on: the store never publishes, it returns one
of these and the runtime turns it into messages (or into nothing). Plain values, frozen.

    ClaimOutcome, Claim   a step's or compensation's claim (Store.claim_step, claim_compensation, ...)
    BranchOutcome         a parallel branch's success or failure (Store.complete_branch, fail_branch, ...)
    Recovery              what the sweeper must publish to move a stalled run on (Store.take_over_stalled)
    WaitOutcome           a gate, a signal or a child run's end (Store.deliver_signal, child_ended, ...)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class ClaimOutcome(enum.Enum):
    CLAIMED = "claimed"  # this delivery holds the step: run the action
    DONE = "done"  # already finished by an earlier delivery: carry its result on
    FAILED = "failed"  # already failed for good: fire the errback again (it may have been lost)
    BUSY = "busy"  # another live delivery holds it: this one is a duplicate
    CANCELLED = "cancelled"  # the run was cancelled: stop the chain, compensate
    GONE = "gone"  # the run moved on (compensating or final): nothing to do


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    attempt: int = 0  # executions of this action (or compensation) so far, this one included
    round_attempt: int = 0  # the same, counted from the last operator retry: what the retry policy counts
    input: dict | None = None
    result: Any = None
    error: str | None = None


@dataclass(frozen=True)
class BranchOutcome:
    """What a parallel branch's success decided (Store.complete_branch), for its task to act on.

    decision: "waiting" (a sibling is still open: publish nothing), "joined" (this branch completed the
    group: publish the steps from ``next_index`` with ``results``, read from SQL), "finished" (the group ended
    the saga: the run succeeded), "cancelled" (a cancel came in: raise SagaCancelled into the errback),
    "late" (the run began compensating while the branch ran: publish its own undo if ``compensate``),
    "recorded" (the run waits for an operator or is final: publish nothing); for a failure (fail_branch):
    "errback" (fire it: it begins the compensation) or "quiet" (fire none); "stopped" (stop_branch) and
    "lost" (settle_lost_branch).

    ``release``: the undos of the steps before the group, latest first, which waited for the group to
    settle (Store.hold_back): this transition settled it, publish them now.
    """

    decision: str
    next_index: int | None = None
    results: dict | None = None
    compensate: bool = False
    release: tuple[int, ...] = ()


@dataclass(frozen=True)
class MapOutcome:
    """What a map step's transition decided (Store.start_map, claim_item, complete_item, fail_item).

    decision: "dispatch" (publish the messages of ``items``: the window refilled, or items re-driven),
    "waiting" (items are in flight: publish nothing), "done" (the last item completed the map: publish the
    steps from ``next_index`` with ``results``, read from SQL), "finished" (the map ended the saga: the run
    succeeded), "failed" (an item failed for good, or a cancel came in, and no item is in flight any more:
    the map step is recorded failed: fire its errback), "gone" (the step is no longer running: nothing).
    """

    decision: str
    items: tuple[int, ...] = ()
    next_index: int | None = None
    results: dict | None = None


@dataclass(frozen=True)
class ItemClaim:
    """A map item's claim (Store.claim_item): CLAIMED (run it: ``value``, ``attempt``, the run's ``input``),
    DONE (it completed already: a duplicate), BUSY (another live delivery holds it), GONE (the map failed, was
    cancelled or moved on: the item was skipped, and ``after`` says what that decided)."""

    outcome: ClaimOutcome
    value: Any = None
    attempt: int = 0
    input: dict | None = None
    after: MapOutcome | None = None


@dataclass(frozen=True)
class Recovery:
    """What the sweeper must publish to move a stalled run on, decided from SQL in one transaction.

    action: "resume" (the forward chain from ``index``, given ``results``), "errback" (``index`` failed but
    the run never began compensating), "finish" (every step done), "compensate" (``indexes``, latest first;
    empty: finish the compensation), "compensation_errback" (the undo of ``index`` gave up but the run is
    still compensating: its errback was lost; the run ends compensation_failed), "wait" (``index`` waits for
    its signal or child run: nothing to publish); from sagaflow/runtime/waits.py's sweep: "gate_timeout" (the
    errback of a gate past its deadline), "child_finished" (a child's end, re-announced to its parent).
    """

    run_id: str
    saga: str
    version: int
    action: str
    index: int = 0
    results: dict | None = None
    indexes: tuple[int, ...] = ()
    revoked: tuple[str, ...] = ()  # steps whose expired claim was taken back


@dataclass(frozen=True)
class WaitOutcome:
    """What a transition of a gate, a signal or a child run decided, for sagaflow/runtime/waits.py to publish.

    action: "waiting" (nothing to publish: the run waits), "continue" (publish the chain of ``run_id`` from
    ``index + 1`` with ``results``), "finished" (the run ended in ``status``: tell its parent, if any),
    "errback" (publish on_step_failed for ``index``), "compensate" (publish the compensations ``indexes``,
    latest first, of ``run_id``), "cancelled" (a cancel came in before the step could wait: fail into the
    errback), "failed" (give up: ``error``), "lost" (this delivery no longer holds the step), "none"
    (nothing to do: a duplicate, or a signal kept for a gate the run has not reached), "branch" (the child of
    a child step in a parallel group ended: do what ``branch`` decided, as for any branch's end), "map" (the
    child run of a map's item ended: do what ``map`` decided, as for any item's end).
    """

    action: str
    run_id: str
    saga: str = ""
    version: int = 0
    index: int = 0
    results: dict | None = None
    result: Any = None
    status: str | None = None
    indexes: tuple[int, ...] = ()
    child_run_id: str | None = None
    error: str | None = None
    branch: BranchOutcome | None = None  # action "branch": a child branch's end, decided by its group
    map: MapOutcome | None = None  # action "map": a map item's child ended (or never started): its map decided


class SlotOutcome(str, enum.Enum):
    """What asking for a slot under a limit decided (store/limits.py): ``granted`` (a new slot: this delivery
    runs and releases it), ``held`` (the run or step holds it already: a promoted waiter, a retry, a
    duplicate delivery), ``queued`` (over the limit: it waits in line, holding no worker)."""

    GRANTED = "granted"
    HELD = "held"
    QUEUED = "queued"


@dataclass(frozen=True)
class Promoted:
    """A waiter that got its slot when one freed: publish its chain from step ``index`` with ``results``."""

    run_id: str
    saga: str
    version: int
    index: int
    results: dict
