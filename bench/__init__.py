"""The benchmark of issue 6: sagaflow against a plain Celery chain, in the same run, on the same Redis and
PostgreSQL, with the same worker settings. Run it with ``python -m bench --help`` from the project folder.

Modules:
  harness.py   the command: services, workers, phases, checks, the table and the JSON lines
  sagas.py     the sagaflow sagas the benchmark runs (loaded by the sagaflow worker via SAGAFLOW_IMPORTS)
  plain.py     the plain Celery baseline: its app, tasks and chain builder (loaded by the plain worker)
  sqlcount.py  counts SQL round trips in a worker process (imported only in the counting phase)

Nothing in sagaflow/ imports this package.
"""
