"""The example sagas that the demo and the tests run. Importing this package registers them."""

from tasks.booking import booking
from tasks.ingest import ingest
from tasks.payment import payment

__all__ = ["booking", "ingest", "payment"]
