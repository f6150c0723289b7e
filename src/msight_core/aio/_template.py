"""The asyncio contract over a synchronous msight backend (not public API).

:class:`AsyncQueueBase` is the consuming side every async backend shares: the
receiving hand-off (:mod:`._handoff`), ``listen()``, ``receive()``, the wake-ups
and the one-time close. :class:`AsyncQueueBackend` adds the rest for a backend
whose I/O threads stay those of its synchronous facade (Redis, Kafka, memory);
the NATS backend runs its client on the caller's loop instead (:mod:`.nats`).

:class:`AsyncQueueBackend` implements :class:`~msight_core.aio.base.AsyncPubSubBackend`
for every msight backend built on the shared template: it holds the
synchronous facade as a *core* (the facade with the :class:`~._handoff.LoopFed`
mixin) and adds

* the receiving hand-off (:mod:`._handoff`): the reader thread's batches wake
  the loop, the loop takes messages without blocking;
* the publishing hand-off (:mod:`._outlet`): ``publish()`` appends and returns,
  a drainer thread hands messages to the facade's ``publish()`` in order;
* worker threads for what waits for the broker (subscribe, flush, close).

The backends' I/O threads are the synchronous facade's own; nothing about the
wire changes.
"""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

from ..config import PublishConfig
from ..errors import BackpressureError, ClosedError, MsightError
from ..pubsub._core import Delivery
from ..pubsub.base import Message
from ._handoff import CLOSED, LoopFed, resolve
from ._outlet import PROBE_BYTES, Outlet
from .base import AsyncPubSubBackend

__all__ = ["AsyncQueueBackend", "AsyncQueueBase"]

logger = logging.getLogger("msight_core.aio")

MiB = 1024 * 1024
#: What ``publish()`` accepts ahead of the drainer, at most (on top of the backend's
#: own outgoing buffer): enough for the drainer to lag a scheduling interval.
OUTLET_BYTES = 32 * MiB
OUTLET_MESSAGES = 65_536
#: Wake-ups a second from which a consumer polls instead of being woken (see ``_wait``).
HOT_WAKES = 2000
#: Seconds between two looks at the queue while polling: the most it adds to latency.
POLL = 0.0005
#: Empty looks after which the consumer goes back to being woken.
POLLS = 10
#: Seconds a fast stream keeps the consumer polling after its last message.
HOT_FOR = 1.0


class AsyncQueueBase(AsyncPubSubBackend):
    """The consuming side over a :class:`LoopFed` core's receive queue.

    Subclasses implement ``subscribe``, ``publish``, ``flush`` and
    :meth:`_release` (what closing does after the consumers were woken).

    Args:
        core: the synchronous backend (or queue), made with the ``LoopFed`` mixin.
    """

    #: Switch to polling on a fast stream (see ``_wait``): worth it only when the
    #: producer is another thread, whose every wake-up writes to the loop's pipe.
    polls = True

    def __init__(self, core: LoopFed) -> None:
        self._core = core
        self.capabilities = core.capabilities
        self._closing = False
        self._closed: asyncio.Future[None] | None = None
        self._waiting: set[asyncio.Future[None]] = set()  # consumers' wake-ups, for close()
        self._hot_until = 0.0  # until then the consumer polls (see _wait)
        self._window_start, self._window_wakes = 0.0, 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} over {self._core!r}>"

    def listen(self) -> AsyncIterator[bytes]:
        self._check_open()
        self._core.check_listen()
        return _Payloads(self._next_nowait, self._wait)

    async def receive(self, timeout: float | None = None) -> Message | None:
        self._check_open()
        self._core.check_listen()
        item = await self._next(timeout)
        if item is CLOSED:
            raise ClosedError(f"{type(self).__name__} is closed")
        if item is None:
            return None
        return Message(item[0], item[1])  # topic, data

    async def close(self) -> None:
        await self._shutdown(commit_in_hand=True)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A message whose processing raised (or was cancelled) is not acknowledged.
        await self._shutdown(commit_in_hand=exc_type is None)

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def topics(self) -> tuple[str, ...]:
        """Names subscribed on this instance, in subscription order."""
        return self._core.topics

    def received_headers(self) -> Any:
        """Trace headers of the message handed out last, where the broker has
        headers (``None`` otherwise); what :mod:`msight_core.tracing` continues
        a trace from."""
        return self._core.received_headers()

    def stats(self) -> dict[str, Any]:
        """The backend's counters (as the synchronous backend's ``stats()``)."""
        return self._core.stats()

    def _check_open(self) -> None:
        if self._closing:
            raise ClosedError(f"{type(self).__name__} is closed")

    def _next_nowait(self) -> Delivery | None:
        """Acknowledge the message in hand; the next one if queued, else ``None``."""
        if self._closing:
            self._core.release()
            return CLOSED
        return self._core.next_nowait()

    async def _next(self, timeout: float | None) -> Delivery | None:
        """The next delivery, now in hand; ``None`` on timeout; :data:`CLOSED`.

        The only ``await`` is before anything is taken (see ``_handoff``).
        """
        item = self._next_nowait()
        if item is not None:
            return item
        return await self._wait(timeout)

    async def _wait(self, timeout: float | None) -> Delivery | None:
        """Wait for the next delivery (after ``_next_nowait()`` found none).

        Normally the reader wakes the loop when it queues a batch. On a fast stream
        (more than :data:`HOT_WAKES` wake-ups a second) every wake-up would cost two
        loop iterations and a write to the loop's self-pipe per network batch; the
        consumer then looks every :data:`POLL` seconds instead (at most that much
        later, never more often), until the stream pauses for ``POLLS`` looks.
        """
        core = self._core
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = None if timeout is None else now + timeout
        if self.polls and self._hot_until > now:
            core.settle()
            for _ in range(POLLS):
                delay = POLL if deadline is None else min(POLL, deadline - loop.time())
                if delay <= 0:
                    return None
                await asyncio.sleep(delay)
                item = CLOSED if self._closing else core.take_nowait()
                if item is not None:
                    self._hot_until = loop.time() + HOT_FOR
                    return item
            self._hot_until = 0.0  # the stream paused: back to wake-ups
        while True:
            core.settle()
            future = loop.create_future()
            core.arm(future)
            item = CLOSED if self._closing else core.take_nowait()
            if item is not None:
                core.disarm(future)
                return item
            handle = None
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    core.disarm(future)
                    return None
                handle = loop.call_later(remaining, resolve, future)
            self._waiting.add(future)
            try:
                await future
            finally:
                self._waiting.discard(future)
                core.disarm(future)
                if handle is not None:
                    handle.cancel()
            self._count_wake_up(loop.time())
            item = CLOSED if self._closing else core.take_nowait()
            if item is not None:
                return item

    def _count_wake_up(self, now: float) -> None:
        if now - self._window_start >= 0.1:
            if self._window_wakes >= HOT_WAKES // 10:
                self._hot_until = now + HOT_FOR
            self._window_start, self._window_wakes = now, 0
        self._window_wakes += 1

    @abstractmethod
    async def _release(self, commit_in_hand: bool) -> None:
        """Close for good (once; consumers are woken already). Not cancelled by
        the cancellation of a task awaiting ``close()``."""

    async def _shutdown(self, commit_in_hand: bool) -> None:
        if self._closed is not None:  # a second caller waits for the first close
            await asyncio.shield(self._closed)
            return
        loop = asyncio.get_running_loop()
        self._closed = done = loop.create_future()
        self._closing = True
        for future in self._waiting:
            resolve(future)
        # A task of its own: cancelling the caller does not cut the close short.
        task = loop.create_task(self._release(commit_in_hand))
        task.add_done_callback(lambda t: (t.cancelled() or t.exception(), resolve(done)))
        await asyncio.shield(done)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:  # to the first caller only (Kafka: PublishError)
            raise exc


class AsyncQueueBackend(AsyncQueueBase):
    """The async contract over a :class:`LoopFed` synchronous backend and its threads.

    Args:
        core: the synchronous backend, made with the ``LoopFed`` mixin.
        publish: its publish bound and timeout (the outlet's timeout).
    """

    def __init__(self, core: LoopFed, publish: PublishConfig) -> None:
        super().__init__(core)
        self._timeout = publish.timeout
        self._executor = ThreadPoolExecutor(
            max_workers=4, thread_name_prefix=f"msight-aio-{type(self).__name__}"
        )
        self._outlet = Outlet(
            core.send_checked,
            core.sender(),
            max_bytes=min(publish.buffer_bytes, OUTLET_BYTES),
            max_messages=OUTLET_MESSAGES,
            timeout=publish.timeout,
            executor=self._executor,
            probe=core.backlog_probe(),
            # Direct while a probe interval more cannot fill the backend's buffer.
            backlog_bytes=max(publish.buffer_bytes - 4 * PROBE_BYTES, publish.buffer_bytes // 2),
            name_of=core.name_of,
            what=type(self).__name__,
        )
        if type(self).publish is AsyncQueueBackend.publish:
            # The hot path of a publishing loop: the outlet's coroutine itself, one
            # coroutine per message instead of two (a subclass's publish() still wins).
            self.publish = self._outlet.publish  # type: ignore[method-assign]

    # -- the contract -----------------------------------------------------------------

    async def subscribe(self, topic: Any) -> None:
        self._check_open()
        # The synchronous subscribe() checks the name (or pattern) and waits for the
        # broker's confirmation: in a worker thread, so the loop goes on meanwhile.
        await self._in_worker(self._core.subscribe, topic)

    async def publish(self, topic: Any, serialized_data: bytes) -> None:
        await self._outlet.publish(topic, serialized_data)

    async def flush(self, timeout: float | None = None) -> None:
        if self._closing:
            return
        budget = self._timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        if not await self._outlet.drained(budget):
            count, nbytes = self._outlet.pending()
            raise BackpressureError(
                f"flush timed out after {budget:g}s: {count} message(s) ({nbytes} bytes) "
                "not yet handed to the broker's client"
            )
        self._outlet.raise_error()
        await self._in_worker(self._core.flush, max(deadline - loop.time(), 0.05))

    # -- extras -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The synchronous backend's counters, plus what waits in the outlet."""
        out = self._core.stats()
        count, nbytes = self._outlet.pending()
        outlet = self._outlet
        out.update(
            outlet_pending=count,
            outlet_pending_bytes=nbytes,
            outlet_lost=outlet.lost,
            published_direct=outlet.direct,
        )
        return out

    # -- helpers ----------------------------------------------------------------------

    async def _in_worker(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except RuntimeError as exc:
            if self._closing:  # the executor was shut down meanwhile
                raise ClosedError(f"{type(self).__name__} is closed") from exc
            raise

    async def _release(self, commit_in_hand: bool) -> None:
        loop = asyncio.get_running_loop()
        self._outlet.closed = True
        try:
            try:
                if not await self._outlet.drained(self._timeout):
                    count, _ = self._outlet.pending()
                    logger.warning("closing with %d accepted message(s) not sent", count)
                self._outlet.raise_error()
            except MsightError as exc:
                logger.warning("%s", exc)
            await loop.run_in_executor(self._executor, self._core.close_with, commit_in_hand)
        finally:
            self._executor.shutdown(wait=False)


class _Payloads:
    """The async iterator ``listen()`` returns: the next payload without a second
    coroutine while messages are queued."""

    def __init__(
        self,
        next_nowait: Callable[[], Any],
        wait: Callable[[float | None], Awaitable[Any]],
    ) -> None:
        self._next_nowait = next_nowait
        self._wait = wait

    def __aiter__(self) -> _Payloads:
        return self

    async def __anext__(self) -> bytes:
        item = self._next_nowait()
        if item is None:
            item = await self._wait(None)
        if item is CLOSED:
            raise StopAsyncIteration
        return item[1]  # data
