"""The shared conformance suite on a real nats-server (core NATS and JetStream mode)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from msight_core.pubsub import NATSPubSub
from msight_core.pubsub.base import Capabilities
from msight_core.pubsub.utils import get_nats_config
from msight_core.testing.conformance import PubSubConformance


class TestNatsConformance(PubSubConformance):
    @pytest.fixture
    def make_backend(self, nats_server: Any) -> Callable[..., NATSPubSub]:
        def make(group_id: str | None = None) -> NATSPubSub:
            return NATSPubSub(get_nats_config(group_id, env=nats_server.env()))

        return make


class TestNatsJetStreamConformance(PubSubConformance):
    @pytest.fixture
    def make_backend(self, nats_server: Any) -> Callable[..., NATSPubSub]:
        env = {**nats_server.env(), "MSIGHT_NATS_JETSTREAM": "true"}

        def make(group_id: str | None = None) -> NATSPubSub:
            return NATSPubSub(get_nats_config(group_id, env=env))

        return make

    def test_jetstream_mode_is_persistent(self, caps: Capabilities) -> None:
        # JetStream mode is a configuration of NATSPubSub: the instance says so.
        assert caps.persistent
