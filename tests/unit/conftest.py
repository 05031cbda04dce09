import pytest

from sagaflow.store import Store
from sagaflow.store.migrate import upgrade


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 'unit.db'}"
    upgrade(url)
    s = Store(url)
    yield s
    s.dispose()
