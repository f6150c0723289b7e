"""AsyncNATSPubSub runs nats-py on the caller's loop: no thread, the same guarantees."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from msight_core.aio import AsyncNATSPubSub
from msight_core.errors import ClosedError
from msight_core.pubsub import NATSPubSub
from msight_core.pubsub.utils import get_nats_config

_T = TypeVar("_T")


def run(coro: Coroutine[Any, Any, _T], timeout: float = 60) -> _T:
    async def bounded() -> _T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def _threads() -> set[threading.Thread]:
    # asyncio's own default executor (getaddrinfo for a host name) is not ours.
    return {t for t in threading.enumerate() if not t.name.startswith("asyncio_")}


@pytest.mark.parametrize("jetstream", [False, True])
@pytest.mark.parametrize("overflow", ["drop_oldest", "block"])
def test_no_thread_is_started_and_everything_arrives_in_order(
    nats_server: Any, unique_topic: str, jetstream: bool, overflow: str
) -> None:
    """Subscribe, publish, receive, flush and close on the caller's loop only; with
    ``block`` and a queue of 8 messages, a slow consumer still gets every message
    (the socket is no longer read meanwhile), without a hand-off thread."""
    env = {
        **nats_server.env(),
        "MSIGHT_NATS_JETSTREAM": str(jetstream).lower(),
        "MSIGHT_QUEUE_OVERFLOW": overflow,
        "MSIGHT_QUEUE_MAX_MESSAGES": "8" if overflow == "block" else "100000",
    }
    total = 600
    before = _threads()
    seen: set[threading.Thread] = set()

    async def scenario() -> list[bytes]:
        async with (
            AsyncNATSPubSub(get_nats_config(env=env)) as sub,
            AsyncNATSPubSub(get_nats_config(env=env)) as pub,
        ):
            await sub.subscribe(unique_topic)
            for i in range(total):
                await pub.publish(unique_topic, b"%d" % i)
            await pub.flush()
            seen.update(_threads())
            got: list[bytes] = []
            async for data in sub.listen():
                got.append(data)
                if len(got) % 50 == 0:
                    await asyncio.sleep(0.01)  # a slow consumer
                if len(got) == total:
                    break
            seen.update(_threads())
            stats = sub.stats()
        assert sum(stats["dropped"].values()) == 0
        return got

    got = run(scenario())
    assert got == [b"%d" % i for i in range(total)]
    assert seen - before == set(), sorted(t.name for t in seen - before)


def test_sync_and_async_instances_talk_and_large_frames_cross(
    nats_server: Any, unique_topic: str
) -> None:
    """A payload above max_payload goes as a large frame from the loop too (JetStream
    available), and the synchronous backend reads it; the other way round as well."""
    env = nats_server.env()
    big = bytes(range(256)) * 12_000  # ~3 MB, above the 1 MB max_payload

    async def scenario() -> None:
        sync = NATSPubSub(get_nats_config(env=env))
        try:
            sync.subscribe(unique_topic + ".a")
            async with AsyncNATSPubSub(get_nats_config(env=env)) as ps:
                await ps.subscribe(unique_topic + ".b")
                await ps.publish(unique_topic + ".a", big)
                await ps.flush()
                message = await asyncio.to_thread(sync.receive, 30)
                assert message is not None and message.data == big
                sync.publish(unique_topic + ".b", big)
                sync.flush()
                back = await ps.receive(30)
                assert back is not None and back.data == big
                assert ps.stats()["large_frames_sent"] == 1
                assert ps.stats()["large_frames_received"] == 1
        finally:
            sync.close()

    run(scenario())


def test_refusals_and_close_from_another_task(nats_server: Any, unique_topic: str) -> None:
    env = nats_server.env()

    async def scenario() -> None:
        ps = AsyncNATSPubSub(get_nats_config(env=env))
        with pytest.raises(TypeError):
            await ps.publish(unique_topic, "text")  # type: ignore[arg-type]
        await ps.subscribe(unique_topic)

        async def consume() -> list[bytes]:
            return [data async for data in ps.listen()]

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        await asyncio.gather(ps.close(), ps.close())
        assert await asyncio.wait_for(task, 5) == []
        with pytest.raises(ClosedError):
            await ps.publish(unique_topic, b"x")
        with pytest.raises(ClosedError):
            await ps.subscribe(unique_topic + ".other")

    run(scenario())
    with pytest.raises(TypeError):
        AsyncNATSPubSub(object())  # type: ignore[arg-type]


def test_close_during_the_first_connect_leaves_no_client(
    nats_server: Any, unique_topic: str
) -> None:
    """close() from another task while subscribe() is still connecting: the client
    that connect makes is closed, not left running on the loop."""
    env = nats_server.env()

    async def scenario() -> None:
        outer = set(asyncio.all_tasks())  # the test's own (run()'s timeout wrapper)
        ps = AsyncNATSPubSub(get_nats_config(env=env))
        subscribing = asyncio.ensure_future(ps.subscribe(unique_topic))
        await asyncio.sleep(0)  # the connect has started
        await ps.close()
        with pytest.raises(ClosedError):
            await asyncio.wait_for(subscribing, 10)
        client = ps._client._parts.conn.client
        assert client is None or client.is_closed
        await asyncio.sleep(0.1)
        ours = {asyncio.current_task(), *outer}
        leftover = [t for t in asyncio.all_tasks() if t not in ours]
        assert not leftover, leftover  # the writer's and nats-py's tasks are gone

    run(scenario())
