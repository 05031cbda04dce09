"""collect_payment: charge and invoice (both undoable), then a receipt and analytics, which have nothing
to undo: if they fail, the payment and the invoice are reversed, the receipt stays sent."""

from sagaflow import Saga, StepContext
from sagaflow.tasks.effects import COMPENSATION_RETRY, STEP_RETRY, do, undo

payment = Saga("collect_payment", version=1)


@payment.step(retry=STEP_RETRY, compensation_retry=COMPENSATION_RETRY, timeout=10)
def process_payment(ctx: StepContext):
    do(ctx)
    return {"payment_id": f"pay-{ctx.run_id[:8]}", "amount": ctx.input.get("amount", 0)}


@process_payment.compensation
def refund_payment(ctx: StepContext):
    undo(ctx)


@payment.step(retry=STEP_RETRY, compensation_retry=COMPENSATION_RETRY, timeout=10)
def create_invoice(ctx: StepContext):
    do(ctx)
    return {"invoice_id": f"inv-{ctx.run_id[:8]}", "payment_id": ctx.results["process_payment"]["payment_id"]}


@create_invoice.compensation
def void_invoice(ctx: StepContext):
    undo(ctx)


@payment.step(retry=STEP_RETRY, timeout=10)
def send_receipt(ctx: StepContext):
    do(ctx)
    return {"sent": True}


@payment.step(retry=STEP_RETRY, timeout=10)
def log_analytics(ctx: StepContext):
    do(ctx)
    return None
