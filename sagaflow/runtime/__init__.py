"""The runtime: sagaflow's Celery tasks and what they do. Importing it declares the tasks.

    compiler.py   definition -> Celery canvas (signatures by task name); publishes nothing
    outcomes.py   FailedForGood, the errors recorded for lost processes, the database-outage policy
    publish.py    the only place that sends messages (apply_async): the store's outcomes -> messages
    base.py       the task base classes (GuardedTask, GenericTask, SagaTask)
    branches.py   what a parallel branch does after its action
    waits.py      gates and child steps (steps that wait, holding no worker)
    steps.py      the bodies of the step and compensation tasks, with their shared prologue (the claim)
    recovery.py   the recovery sweeper
    tasks.py      the Celery task declarations (their names are a wire contract)

The imports flow one way, top to bottom of that list (tests/unit/test_import_cycles.py keeps it so).
"""

from sagaflow.runtime import tasks  # noqa: F401  (declares the Celery tasks of every registered saga)
from sagaflow.runtime.tasks import check_visibility_timeout

__all__ = ["check_visibility_timeout", "tasks"]
