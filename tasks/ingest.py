"""data_ingest: ingest, parse, embed, expose. Built with the plain form, the way a saga assembled at run
time (from configuration, say) is built.

Each action and compensation is also registered as a *handler*, by name, so that config/sagas.yaml can
assemble the declarative saga ``ingest_document`` from the same functions without code
(``ingest -> delete_uploaded_file``, ...). Like every example, each records its effect in example_effects
under the name of the step it runs as, and honours the failure knobs (tasks/effects.py).
"""

from sagaflow import Saga, Step, StepContext, handler
from sagaflow.tasks.effects import COMPENSATION_RETRY, STEP_RETRY, do, undo


@handler("ingest")
def ingest_upload(ctx: StepContext):
    do(ctx)
    return {"upload_id": f"{ctx.step}-{ctx.run_id[:8]}"}


@handler
def delete_uploaded_file(ctx: StepContext):
    undo(ctx)


@handler("parse")
def parse_document(ctx: StepContext):
    do(ctx)
    return {"document_id": f"{ctx.step}-{ctx.run_id[:8]}"}


@handler
def delete_parsed_document(ctx: StepContext):
    undo(ctx)


@handler("embed")
def embed_chunks(ctx: StepContext):
    do(ctx)
    return {"vector_batch": f"{ctx.step}-{ctx.run_id[:8]}"}


@handler
def delete_embeddings(ctx: StepContext):
    undo(ctx)


@handler("expose")
def expose_index(ctx: StepContext):
    do(ctx)
    return {"index_alias": f"{ctx.step}-{ctx.run_id[:8]}"}


@handler
def unpublish(ctx: StepContext):
    undo(ctx)


def _step(name: str, action, compensation) -> Step:
    return Step(name, action, compensation, retry=STEP_RETRY, compensation_retry=COMPENSATION_RETRY, timeout=10)


ingest = Saga(
    "data_ingest",
    steps=[
        _step("ingest", ingest_upload, delete_uploaded_file),
        _step("parse", parse_document, delete_parsed_document),
        _step("embed", embed_chunks, delete_embeddings),
        _step("expose", expose_index, unpublish),
    ],
    version=1,
)
