"""The example sagas that the demo and the tests run. Importing this package registers them."""

from sagaflow.tasks.booking import booking
from sagaflow.tasks.ingest import ingest
from sagaflow.tasks.payment import payment
from sagaflow.tasks.research import research

__all__ = ["booking", "ingest", "payment", "research"]
