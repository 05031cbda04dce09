"""request_data (the example of issue 5): select the samples and identify their data owners at the same
time (a parallel group), then request the information from the owners, which needs both results. If the
request fails, both branches are undone; if one branch fails, the other is undone once it has succeeded.

    select_samples  ─┐
                     ├─> request_information
    identify_owners ─┘
"""

from sagaflow import Saga, StepContext
from sagaflow.tasks.effects import COMPENSATION_RETRY, STEP_RETRY, do, undo

research = Saga("request_data", version=1)

with research.parallel():

    @research.step(retry=STEP_RETRY, compensation_retry=COMPENSATION_RETRY, timeout=10)
    def select_samples(ctx: StepContext):
        do(ctx)  # a real one: reserve the samples in the biobank, keyed by ctx.idempotency_key
        return {"samples": [f"{ctx.input.get('study', 'study')}-sample-{i}" for i in range(1, 4)]}

    @select_samples.compensation
    def release_samples(ctx: StepContext):
        undo(ctx)

    @research.step(retry=STEP_RETRY, compensation_retry=COMPENSATION_RETRY, timeout=10)
    def identify_data_owners(ctx: StepContext):
        do(ctx)
        return {"owners": ["owner-a@example.org", "owner-b@example.org"]}

    @identify_data_owners.compensation
    def forget_data_owners(ctx: StepContext):
        undo(ctx)


@research.step(retry=STEP_RETRY, compensation_retry=COMPENSATION_RETRY, timeout=10)
def request_information(ctx: StepContext):
    do(ctx)  # both branches' results are here: the join waited for them
    return {"samples": ctx.results["select_samples"]["samples"],
            "owners": ctx.results["identify_data_owners"]["owners"]}


@request_information.compensation
def withdraw_request(ctx: StepContext):
    undo(ctx)
