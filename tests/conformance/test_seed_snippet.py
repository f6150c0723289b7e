"""The seed's "different backends interchangeably" example, run as written.

The snippet (``pubsub-base-interface``) leaves ``topic``, ``process`` and the
``get_nats_config``/``get_kafka_config`` imports to the reader; the prelude
supplies them and nothing else. It runs in its own process with only the
environment choosing the backend, as in a deployment; this process publishes
until the snippet's ``process()`` has seen messages, then the snippet exits.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from msight_core.pubsub import get_pubsub

PRELUDE = textwrap.dedent(
    """
    import sys
    from msight_core.pubsub.utils import get_kafka_config, get_nats_config

    topic = sys.argv[1]
    seen = []

    def process(message):
        seen.append(message)
        print(repr(message), flush=True)
        if len(seen) == 3:
            pubsub.close()
            sys.exit(0)
    """
)

# Verbatim from the seed, from "# Choose backend via environment variable" on.
SEED = textwrap.dedent(
    """
    # Choose backend via environment variable
    import os
    from msight_core.utils import get_redis_client
    from msight_core.pubsub import RedisPubSub, NATSPubSub, KafkaPubSub

    backend_type = os.getenv("MSIGHT_PUBSUB_BACKEND", "redis")

    if backend_type == "redis":
        pubsub = RedisPubSub(get_redis_client())
    elif backend_type == "nats":
        pubsub = NATSPubSub(get_nats_config(group_id="my_group"))
    elif backend_type == "kafka":
        pubsub = KafkaPubSub(get_kafka_config(group_id="my_group"))

    # Same interface regardless of backend
    pubsub.subscribe(topic)
    for message in pubsub.listen():
        process(message)
    """
)

# tansu assigns a group's partitions after about half the session timeout.
EXTRA_ENV = {"kafka": {"MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000"}}


@pytest.mark.parametrize("backend", ["redis", "nats", "kafka"])
def test_seed_backend_switch_example_runs_unchanged(
    backend: str, request: pytest.FixtureRequest, unique_topic: str
) -> None:
    server: Any = request.getfixturevalue(f"{backend}_server")
    env = {**server.env(), **EXTRA_ENV.get(backend, {})}
    assert env["MSIGHT_PUBSUB_BACKEND"] == backend
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("MSIGHT_")}
    child = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + SEED, unique_topic],
        env={**child_env, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    publisher = get_pubsub(env=env)
    sent = 0
    try:
        # The snippet's subscriber joins at some point (Kafka: once the group has
        # its partitions): publish until it has taken three and left.
        deadline = time.monotonic() + 60
        while child.poll() is None and time.monotonic() < deadline:
            publisher.publish(unique_topic, b"frame-%d" % sent)
            publisher.flush()
            sent += 1
            time.sleep(0.1)
        out, err = child.communicate(timeout=30)
    finally:
        publisher.close()
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, err
    lines = out.split()
    assert len(lines) == 3, out
    numbers = [int(ast.literal_eval(line).split(b"-")[1]) for line in lines]
    # Bytes, as published; in order and none missed once the subscriber was in.
    assert numbers == list(range(numbers[0], numbers[0] + 3)) and numbers[-1] < sent
    assert "Traceback" not in err, err
