"""``Store``, the one object callers hold: every SQL statement sagaflow runs, assembled from one part per
concern.

    engine.py        connections, pools, pings, reads, the schema check            (Engines)
    guards.py        the compare-and-set primitives, each written once: move_step (the held-step guard
                     included; held_step reads it), fail_step, set_run_status, succeed_run, claimable,
                     event, touch
    runs.py          create (idempotent; plain runs too), read, list; cancel        (Runs)
    claims.py        a step's claim, completion, retry, failure, lease; the held
                     transitions the fast path shares                              (Claims)
    compensation.py  the errback, each undo, the end of a compensation, retry       (Compensation)
    recovery.py      stalled runs and the sweeper's take-over                       (Recoveries)
    groups.py        parallel branches: join, late branches, held-back undos        (Groups)
    flags.py         best-effort and pivot steps, plain runs                        (Flags)
    waits.py         gates, signals, cancelling a waiting run                       (Waits)
    timers.py        sleeps, long retry delays, delayed starts: times kept in SQL   (Timers(Waits))
    schedules.py     cron schedules and the firing of their ticks                   (Schedules)
    children.py      child runs                                                     (Children)
    stats.py         read-only aggregates for /api/stats, the page's counts, /metrics (Stats)
    sessions.py      the web's operator sessions and authentication failures        (Sessions)
    operator.py      resolve by hand, restart links, deadlines                      (Operator)
    retention.py     prune old ended runs, folding what they counted into totals    (Retention)
    workers.py       worker heartbeats and liveness, leases (the one sweeper)       (Workers)
    limits.py        max_concurrent_runs, concurrency and rate_limit across workers  (Limits)
    fastpath.py      PostgreSQL: the success path's transitions as one prepared statement each; the
                     concern that owns a transition chooses it (``if self.fast:``), next to its own
                     transaction for SQLite and the rare paths.

Why a class assembled from per-concern parts rather than a facade over separate objects: callers hold one
``Store`` with the same methods and attributes as before (``engine``, ``fast``, ``transactional``, ...), and
every part shares its connections and the ``transactional`` variant without the fast path. A facade would
repeat each of the ~60 public signatures once more just to forward them. Each part only adds methods (no
``__init__`` but Engines'); what needs no ``self`` is a function, in guards.py or beside the concern that
owns it, and a part that needs another concern's rule imports that function (claims.py and runs.py:
flags.overrule_cancel_past_pivot, flags.refuse_cancel; compensation.py and recovery.py:
groups.branches_unsettled, groups.settle_lost_branches). A few methods are shared through ``self`` because
they choose the fast path or end a compensation: Claims._held and _retry (used by compensation.py),
Compensation._finish_compensation (groups.py, children.py), Waits._pass_step (children.py).

What a part uses through ``self`` is explicit in its bases, so mypy checks it: every part derives from
Engines (``engine``, ``autocommit``, ``fast``, ``_read``), Compensation(Claims), Children(Groups,
Compensation, Waits) (a child branch's end is decided by its group: Groups.end_child_branch). Groups only
declares Compensation._finish_compensation (under TYPE_CHECKING): compensation.py imports
groups.branches_unsettled, so Groups(Compensation) would be an import cycle. ``Store`` lists each
part before the parts it derives from, which keeps the MRO consistent.

Each public method is one transaction (or one fast statement); a transition is an ``UPDATE ... WHERE status
= <expected>`` whose row count says whether this caller won (guards.py).
"""

from __future__ import annotations

from sagaflow.store.attention import Attention
from sagaflow.store.children import CHILD_ENDED, CHILD_UNDONE, Children
from sagaflow.store.claims import Claims
from sagaflow.store.compensation import Compensation
from sagaflow.store.engine import IDLE_PING_SECONDS, Engines, create_db_engine, utcnow
from sagaflow.store.flags import Flags
from sagaflow.store.groups import LOST_BRANCH, Groups
from sagaflow.store.limits import Limits
from sagaflow.store.maps import Maps
from sagaflow.store.operator import Operator
from sagaflow.store.recovery import Recoveries
from sagaflow.store.retention import Retention
from sagaflow.store.runs import Runs
from sagaflow.store.schedules import Schedules
from sagaflow.store.sessions import Sessions
from sagaflow.store.stats import Stats
from sagaflow.store.timers import Timers
from sagaflow.store.waits import Waits
from sagaflow.store.workers import Workers


class Store(Runs, Children, Groups, Compensation, Claims, Flags, Timers, Waits, Recoveries, Stats, Sessions,
            Operator, Retention, Workers, Attention, Schedules, Limits, Maps, Engines):
    """Runs, steps and events in SQL (see the module docstring for which part holds what)."""


__all__ = ["CHILD_ENDED", "CHILD_UNDONE", "IDLE_PING_SECONDS", "LOST_BRANCH", "Store", "create_db_engine", "utcnow"]
