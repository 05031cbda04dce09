"""data_ingest: ingest, parse, embed, expose. Built with the plain form, the way a saga assembled at run
time (from configuration, say) is built."""

from sagaflow import Saga, Step, StepContext

from tasks.effects import COMPENSATION_RETRY, STEP_RETRY, do, undo


def _action(produces: str):
    def action(ctx: StepContext):
        do(ctx)
        return {produces: f"{ctx.step}-{ctx.run_id[:8]}"}

    return action


def _step(name: str, produces: str) -> Step:
    return Step(name, _action(produces), undo, retry=STEP_RETRY, compensation_retry=COMPENSATION_RETRY, timeout=10)


ingest = Saga(
    "data_ingest",
    steps=[
        _step("ingest", "upload_id"),  # undo: delete the uploaded file
        _step("parse", "document_id"),  # undo: delete the parsed document
        _step("embed", "vector_batch"),  # undo: delete the embeddings
        _step("expose", "index_alias"),  # undo: unpublish
    ],
    version=1,
)
