"""Local fixtures: a callback receiver and request helpers (the simulator factory `make_sim` is in tests/conftest.py)."""
from __future__ import annotations

import pytest

from .helpers import Receiver


@pytest.fixture
def receiver():
    rec = Receiver().start()
    yield rec
    rec.stop()
