"""The benchmark of issue 6: sagaflow against a plain Celery chain, in the same run, on the same Redis and
PostgreSQL, with the same worker settings. Run it with ``python -m bench --help`` from the project folder.

Modules:
  harness.py     the command: its options, the order of the phases, the table and the JSON lines
  core.py        the Bench the phases work with: setup and teardown, workers, a batch, runs one at a time
  figures.py     sizes, phases and their figures, targets, percentiles, progress lines, the table
  services.py    the project folder, the Redis and PostgreSQL checks, the bench's own database
  workers.py     a worker subprocess: started until it answers a ping, its memory, stopped
  sides.py       the sides a phase runs (sagaflow, sagaflow with compensation off, plain) and their checks
  timed.py       phases latency, throughput and steps
  runs.py        phase runs: throughput at growing run counts, state bytes per run, worker memory
  sql.py         phase sql: SQL round trips per step and per start (and LocalCounter, the client's count)
  policy_off.py  phase policy_off: W1 with compensation off by policy, its speed and its SQL per run
  embedded.py    phase embedded: `sagaflow demo` on the embedded default
  profile.py     phase profile (--profile): py-spy on the sagaflow worker, and its summary
  sagas.py       the sagaflow sagas the benchmark runs (loaded by the sagaflow worker via SAGAFLOW_IMPORTS)
  plain.py       the plain Celery baseline: its app, tasks and chain builder (loaded by the plain worker)
  sqlcount.py    counts SQL round trips in a worker process (imported only in the counting phases)
  pgwire.py      a PostgreSQL proxy that counts the round trips on the wire (the sql phase)
  storeloop.py   the store's success path alone (claim, complete), its claim durable or not: python -m bench.storeloop

Nothing in sagaflow/ imports this package.
"""
