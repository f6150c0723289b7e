"""The shared conformance suite on the in-process backend."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from msight_core.pubsub.memory import MemoryBroker, MemoryPubSub
from msight_core.testing.conformance import PubSubConformance


class TestMemoryConformance(PubSubConformance):
    @pytest.fixture
    def make_backend(self) -> Callable[..., MemoryPubSub]:
        broker = MemoryBroker()
        return lambda group_id=None: MemoryPubSub(group_id=group_id, broker=broker)
