"""Pub/sub backend base interface.

:class:`PubSubBackend` is the seed's contract: ``subscribe(topic)``,
``publish(topic, serialized_data)`` and ``listen()``, identical in behaviour on
every backend. It also carries what the seed leaves to implementations and
applications need: ``close()``, context-manager support, ``flush()`` and a
:class:`Capabilities` description used by the conformance suite.

A custom backend written as in the seed's example (subclass, implement the three
abstract methods, no ``super().__init__()`` call) keeps working: nothing here
depends on state set up by a constructor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

if TYPE_CHECKING:
    from typing_extensions import Self


__all__ = ["Capabilities", "Message", "PubSubBackend"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend guarantees; the conformance suite skips what is missing.

    Attributes:
        broadcast: every subscriber without a group gets every message.
        groups: subscribers sharing a ``group_id`` split the messages (each to one).
        persistent: messages published while no subscriber listens are kept and
            delivered later (at-least-once, replay).
        ordered: one publisher's messages to one topic arrive in publish order.
        max_payload: largest payload in bytes the backend carries, ``None`` if
            limited only by memory.
    """

    broadcast: bool = True
    groups: bool = False
    persistent: bool = False
    ordered: bool = True
    max_payload: int | None = None


class Message(NamedTuple):
    """One received message: the topic it came from and its payload bytes."""

    topic: str
    data: bytes


class PubSubBackend(ABC):
    """Abstract base class for pub/sub messaging backends.

    Thread safety: ``publish()`` may be called from several threads at once on
    all msight backends; ``listen()`` is consumed by one thread at a time;
    ``close()`` may be called from any thread and wakes a blocked ``listen()``.
    """

    #: What this backend guarantees. Subclasses override.
    capabilities: ClassVar[Capabilities] = Capabilities()

    @abstractmethod
    def subscribe(self, topic: Any) -> None:
        """Subscribe to a topic for receiving messages.

        Blocks until the broker confirms the subscription (where it does), so a
        message published after ``subscribe()`` returns is delivered. Several
        topics may be subscribed on one instance; subscribing twice to the same
        topic is a no-op.

        Args:
            topic: a :class:`~msight_core.topics.Topic` (anything with ``.name``)
                or a plain ``str`` topic name.

        Raises:
            InvalidTopicError: the name is not portable across brokers.
            ClosedError: the backend was closed.
            BrokerUnavailableError: the broker cannot be reached.
        """

    @abstractmethod
    def publish(self, topic: Any, serialized_data: bytes) -> None:
        """Publish a message to a topic.

        Does not wait for a broker round trip: the message is queued and sent in
        order with others. Use :meth:`flush` to wait until everything accepted
        so far has reached the broker. Thread-safe.

        Args:
            topic: a :class:`~msight_core.topics.Topic` or a ``str`` name.
            serialized_data: ``bytes``, ``bytearray`` or ``memoryview``; the
                payload goes on the wire unchanged. Mutable buffers are copied.

        Raises:
            TypeError: the payload is not bytes-like (a ``str`` is refused).
            InvalidTopicError: the name is not portable across brokers.
            PayloadTooLargeError: the broker cannot carry this payload.
            ClosedError: the backend was closed.
            BackpressureError: the outage buffer is full and stayed full.
            PublishError: an earlier accepted message failed to deliver.
        """

    @abstractmethod
    def listen(self) -> Iterator[bytes]:
        """Return an iterator over the payloads of subscribed topics.

        Blocks while no message is waiting. Ends when :meth:`close` is called
        (from any thread). On backends with acknowledgements a message counts as
        processed, and is acknowledged, when the application asks for the next
        one or closes the backend.

        Raises:
            RuntimeError: at once, if nothing was subscribed.
            ClosedError: the backend was closed before the call.
        """

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every accepted message has reached the broker.

        Args:
            timeout: seconds to wait at most; ``None`` uses the backend's
                configured publish timeout.

        Raises:
            BackpressureError: not everything was delivered in time.
            PublishError: an accepted message failed to deliver.
        """

    def close(self) -> None:
        """Flush pending publishes, release connections and stop ``listen()``.

        Idempotent and bounded in time even when the broker is gone. After it,
        ``publish()`` and ``subscribe()`` raise :class:`ClosedError`.
        """

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
