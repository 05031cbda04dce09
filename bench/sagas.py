"""The sagas the benchmark runs. The sagaflow worker imports this module through SAGAFLOW_IMPORTS, and the
harness imports it too (SagaClient.start needs the definitions).

Every step is a no-op with a no-op compensation, so what is measured is sagaflow's own cost per step: the
SQL transitions, the chain's messages and the runtime's Python. Step names are s0, s1, ...
"""

from __future__ import annotations

from sagaflow import NonRetryableError, Saga, Step


class BenchFailure(NonRetryableError):
    """W2's planned failure: non-retryable, so the step fails at its first attempt."""


def noop(ctx):
    return None


def undo(ctx):
    return None


def fail(ctx):
    raise BenchFailure(f"planned failure of {ctx.step}")


def _steps(n: int, fail_last: bool = False) -> list[Step]:
    steps = [Step(f"s{i}", noop, undo) for i in range(n)]
    if fail_last:
        steps[-1] = Step(f"s{n - 1}", fail, undo)
    return steps


# W1: 4 steps that succeed. W2: 4 steps, the 4th fails for good, so s2, s1, s0 are compensated.
W1 = Saga("bench_w1", _steps(4))
W2 = Saga("bench_w2", _steps(4, fail_last=True))
# Step scaling: the same no-op steps, 16 and 64 of them (W1 is the 4-step point).
S16 = Saga("bench_s16", _steps(16))
S64 = Saga("bench_s64", _steps(64))

BY_STEPS = {4: "bench_w1", 16: "bench_s16", 64: "bench_s64"}

# The limits phase: W1 with limits that never bind (a run slot, a concurrency slot and a rate start per step,
# all far above what the bench reaches), to measure what the bookkeeping in SQL costs (store/limits.py).
NEVER_BINDS = 1_000_000
W1_LIMITS = Saga("bench_w1_limits", [Step(f"s{i}", noop, undo, concurrency=NEVER_BINDS,
                                          rate_limit=f"{NEVER_BINDS}/s") for i in range(4)],
                 max_concurrent_runs=NEVER_BINDS)
