"""The `sagaflow` command: worker | web | flower | start | status | runs | cancel | signal | retry | restart |
resolve | prune | stats | recover | schedule | db | demo.

Whatever a user can get wrong by typing (an option, an argument, a SAGAFLOW_* setting, a saga module or file,
the database address) ends in one line on stderr, ``Error: ...`` saying what to do, and a non-zero exit: 2
for a malformed option or argument and for a SAGAFLOW_* setting that is not valid (naming the variable and
what it accepts), 1 for the rest. Nothing is written before every input has been checked.
Text from stored runs (errors, names, event details) is shown with its control characters escaped, so a
step error holding terminal escape sequences cannot rewrite the operator's terminal; --json output is JSON
(ASCII, escaped) as it stands.
"""

from sagaflow.cli import database, processes, runs, schedules  # noqa: F401  (each registers its commands)
from sagaflow.cli.base import SECONDS, load_sagas, main
from sagaflow.cli.runs import print_run

__all__ = ["SECONDS", "load_sagas", "main", "print_run"]

if __name__ == "__main__":
    main()
