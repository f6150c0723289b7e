"""The asyncio API beyond the shared scenarios: factory, imports, input rules, the outlet."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from msight_core.aio import (
    AsyncKafkaPubSub,
    AsyncMemoryPubSub,
    AsyncNATSPubSub,
    AsyncPubSubBackend,
    AsyncRedisPubSub,
    get_async_pubsub,
)
from msight_core.aio._outlet import Outlet
from msight_core.config import QueueConfig
from msight_core.errors import (
    BackpressureError,
    ClosedError,
    ConfigError,
    InvalidTopicError,
    PublishError,
)
from msight_core.pubsub.memory import MemoryBroker, MemoryPubSub

_T = TypeVar("_T")


def run(coro: Coroutine[Any, Any, _T], timeout: float = 60) -> _T:
    async def bounded() -> _T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


# -- factory and imports ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("broker", "cls"),
    [("redis", AsyncRedisPubSub), ("nats", AsyncNATSPubSub), ("kafka", AsyncKafkaPubSub)],
)
def test_get_async_pubsub_follows_the_environment(
    broker: str, cls: type, request: pytest.FixtureRequest, unique_topic: str
) -> None:
    env = request.getfixturevalue(f"{broker}_server").env()
    if broker == "kafka":
        env = {**env, "MSIGHT_KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "6000"}

    async def scenario() -> list[bytes]:
        async with get_async_pubsub(env=env) as sub, get_async_pubsub(env=env) as pub:
            assert type(sub) is cls and isinstance(sub, AsyncPubSubBackend)
            await sub.subscribe(unique_topic)
            for i in range(20):
                await pub.publish(unique_topic, b"%d" % i)
            await pub.flush()
            got: list[bytes] = []
            async for data in sub.listen():
                got.append(data)
                if len(got) == 20:
                    break
            assert sub.stats()["delivered"] == 20
            return got

    got = run(scenario())
    assert sorted(got, key=int) == [b"%d" % i for i in range(20)]


def test_get_async_pubsub_memory_and_refusals() -> None:
    ps = get_async_pubsub(group_id="g", env={"MSIGHT_PUBSUB_BACKEND": "memory"})
    assert type(ps) is AsyncMemoryPubSub and ps.group_id == "g"
    run(ps.close())
    with pytest.raises(ConfigError):
        get_async_pubsub(env={"MSIGHT_PUBSUB_BACKEND": "shm"})
    with pytest.raises(ConfigError):
        get_async_pubsub(env={"MSIGHT_PUBSUB_BACKEND": "carrier-pigeon"})


@pytest.mark.parametrize(
    "code",
    [
        "import msight_core.aio",
        "from msight_core.aio import get_async_pubsub, AsyncPubSubBackend",
        "from msight_core.aio import AsyncMemoryPubSub",
        "import msight_core.testing.aio",
    ],
)
def test_importing_loads_no_broker_client(code: str) -> None:
    script = (
        f"{code}\nimport sys\n"
        "print(sorted(m for m in ('redis', 'nats', 'confluent_kafka') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- input rules, interplay with the sync API ------------------------------------------------


def test_bad_input_raises_at_once_and_queues_nothing() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        async with AsyncMemoryPubSub(broker=broker) as ps:
            with pytest.raises(TypeError):
                await ps.publish("a.b", "text")  # type: ignore[arg-type]
            with pytest.raises(InvalidTopicError):
                await ps.publish("a b", b"x")
            with pytest.raises(InvalidTopicError):
                await ps.subscribe("a..b")
            with pytest.raises(RuntimeError):
                ps.listen()
            with pytest.raises(RuntimeError):
                await ps.receive(0.1)
            assert ps.stats()["outlet_pending"] == 0

    run(scenario())


def test_sync_and_async_instances_share_a_memory_broker() -> None:
    broker = MemoryBroker()
    sync_sub = MemoryPubSub(broker=broker)
    sync_sub.subscribe("a.b")

    async def scenario() -> bytes:
        async with AsyncMemoryPubSub(broker=broker) as ps:
            await ps.subscribe("a.c")
            await ps.publish("a.b", b"to sync")
            await ps.flush()
            MemoryPubSub(broker=broker).publish("a.c", b"to async")
            message = await ps.receive(5)
            assert message is not None and message.topic == "a.c"
            return message.data

    assert run(scenario()) == b"to async"
    message = sync_sub.receive(5)
    assert message is not None and message.data == b"to sync"
    sync_sub.close()


def test_a_full_receive_queue_with_block_policy_still_wakes_the_consumer() -> None:
    """BLOCK waits in the producer for room: the loop's consumer must be woken first."""
    broker = MemoryBroker()
    queue = QueueConfig(max_messages=4, overflow="block")

    async def scenario() -> list[bytes]:
        async with AsyncMemoryPubSub(broker=broker, queue=queue) as sub:
            await sub.subscribe("a.b")
            pub = MemoryPubSub(broker=broker)
            sender = threading.Thread(
                target=lambda: [pub.publish("a.b", b"%d" % i) for i in range(50)], daemon=True
            )
            sender.start()
            got = []
            async for data in sub.listen():
                got.append(data)
                if len(got) == 50:
                    break
            sender.join(5)
            return got

    assert run(scenario(), 30) == [b"%d" % i for i in range(50)]


def test_the_loop_runs_while_a_subscribe_waits_for_the_broker(redis_server: Any) -> None:
    from msight_core.config import load_redis_config

    config = load_redis_config(redis_server.env())

    async def scenario() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        async with AsyncRedisPubSub(config) as ps:
            for i in range(20):
                await ps.subscribe(f"t.tick.{i}")
        task.cancel()
        return ticks

    assert run(scenario()) > 0


def test_published_directly_once_a_topic_is_warm(redis_server: Any, unique_topic: str) -> None:
    from msight_core.config import load_redis_config

    config = load_redis_config(redis_server.env())

    async def scenario() -> dict[str, Any]:
        async with AsyncRedisPubSub(config) as sub, AsyncRedisPubSub(config) as pub:
            await sub.subscribe(unique_topic)
            await pub.publish(unique_topic, b"first")  # through the drainer (connects)
            await pub.flush()
            for i in range(1000):
                await pub.publish(unique_topic, b"%d" % i)
            await pub.publish(unique_topic, b"x" * 200_000)  # big: through the drainer
            for i in range(10):
                await pub.publish(unique_topic, b"after-%d" % i)
            await pub.flush()
            got = [m.data for m in [await sub.receive(5) for _ in range(1012)] if m]
            assert got[0] == b"first" and got[1:1001] == [b"%d" % i for i in range(1000)]
            assert got[1001] == b"x" * 200_000
            assert got[1002:] == [b"after-%d" % i for i in range(10)]
            return pub.stats()

    stats = run(scenario())
    assert stats["published_direct"] >= 1000
    assert stats["outlet_pending"] == 0 and stats["outlet_lost"] == 0


# -- the outlet: backpressure and background failures ---------------------------------------


def _outlet(send: Callable[[str, bytes], None], **kw: Any) -> tuple[Outlet, ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(2)
    options = {"max_bytes": 1024, "max_messages": 4, "timeout": 0.5, **kw}
    return Outlet(send, send, executor=executor, **options), executor


def test_a_full_outlet_makes_publish_wait_without_blocking_the_loop() -> None:
    gate = threading.Event()
    sent: list[bytes] = []

    def send(name: str, data: bytes) -> None:
        gate.wait(10)
        sent.append(data)

    outlet, executor = _outlet(send, timeout=5.0)

    async def scenario() -> tuple[int, float]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        for i in range(4):
            await outlet.put("a.b", b"%d" % i)
        started = time.monotonic()
        asyncio.get_running_loop().call_later(0.3, gate.set)
        await outlet.put("a.b", b"4")  # waits for room: the drainer is held by the gate
        waited = time.monotonic() - started
        assert await outlet.drained(5)
        task.cancel()
        return ticks, waited

    ticks, waited = run(scenario())
    executor.shutdown()
    assert waited >= 0.25 and ticks >= 10
    assert sent == [b"%d" % i for i in range(5)]


def test_an_outlet_that_stays_full_raises_backpressure() -> None:
    gate = threading.Event()
    outlet, executor = _outlet(lambda name, data: gate.wait(10), timeout=0.3)

    async def scenario() -> None:
        for i in range(4):
            await outlet.put("a.b", b"%d" % i)
        with pytest.raises(BackpressureError):
            await outlet.put("a.b", b"late")
        assert not await outlet.drained(0.1)
        gate.set()
        assert await outlet.drained(5)

    run(scenario())
    executor.shutdown()


def test_a_failure_in_the_background_is_raised_once_by_the_next_call() -> None:
    calls: list[bytes] = []

    def send(name: str, data: bytes) -> None:
        calls.append(data)
        if data == b"bad":
            raise BackpressureError("the broker's buffer stayed full")

    outlet, executor = _outlet(send)

    async def scenario() -> None:
        await outlet.put("a.b", b"bad")
        assert await outlet.drained(5)
        with pytest.raises(PublishError, match="not sent") as info:
            await outlet.put("a.b", b"next")
        assert isinstance(info.value.__cause__, BackpressureError)
        await outlet.put("a.b", b"again")  # raised once
        assert await outlet.drained(5)
        assert outlet.lost == 1

    run(scenario())
    executor.shutdown()
    assert calls == [b"bad", b"again"]


def test_a_publish_error_about_earlier_messages_does_not_lose_this_one() -> None:
    """Kafka reports earlier failed deliveries from the next publish(), which then
    did not send its own message: the drainer sends that one again."""
    calls: list[bytes] = []
    failed = [False]

    def send(name: str, data: bytes) -> None:
        calls.append(data)
        if data == b"2" and not failed[0]:
            failed[0] = True
            raise PublishError("Kafka delivery failed: 1 message(s) to topic 'a.b'")

    outlet, executor = _outlet(send)

    async def scenario() -> None:
        for i in range(3):
            await outlet.put("a.b", b"%d" % i)
        assert await outlet.drained(5)
        with pytest.raises(PublishError, match="Kafka delivery failed"):
            outlet.raise_error()
        assert outlet.lost == 0

    run(scenario())
    executor.shutdown()
    assert calls == [b"0", b"1", b"2", b"2"]


def test_publish_after_close_raises_and_close_is_bounded() -> None:
    async def scenario() -> None:
        ps = AsyncMemoryPubSub(broker=MemoryBroker())
        await ps.publish("a.b", b"x")
        await ps.close()
        assert ps.closed
        with pytest.raises(ClosedError):
            await ps.publish("a.b", b"y")
        with pytest.raises(ClosedError):
            await ps.subscribe("a.b")
        with pytest.raises(ClosedError):
            await ps.receive(0.1)

    run(scenario())


@pytest.mark.parametrize("polling", [False, True])
def test_cancelling_consumers_of_a_fast_stream_loses_nothing(
    polling: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while woken, while polling (a fast stream) or between two
    messages, a consumer loses and repeats nothing."""
    from msight_core.aio import _template

    # Polling mode starts at HOT_WAKES wake-ups a second: 10 makes any stream "fast".
    monkeypatch.setattr(_template, "HOT_WAKES", 10 if polling else 10**9)
    broker = MemoryBroker()
    total = 30_000

    async def scenario() -> list[bytes]:
        async with AsyncMemoryPubSub(broker=broker) as sub:
            await sub.subscribe("a.b")
            pub = MemoryPubSub(broker=broker)

            def send() -> None:
                for i in range(total):
                    pub.publish("a.b", b"%d" % i)
                    if i % 100 == 99:
                        # A stream, not one backlog: the consumer catches up and waits
                        # (wake-ups) even when this thread gets the CPU first.
                        time.sleep(0.0005)

            sender = threading.Thread(target=send, daemon=True)
            got: list[bytes] = []

            async def by_listen() -> None:
                async for data in sub.listen():
                    got.append(data)

            async def by_receive() -> None:
                while True:
                    message = await sub.receive(0.01)
                    if message is not None:
                        got.append(message.data)

            seen_polling = False

            async def watch() -> None:
                nonlocal seen_polling
                while True:
                    seen_polling |= sub._hot_until > 0
                    await asyncio.sleep(0.001)

            watcher = asyncio.ensure_future(watch())
            sender.start()
            deadline = time.monotonic() + 60
            n = 0
            while len(got) < total and time.monotonic() < deadline:
                n += 1
                task = asyncio.ensure_future(by_listen() if n % 2 else by_receive())
                await asyncio.sleep(0.0005 * (n % 4))
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
            sender.join(10)
            watcher.cancel()
            assert seen_polling is polling
            return got

    assert run(scenario(), 90) == [b"%d" % i for i in range(total)]


def test_a_nearly_full_backend_makes_direct_publishes_wait_on_the_loop() -> None:
    backlog = [0]
    sent: list[bytes] = []
    executor = ThreadPoolExecutor(2)
    outlet = Outlet(
        lambda name, data: sent.append(data),
        lambda name, data: sent.append(data),
        max_bytes=1 << 20,
        max_messages=1000,
        timeout=0.5,
        executor=executor,
        probe=lambda handed: backlog[0],
        backlog_bytes=10_000,
    )

    async def scenario() -> None:
        await outlet.put("a.b", b"first")  # a topic's first message: the drainer
        assert await outlet.drained(5)
        await outlet.publish("a.b", b"direct")  # warm, backlog probed: sent from the loop
        await outlet.publish("a.b", b"direct 2")
        assert outlet.direct == 2
        backlog[0] = 1_000  # x ~70 bytes > 10 000: nearly full
        outlet._budget = 0  # next message probes again (a test shortcut)
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, backlog.__setitem__, 0, 0)
        started = time.monotonic()
        await outlet.publish("a.b", b"waits")  # polls the backlog, the loop runs meanwhile
        assert 0.05 < time.monotonic() - started < 0.5
        backlog[0] = 1_000
        outlet._budget = 0
        with pytest.raises(BackpressureError, match="nearly full"):
            await outlet.publish("a.b", b"too late")

    run(scenario())
    executor.shutdown()
    assert sent == [b"first", b"direct", b"direct 2", b"waits"]
    assert outlet.direct == 3
