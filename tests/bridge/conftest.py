"""Fixtures of the bridge tests: backends closed after each test, shm domains removed."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _bridge_support import remove_domain

from msight_core.bridge import Bridge, open_backend
from msight_core.pubsub import PubSubBackend


@pytest.fixture
def shm_domain() -> Iterator[str]:
    name = f"mb{os.getpid()}{uuid.uuid4().hex[:8]}"
    yield name
    remove_domain(name)


@pytest.fixture
def side() -> Iterator[Callable[..., PubSubBackend]]:
    """``side(backend, url=None, settings=None, group_id=None, role="source")``:
    :func:`open_backend` with a clean environment; closed after the test."""
    made: list[PubSubBackend] = []

    def factory(backend: str, url: Any = None, settings: Any = None, **kwargs: Any) -> Any:
        made.append(open_backend(backend, url, settings, env={}, **kwargs))
        return made[-1]

    yield factory
    for backend in reversed(made):
        with contextlib.suppress(Exception):  # a test may have closed or broken it
            backend.close()


@pytest.fixture
def bridges() -> Iterator[Callable[..., Bridge]]:
    """``bridges(source, destination, topics, **options)``: started, stopped after the test."""
    made: list[Bridge] = []

    def factory(*args: Any, **kwargs: Any) -> Bridge:
        bridge = Bridge(*args, **kwargs).start()
        made.append(bridge)
        return bridge

    yield factory
    for bridge in made:
        bridge.stop(30)
