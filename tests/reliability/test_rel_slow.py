"""Slow consumers: bounded memory, explicit overflow policy, drops counted and logged.

An application that processes slower than messages arrive must keep bounded
memory (``QueueConfig``: messages and bytes), the policy must be the one
configured, every drop must be counted per topic in ``stats()`` and logged
with the topic name, and Redis must never disconnect a subscriber that is
merely slow (msight drains the socket). Kafka keeps the backlog on the broker:
its queue pauses fetching instead of dropping, and nothing is lost.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
from _rel_env import env_for
from _rel_results import record

from msight_core.config import load_queue_config
from msight_core.pubsub import get_pubsub
from msight_core.testing.conformance import collect

MiB = 1024 * 1024
PAYLOAD = 10 * 1024


class Sampler:
    """Samples a backend's ``stats()`` on a thread: the largest queue seen."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.max_messages = 0
        self.max_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            stats = self.backend.stats()
            self.max_messages = max(self.max_messages, stats["queued"])
            self.max_bytes = max(self.max_bytes, stats["queued_bytes"])
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.mark.parametrize("kind", ["redis", "nats", "kafka"])
@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
def test_slow_application_bounded_and_drops_counted(
    kind: str,
    policy: str,
    request: pytest.FixtureRequest,
    unique_topic: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="msight_core")
    bound_msgs, bound_bytes = 200, 1 * MiB  # the byte bound bites first: ~100 messages
    env = env_for(
        request,
        kind,
        MSIGHT_QUEUE_MAX_MESSAGES=str(bound_msgs),
        MSIGHT_QUEUE_MAX_BYTES=str(bound_bytes),
        MSIGHT_QUEUE_OVERFLOW=policy,
    )
    assert load_queue_config(env).max_bytes == bound_bytes
    sub = get_pubsub(env=env)
    sub.subscribe(unique_topic)
    sampler = Sampler(sub)
    sent = 2000
    with get_pubsub(env=env) as pub:
        for i in range(sent):
            pub.publish(unique_topic, b"%06d" % i + bytes(PAYLOAD - 6))
        pub.flush()
    got: list[bytes] = []
    deadline = time.monotonic() + 60
    while len(got) + sum(sub.stats()["dropped"].values()) < sent and time.monotonic() < deadline:
        message = sub.receive(1.0)
        if message is not None:
            got.append(message.data[:6])
            time.sleep(0.002)  # the application is slow
    sampler.stop()
    stats = sub.stats()
    sub.close()
    dropped = stats["dropped"].get(unique_topic, 0)
    figures = {
        "sent": sent,
        "received": len(got),
        "dropped": dropped,
        "max_queued": sampler.max_messages,
        "max_queued_bytes": sampler.max_bytes,
        "bound_bytes": bound_bytes,
    }
    record("slow-consumer", f"{kind}/{policy}", figures)
    # The queue never held more than the bound (a batch being handed over may
    # sit outside it: at most one receive batch of 1 MiB).
    assert sampler.max_bytes <= bound_bytes, figures
    assert sampler.max_messages <= bound_msgs + 256, figures
    numbers = [int(x) for x in got]
    if kind == "kafka":
        # Kafka keeps the backlog: fetching pauses, nothing is dropped or lost.
        assert dropped == 0 and sorted(numbers) == list(range(sent)), figures
        return
    assert dropped > 0 and dropped + len(got) == sent, figures
    assert list(stats["dropped"]) == [unique_topic], figures
    logged = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert any(unique_topic in line and policy in line for line in logged), logged
    if policy == "drop_newest":
        assert numbers[: len(numbers) // 2] == list(range(len(numbers) // 2)), "oldest kept"
    else:
        assert numbers[-1] == sent - 1, "the newest message is kept"


def test_redis_never_disconnects_a_slow_application(redis_server: Any, unique_topic: str) -> None:
    """64 MB published while the application reads nothing: Redis' 32 MB pub/sub
    output limit would disconnect a subscriber that left it in the socket."""
    env = {
        **redis_server.env(),
        "MSIGHT_QUEUE_MAX_MESSAGES": "20",
        "MSIGHT_QUEUE_OVERFLOW": "drop_oldest",
    }
    sub = get_pubsub(env=env)
    sub.subscribe(unique_topic)
    frame = bytes(512 * 1024)
    count = 128
    with get_pubsub(env=env) as pub:
        for i in range(count):
            pub.publish(unique_topic, b"%04d" % i + frame)
        pub.flush(30)
    deadline = time.monotonic() + 30
    while sum(sub.stats()["dropped"].values()) < count - 20 and time.monotonic() < deadline:
        time.sleep(0.05)  # the application is busy elsewhere
    stats = sub.stats()
    kept = [int(m.data[:4]) for m in collect(sub, 20, 5)]
    with get_pubsub(env=env) as pub:
        pub.publish(unique_topic, b"still-subscribed")
    after = collect(sub, 1, 5)
    sub.close()
    figures = {
        "published_mb": count * len(frame) // MiB,
        "dropped": stats["dropped"].get(unique_topic, 0),
        "kept": len(kept),
        "subscriber_reconnects": stats.get("subscriber_reconnects"),
    }
    record("slow-consumer", "redis/no-disconnect", figures)
    assert stats.get("subscriber_reconnects") == 0, figures
    assert stats["dropped"] == {unique_topic: count - 20}, figures
    assert kept == list(range(count - 20, count)), figures
    assert [m.data for m in after] == [b"still-subscribed"], figures


@pytest.mark.parametrize("kind", ["redis", "nats"])
def test_block_policy_loses_nothing_within_the_bound(
    kind: str, request: pytest.FixtureRequest, unique_topic: str
) -> None:
    """``block``: the reader waits for the application instead of dropping."""
    env = env_for(request, kind, MSIGHT_QUEUE_MAX_MESSAGES="50", MSIGHT_QUEUE_OVERFLOW="block")
    sub = get_pubsub(env=env)
    sub.subscribe(unique_topic)
    sampler = Sampler(sub)
    sent = 1000  # 10 MB: Redis' output buffer absorbs the rest without a disconnect
    with get_pubsub(env=env) as pub:
        for i in range(sent):
            pub.publish(unique_topic, b"%06d" % i + bytes(PAYLOAD - 6))
        pub.flush()
    got: list[int] = []
    deadline = time.monotonic() + 60
    while len(got) < sent and time.monotonic() < deadline:
        message = sub.receive(2.0)
        if message is None:
            break
        got.append(int(message.data[:6]))
        if len(got) % 50 == 0:
            time.sleep(0.01)
    sampler.stop()
    stats = sub.stats()
    sub.close()
    figures = {"sent": sent, "received": len(got), "max_queued": sampler.max_messages}
    record("slow-consumer", f"{kind}/block", figures)
    assert got == list(range(sent)), figures
    assert not stats["dropped"], figures
    assert sampler.max_messages <= 50 + 256, figures
