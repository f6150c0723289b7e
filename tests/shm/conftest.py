"""Fixtures of the shm tests: a domain of each test's own, child processes, cleanup."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _shm_support import Child, remove_domain

from msight_core.config import ShmConfig, load_shm_config
from msight_core.pubsub.shm import ShmPubSub


@pytest.fixture
def domain() -> Iterator[str]:
    """A shm domain for this test alone; its files are removed afterwards."""
    name = f"ms{os.getpid()}{uuid.uuid4().hex[:8]}"
    yield name
    remove_domain(name)


@pytest.fixture
def config(domain: str) -> ShmConfig:
    return load_shm_config({"MSIGHT_SHM_DOMAIN": domain})


@pytest.fixture
def make(config: ShmConfig) -> Iterator[Callable[..., ShmPubSub]]:
    """``make(group_id=None, **config_overrides)``: a backend closed after the test."""
    made: list[ShmPubSub] = []

    def factory(group_id: str | None = None, **overrides: Any) -> ShmPubSub:
        cfg = dataclasses.replace(config, **overrides) if overrides else config
        backend = ShmPubSub(cfg, group_id=group_id)
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        backend.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Child]]:
    """``spawn(role, domain, topic, *args)``: a child process (see ``_shm_child.py``)."""
    children: list[Child] = []

    def factory(*args: Any) -> Child:
        child = Child(*(str(a) for a in args))
        children.append(child)
        return child

    yield factory
    for child in children:
        child.kill()
