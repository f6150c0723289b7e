"""The conformance suite for asyncio backends: the same scenarios, plus async-only ones.

:class:`AsyncPubSubConformance` runs every scenario of
:class:`~msight_core.testing.conformance.PubSubConformance` against an async
backend, through :class:`SyncOverAsync`: an adapter that runs the backend on a
loop thread shared by all adapters of the process (as an asyncio application
runs several backends on one loop) and exposes the synchronous contract. So a
publish from four threads becomes four tasks publishing at once, a ``close()``
from another thread is a ``close()`` awaited by another task while one waits in
``listen()``. Then it adds what only the async API has: cancellation safety of
``receive()``/``listen()``, close from another task, ``receive()`` timeouts.

Subclass it and provide a ``make_async_backend`` fixture returning a factory
``make(group_id=None)`` of fresh, unconnected async backends::

    class TestAsyncRedis(AsyncPubSubConformance):
        @pytest.fixture
        def make_async_backend(self, redis_server):
            return lambda group_id=None: AsyncRedisPubSub(load_redis_config(redis_server.env()))
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from ..aio.base import AsyncPubSubBackend
from ..errors import ClosedError
from ..pubsub.base import Capabilities, Message, PubSubBackend
from .conformance import PubSubConformance

__all__ = ["AsyncPubSubConformance", "SyncOverAsync", "shared_loop"]

_T = TypeVar("_T")
_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def shared_loop() -> asyncio.AbstractEventLoop:
    """The process-wide event loop (on a daemon thread) the adapters run on."""
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(
                target=loop.run_forever, name="msight-aio-test-loop", daemon=True
            ).start()
            _loop = loop
        return _loop


class SyncOverAsync(PubSubBackend):
    """The synchronous contract over an async backend running on :func:`shared_loop`.

    Args:
        backend: the async backend; every call on it runs on the shared loop.

    Each call blocks its thread until the coroutine finished on the loop; calls
    from several threads run as concurrent tasks.
    """

    def __init__(self, backend: AsyncPubSubBackend) -> None:
        self.backend = backend
        self._loop = shared_loop()

    @property  # type: ignore[override]
    def capabilities(self) -> Capabilities:
        return self.backend.capabilities

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(getattr(self.backend, "topics", ()))

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _call(self, fn: Callable[[], _T]) -> _T:
        async def call() -> _T:
            return fn()

        return self._run(call())

    def subscribe(self, topic: Any) -> None:
        self._run(self.backend.subscribe(topic))

    def publish(self, topic: Any, serialized_data: bytes) -> None:
        self._run(self.backend.publish(topic, serialized_data))

    def receive(self, timeout: float | None = None) -> Message | None:
        return self._run(self.backend.receive(timeout))

    def listen(self) -> Iterator[bytes]:
        iterator = self._call(self.backend.listen)  # raises at once, as listen() must

        def payloads() -> Iterator[bytes]:
            while True:
                try:
                    yield self._run(iterator.__anext__())  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return

        return payloads()

    def flush(self, timeout: float | None = None) -> None:
        self._run(self.backend.flush(timeout))

    def close(self) -> None:
        self._run(self.backend.close())

    def stats(self) -> dict[str, Any]:
        stats = getattr(self.backend, "stats", None)
        return stats() if stats is not None else {}


async def _gather_until(backend: Any, count: int, timeout: float) -> list[Message]:
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        message = await backend.receive(min(1.0, max(deadline - time.monotonic(), 0.01)))
        if message is not None:
            out.append(message)
    return out


class AsyncPubSubConformance(PubSubConformance):
    """The shared scenarios over :class:`SyncOverAsync`, plus the async-only ones."""

    @pytest.fixture
    def make_async_backend(self) -> Callable[..., AsyncPubSubBackend]:  # pragma: no cover
        raise NotImplementedError("define a make_async_backend fixture in the subclass")

    @pytest.fixture
    def make_backend(self, make_async_backend: Callable[..., Any]) -> Callable[..., PubSubBackend]:
        return lambda group_id=None: SyncOverAsync(make_async_backend(group_id=group_id))

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        future = asyncio.run_coroutine_threadsafe(coro, shared_loop())
        try:
            return future.result(timeout or self.timeout * 4)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    # -- async only -------------------------------------------------------------------------

    def test_async_receive_timeout_returns_none_without_blocking_the_loop(
        self, make_async_backend: Callable[..., Any], unique_topic: str
    ) -> None:
        async def scenario() -> None:
            async with make_async_backend() as sub:
                await sub.subscribe(unique_topic)
                ticks = 0

                async def ticker() -> None:
                    nonlocal ticks
                    while True:
                        await asyncio.sleep(0.01)
                        ticks += 1

                task = asyncio.ensure_future(ticker())
                started = time.monotonic()
                assert await sub.receive(0.3) is None
                elapsed = time.monotonic() - started
                task.cancel()
                assert 0.25 <= elapsed < 5
                assert ticks >= 5, "the loop must run while receive() waits"

        self._run(scenario())

    def test_async_cancelled_receivers_lose_nothing(
        self, make_async_backend: Callable[..., Any], unique_topic: str, caps: Capabilities
    ) -> None:
        """Consumers cancelled at random points (waiting, or between messages) lose nothing."""
        total = 400

        async def scenario() -> list[bytes]:
            async with make_async_backend() as sub, make_async_backend() as pub:
                await sub.subscribe(unique_topic)
                got: list[bytes] = []

                async def producer() -> None:
                    for i in range(total):
                        await pub.publish(unique_topic, b"m-%d" % i)
                        if i % 7 == 0:
                            await pub.flush()
                            await asyncio.sleep(0.002)
                    await pub.flush()

                async def consume_listen() -> None:
                    async for data in sub.listen():
                        got.append(data)

                async def consume_receive() -> None:
                    while True:
                        message = await sub.receive(0.05)
                        if message is not None:
                            got.append(message.data)

                producing = asyncio.ensure_future(producer())
                deadline = time.monotonic() + self.timeout * 2
                n = 0
                while len(got) < total and time.monotonic() < deadline:
                    n += 1
                    task = asyncio.ensure_future(consume_listen() if n % 2 else consume_receive())
                    await asyncio.sleep(0.001 * (n % 5))
                    task.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        pass
                await producing
                return got

        got = self._run(scenario())
        sent = [b"m-%d" % i for i in range(total)]
        if caps.ordered:
            assert got == sent
        else:
            assert sorted(got) == sorted(sent)

    def test_async_close_from_another_task_ends_listen_and_receive(
        self, make_async_backend: Callable[..., Any], unique_topic: str
    ) -> None:
        async def scenario() -> None:
            sub = make_async_backend()
            await sub.subscribe(unique_topic)

            async def listen() -> str:
                async for _ in sub.listen():
                    pass
                return "ended"

            async def receive() -> str:
                try:
                    await sub.receive()
                except ClosedError:
                    return "closed"
                return "returned"

            listening = asyncio.ensure_future(listen())
            receiving = asyncio.ensure_future(receive())
            await asyncio.sleep(0.2)
            started = time.monotonic()
            await asyncio.gather(sub.close(), sub.close())  # idempotent, from two tasks
            done = await asyncio.wait_for(asyncio.gather(listening, receiving), 5)
            assert done == ["ended", "closed"]
            assert time.monotonic() - started < 5 + self.timeout
            with pytest.raises(ClosedError):
                await sub.publish(unique_topic, b"x")
            with pytest.raises(ClosedError):
                sub.listen()
            await sub.flush()  # returns at once after close
            await sub.close()

        self._run(scenario())

    def test_async_unfinished_message_goes_back_to_the_group(
        self, make_async_backend: Callable[..., Any], unique_topic: str, caps: Capabilities
    ) -> None:
        """Acknowledged: what was handed over and followed by a request for the next.
        Not acknowledged: the message in hand when the consuming block raised (here
        a cancellation) and everything never handed over: the group gets them again."""
        if not caps.persistent or not caps.groups:
            pytest.skip("backend keeps nothing for a returning group")
        group = "a-" + unique_topic.replace(".", "-")
        sent = [b"k-%d" % i for i in range(30)]

        async def scenario() -> tuple[list[bytes], list[bytes]]:
            taken: list[bytes] = []
            async with make_async_backend() as pub:
                first = make_async_backend(group_id=group)
                await first.subscribe(unique_topic)
                for payload in sent:
                    await pub.publish(unique_topic, payload)
                await pub.flush()

                async def work() -> None:
                    async with first:
                        async for data in first.listen():
                            taken.append(data)
                            if len(taken) == 5:
                                await asyncio.sleep(3600)  # "processing" the 5th

                task = asyncio.ensure_future(work())
                deadline = time.monotonic() + self.timeout
                while len(taken) < 5 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                second = make_async_backend(group_id=group)
                async with second:
                    await second.subscribe(unique_topic)
                    again = await _gather_until(second, len(sent) - 4, self.timeout)
                    rest = [m.data for m in again]
                    extra = await second.receive(self.quiet)
                    if extra is not None:
                        rest.append(extra.data)
            return taken, rest

        taken, rest = self._run(scenario())
        assert len(taken) == 5
        assert sorted(rest) == sorted(set(sent) - set(taken[:4])), "acked 4, returned the rest"
