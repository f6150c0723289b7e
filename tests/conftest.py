"""The project's short fixture names, as aliases of the plugin's ``msight_`` fixtures.

The pytest plugin shipped with msight-core names its fixtures ``msight_*`` so
they never clash with a user's own; msight-core's tests were written with the
short names and keep them here, in the project, not in the plugin.
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def redis_server(msight_redis_server: Any) -> Any:
    return msight_redis_server


@pytest.fixture(scope="session")
def nats_server(msight_nats_server: Any) -> Any:
    return msight_nats_server


@pytest.fixture(scope="session")
def kafka_server(msight_kafka_server: Any) -> Any:
    return msight_kafka_server


@pytest.fixture
def unique_topic(msight_unique_topic: str) -> str:
    return msight_unique_topic
