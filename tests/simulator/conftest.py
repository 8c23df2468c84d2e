"""Local fixtures: a started simulator factory, a callback receiver, and request helpers."""
from __future__ import annotations

import pytest

from receiver.simulator import SimConfig, Simulator

from .helpers import Receiver

FAST = dict(pending_after=(0.01, 0.03), final_after=(0.02, 0.05), result_after=(0.05, 0.1),
            callback_retry_delay=0.05)


@pytest.fixture
def make_sim():
    started = []

    def make(**overrides) -> Simulator:
        sim = Simulator(SimConfig(**{"seed": 1, **FAST, **overrides})).start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


@pytest.fixture
def sim(make_sim):
    return make_sim()


@pytest.fixture
def receiver():
    rec = Receiver().start()
    yield rec
    rec.stop()
