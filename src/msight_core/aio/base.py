"""The asyncio contract: :class:`AsyncPubSubBackend`, the awaitable twin of ``PubSubBackend``.

The same behaviour as the synchronous backends (bytes in, bytes out, the same
topic rules, the same capabilities), with every call that may wait made
awaitable, so an asyncio service (FastAPI, aiohttp, FastStream) consumes sensor
streams on its own loop without threads of its own::

    from msight_core.aio import get_async_pubsub

    async with get_async_pubsub(group_id="detectors") as ps:
        await ps.subscribe("camera1.frames")
        async for payload in ps.listen():          # bytes, until close()
            await ps.publish("camera1.detections", detect(payload))

One instance serves one event loop at a time. Nothing here blocks the loop:
calls that wait for the broker (subscribe, flush, close) run in the backend's
worker threads while the caller awaits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..pubsub.base import Capabilities, Message

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["AsyncPubSubBackend", "Capabilities", "Message"]


class AsyncPubSubBackend(ABC):
    """Abstract base of the asyncio backends.

    Concurrency: ``publish()`` and ``subscribe()`` may be awaited from several
    tasks at once; ``listen()``/``receive()`` serve one consuming task at a time;
    ``close()`` may be awaited from any task of the loop and ends a ``listen()``
    or ``receive()`` waiting in another. Cancelling a task that waits in
    ``listen()`` or ``receive()`` loses no message: what was not handed to the
    application stays queued for the next call, and is not acknowledged.

    After ``close()``: ``publish()``, ``subscribe()``, ``listen()`` and
    ``receive()`` raise :class:`~msight_core.errors.ClosedError`; ``flush()``
    and ``close()`` return at once.

    Attributes:
        capabilities: what this backend guarantees, as for the synchronous one.
    """

    capabilities: Capabilities = Capabilities()

    @abstractmethod
    async def subscribe(self, topic: Any) -> None:
        """Subscribe to a topic; returns once the broker confirmed it.

        A message published after it returns is delivered. Subscribing twice is
        a no-op. Cancelling the awaiting task does not undo a subscription the
        broker is already making.

        Raises:
            InvalidTopicError: the name is not portable across brokers (at once).
            ClosedError: the backend was closed.
            BrokerUnavailableError: the broker cannot be reached.
        """

    @abstractmethod
    async def publish(self, topic: Any, serialized_data: bytes) -> None:
        """Accept a message for sending; never waits for a broker round trip.

        Returns as soon as the message is queued, in order, behind the others.
        Waits (without blocking the loop) only while the backend's outgoing
        buffer is full, for up to the publish timeout. Use :meth:`flush` to
        wait until everything accepted reached the broker.

        Raises:
            TypeError: the payload is not bytes-like (at once; nothing queued).
            InvalidTopicError: the name is not portable (at once).
            ClosedError: the backend was closed.
            BackpressureError: the buffer stayed full for the publish timeout.
            PublishError: an earlier accepted message could not be delivered.
        """

    @abstractmethod
    def listen(self) -> AsyncIterator[bytes]:
        """Return an async iterator over the payloads of the subscribed topics.

        Not a coroutine: the checks run on the call. Iterating waits while no
        message is queued and ends when :meth:`close` is called. On backends
        with acknowledgements a message is acknowledged when the application
        asks for the next one (or closes the backend without an error).

        Raises:
            RuntimeError: at once, if nothing was subscribed.
            ClosedError: the backend was closed before the call.
        """

    @abstractmethod
    async def receive(self, timeout: float | None = None) -> Message | None:
        """Take the next message with its topic; ``None`` after ``timeout`` seconds.

        Raises:
            RuntimeError: nothing was subscribed.
            ClosedError: the backend is closed (also when closed while waiting).
        """

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every accepted message has reached the broker.

        Raises:
            BackpressureError: not everything was delivered within ``timeout``
                (``None``: the publish timeout).
            PublishError: an accepted message failed to deliver.
        """

    async def close(self) -> None:
        """Deliver what was accepted (bounded by the publish timeout), then release all.

        Idempotent; a second caller waits for the first close to finish.

        Raises:
            PublishError: on backends that confirm deliveries (Kafka), accepted
                messages were not delivered; the backend is closed all the same.
        """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
