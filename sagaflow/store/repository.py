"""``Store``, the one object callers hold: every SQL statement sagaflow runs, assembled from one part per
concern.

    engine.py        connections, pools, pings, reads, the schema check            (Engines)
    guards.py        the compare-and-set primitives, each written once: move_step (the held-step guard
                     included), fail_step, set_run_status, succeed_run, claimable, event, touch
    runs.py          create (idempotent), read, list; the operator's cancel         (Runs)
    claims.py        a step's claim, completion, retry, failure, lease; the held
                     transitions the fast path shares                              (Claims)
    compensation.py  the errback, each undo, the end of a compensation, retry       (Compensation)
    recovery.py      stalled runs and the sweeper's take-over                       (Recoveries)
    groups.py        parallel branches: join, late branches, held-back undos        (Groups)
    flags.py         best-effort and pivot steps, plain runs                        (Flags)
    waits.py         gates, signals, cancelling a waiting run                       (Waits)
    children.py      child runs                                                     (Children)
    fastpath.py      PostgreSQL: the success path's transitions as one prepared statement each; the
                     concern that owns a transition chooses it (``if self.fast:``), next to its own
                     transaction for SQLite and the rare paths.

Why a class assembled from per-concern parts rather than a facade over separate objects: the concerns call
into each other inside one transaction (a claim overrules a cancel past the pivot, flags.py; the end of a
compensation waits for late parallel branches, groups.py; a child's undo ends the child's compensation,
compensation.py), and all of them share one set of connections and the ``transactional`` variant without the
fast path. With one ``self`` those calls stay plain method calls on the same connection, no part holds a
reference to another, and ``Store`` keeps exactly the methods and attributes it always had. Each part only
adds methods (no ``__init__`` but Engines'); what needs no ``self`` is a function in guards.py or beside the
part that uses it.

Each public method is one transaction (or one fast statement); a transition is an ``UPDATE ... WHERE status
= <expected>`` whose row count says whether this caller won (guards.py).
"""

from __future__ import annotations

from sagaflow.store.children import CHILD_ENDED, CHILD_UNDONE, Children
from sagaflow.store.claims import Claim, ClaimOutcome, Claims
from sagaflow.store.compensation import Compensation
from sagaflow.store.engine import IDLE_PING_SECONDS, Engines, create_db_engine, utcnow
from sagaflow.store.flags import Flags
from sagaflow.store.groups import LOST_BRANCH, BranchOutcome, Groups
from sagaflow.store.recovery import Recoveries, Recovery
from sagaflow.store.runs import Runs
from sagaflow.store.waits import WaitOutcome, Waits


class Store(Runs, Claims, Compensation, Groups, Flags, Waits, Children, Recoveries, Engines):
    """Runs, steps and events in SQL (see the module docstring for which part holds what)."""


__all__ = [
    "BranchOutcome", "CHILD_ENDED", "CHILD_UNDONE", "Claim", "ClaimOutcome", "IDLE_PING_SECONDS", "LOST_BRANCH",
    "Recovery", "Store", "WaitOutcome", "create_db_engine", "utcnow",
]
