"""create_booking: invoice, email, WhatsApp message, calendar entry; each undone if a later step fails.
Written with decorators, so each action sits next to the compensation that undoes it."""

from sagaflow import Saga, StepContext
from sagaflow.tasks.effects import COMPENSATION_RETRY, STEP_RETRY, do, undo

booking = Saga("create_booking", version=1)


@booking.step(retry=STEP_RETRY, compensation_retry=COMPENSATION_RETRY, timeout=10)
def create_invoice(ctx: StepContext):
    do(ctx)
    return {"invoice_id": f"inv-{ctx.run_id[:8]}", "customer": ctx.input.get("customer")}


@create_invoice.compensation
def cancel_invoice(ctx: StepContext):
    undo(ctx)  # a real one: api.cancel_invoice(ctx.result["invoice_id"], idempotency_key=ctx.idempotency_key)


@booking.step(retry=STEP_RETRY, compensation_retry=COMPENSATION_RETRY, timeout=10)
def send_email(ctx: StepContext):
    do(ctx)
    return {"message_id": f"mail-{ctx.run_id[:8]}", "invoice_id": ctx.results["create_invoice"]["invoice_id"]}


@send_email.compensation
def send_cancellation_email(ctx: StepContext):
    undo(ctx)


@booking.step(retry=STEP_RETRY, compensation_retry=COMPENSATION_RETRY, timeout=10)
def send_whatsapp(ctx: StepContext):
    do(ctx)
    return {"message_id": f"wa-{ctx.run_id[:8]}"}


@send_whatsapp.compensation
def send_whatsapp_cancellation(ctx: StepContext):
    undo(ctx)


@booking.step(retry=STEP_RETRY, compensation_retry=COMPENSATION_RETRY, timeout=10)
def add_calendar(ctx: StepContext):
    do(ctx)
    return {"event_id": f"cal-{ctx.run_id[:8]}"}


@add_calendar.compensation
def remove_calendar(ctx: StepContext):
    undo(ctx)
