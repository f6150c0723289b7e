"""Shared by the bridge tests (imported as a plain module, like tests/shm's support)."""

from __future__ import annotations

import glob
import os
import shutil

#: Kafka groups rebalance within seconds instead of 45 (tansu waits half of it).
KAFKA_TEST = {"MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000"}


def remove_domain(domain: str) -> None:
    """Remove every shared-memory file of ``domain`` (and empty iceoryx2 node dirs)."""
    for path in glob.glob(f"/dev/shm/{domain}_*") + glob.glob(f"/tmp/iceoryx2/**/{domain}_*"):
        try:
            os.remove(path)
        except OSError:
            pass
    for node_dir in glob.glob("/tmp/iceoryx2/nodes/*/"):
        try:
            if not os.listdir(node_dir):
                shutil.rmtree(node_dir, ignore_errors=True)
        except OSError:
            pass
