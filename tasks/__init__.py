"""The example sagas that the demo and the tests run. Importing this package registers them."""

from tasks.booking import booking
from tasks.ingest import ingest
from tasks.payment import payment
from tasks.research import research

__all__ = ["booking", "ingest", "payment", "research"]
