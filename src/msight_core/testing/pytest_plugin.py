"""Pytest fixtures: real brokers on free loopback ports, unique topics.

Registered automatically when msight-core is installed (``pytest11`` entry
point). Every fixture name starts with ``msight_`` so it never clashes with a
project's own ``redis_server`` or ``unique_topic``:

- ``msight_redis_server``, ``msight_nats_server``, ``msight_kafka_server``:
  session-scoped brokers shared by all tests (each has ``.env()``, the
  ``MSIGHT_*`` variables that point a client at it);
- ``msight_unique_topic``: a topic name no other test uses.

Tests that kill or restart a broker should start their own with
:mod:`msight_core.testing.brokers`. To use shorter names in a project, alias
them in its ``conftest.py``::

    @pytest.fixture(scope="session")
    def redis_server(msight_redis_server):
        return msight_redis_server
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator

import pytest

from .brokers import KafkaServer, NatsServer, RedisServer

__all__ = [
    "msight_kafka_server",
    "msight_nats_server",
    "msight_redis_server",
    "msight_unique_topic",
]

_counter = itertools.count()


@pytest.fixture(scope="session")
def msight_redis_server() -> Iterator[RedisServer]:
    """A Redis/Valkey server for the whole session."""
    with RedisServer() as server:
        yield server  # type: ignore[misc]


@pytest.fixture(scope="session")
def msight_nats_server() -> Iterator[NatsServer]:
    """A nats-server with JetStream on and the default 1 MB ``max_payload``."""
    with NatsServer(jetstream=True) as server:
        yield server  # type: ignore[misc]


@pytest.fixture(scope="session")
def msight_kafka_server() -> Iterator[KafkaServer]:
    """A tansu (Kafka protocol) broker with memory storage."""
    with KafkaServer() as server:
        yield server  # type: ignore[misc]


@pytest.fixture
def msight_unique_topic(request: pytest.FixtureRequest) -> str:
    """A topic name no other test uses (valid on every broker)."""
    stem = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60].strip("-")
    return f"t.{stem or 'test'}.{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:6]}"
