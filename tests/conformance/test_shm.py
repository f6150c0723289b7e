"""The shared conformance suite on the shared-memory backend (iceoryx2, no broker)."""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from collections.abc import Callable, Iterator

import pytest

from msight_core.config import load_shm_config
from msight_core.pubsub.shm import ShmPubSub
from msight_core.testing.conformance import PubSubConformance


@pytest.fixture(scope="module")
def shm_domain() -> Iterator[str]:
    """A domain of this module alone; its files are removed afterwards."""
    domain = f"mc{os.getpid()}{uuid.uuid4().hex[:6]}"
    yield domain
    for path in glob.glob(f"/dev/shm/{domain}_*") + glob.glob(f"/tmp/iceoryx2/**/{domain}_*"):
        os.remove(path)
    for node_dir in glob.glob("/tmp/iceoryx2/nodes/*/"):
        if not os.listdir(node_dir):
            shutil.rmtree(node_dir, ignore_errors=True)


class TestShmConformance(PubSubConformance):
    @pytest.fixture
    def make_backend(self, shm_domain: str) -> Callable[..., ShmPubSub]:
        config = load_shm_config({"MSIGHT_SHM_DOMAIN": shm_domain})
        return lambda group_id=None: ShmPubSub(config, group_id=group_id)
