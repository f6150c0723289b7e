"""Pub/sub backend base interface.

:class:`PubSubBackend` is the seed's contract: ``subscribe(topic)``,
``publish(topic, serialized_data)`` and ``listen()``, identical in behaviour on
every backend (Redis, NATS, Kafka and the in-process one), so an application
switches brokers with ``MSIGHT_PUBSUB_BACKEND`` and no code change. It also
carries what the seed leaves to implementations and applications need:
``close()``, context-manager support, ``flush()`` and a :class:`Capabilities`
description used by the conformance suite.

Payloads are bytes in, bytes out: serialize a :class:`~msight_core.data.Data`
value first (``data.serialize()``), and decode what ``listen()`` yields with
``Data.deserialize(payload)``.

A custom backend written as in the seed's example (subclass, implement the three
abstract methods, no ``super().__init__()`` call) keeps working: nothing here
depends on state set up by a constructor. The shared conformance suite,
:class:`~msight_core.testing.conformance.PubSubConformance`, says when such a
backend behaves like the others.

Example:
    The same code on every backend::

        from msight_core.pubsub import get_pubsub

        with get_pubsub() as pubsub:          # MSIGHT_PUBSUB_BACKEND, default redis
            pubsub.subscribe("camera1.frames")
            for payload in pubsub.listen():   # bytes, until close()
                handle(payload)             # your code
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

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
        patterns: ``subscribe()`` takes wildcard patterns (``camera1.*`` for one
            token, ``camera1.>`` for the rest, NATS semantics) and each message
            says which topic it came from (``receive()``'s ``Message.topic``).
    """

    broadcast: bool = True
    groups: bool = False
    persistent: bool = False
    ordered: bool = True
    max_payload: int | None = None
    patterns: bool = False


class Message(NamedTuple):
    """One received message: the topic it came from and its payload bytes."""

    topic: str
    data: bytes


class PubSubBackend(ABC):
    """Abstract base class for pub/sub messaging backends.

    Subclasses implement :meth:`subscribe`, :meth:`publish` and :meth:`listen`;
    :meth:`flush` and :meth:`close` have do-nothing defaults for backends
    that hold nothing. The msight backends connect lazily, on the first
    ``subscribe()`` or ``publish()``. Using a backend as a context manager
    calls :meth:`close` on exit.

    Thread safety: ``publish()`` and ``subscribe()`` may be called from several
    threads at once on all msight backends; ``listen()`` is consumed by one
    thread at a time; ``close()`` may be called from any thread and wakes a
    blocked ``listen()``.

    After ``close()``: ``publish()``, ``subscribe()`` and ``listen()`` raise
    :class:`~msight_core.errors.ClosedError`; ``flush()`` and ``close()``
    return at once.

    The msight backends (all built on one shared template) also offer
    ``receive(timeout)``, which returns the next :class:`Message` or ``None``
    after ``timeout`` seconds, ``topics`` (the names subscribed, in order) and
    ``stats()`` (delivered, queued and dropped counts).

    Attributes:
        capabilities: what this backend guarantees (:class:`Capabilities`),
            declared on the class, or on the instance when it depends on the
            configuration (NATS in JetStream mode is persistent).
    """

    #: What this backend guarantees. Subclasses override it on the class, or on the
    #: instance when it depends on the configuration (NATS JetStream mode).
    capabilities: Capabilities = Capabilities()

    @abstractmethod
    def subscribe(self, topic: Any) -> None:
        """Subscribe to a topic for receiving messages.

        Blocks until the broker confirms the subscription (where it does), so a
        message published after ``subscribe()`` returns is delivered; on Redis
        and core NATS nothing published before is. Several topics may be
        subscribed on one instance; subscribing twice to the same topic is a
        no-op. A message that several of an instance's subscriptions match (a
        name and a pattern covering it) arrives once per match on Redis, NATS
        and memory, once on Kafka; :func:`~msight_core.topics.subscription_set`
        leaves covered entries out. Thread-safe.

        Args:
            topic: a :class:`~msight_core.topics.Topic` (anything with ``.name``)
                or a plain ``str`` topic name; on backends whose
                ``capabilities.patterns`` is true, also a wildcard pattern
                (``camera1.*``: one token; ``camera1.>``: one or more tokens).

        Raises:
            InvalidTopicError: the name or pattern is not portable across
                brokers, or this backend takes no patterns.
            ClosedError: the backend was closed.
            BrokerUnavailableError: the broker cannot be reached.
            PermissionDeniedError: the broker's access rules refuse the topic.
        """

    @abstractmethod
    def publish(self, topic: Any, serialized_data: bytes) -> None:
        """Publish a message to a topic.

        Does not wait for a broker round trip: the message is queued and sent in
        order with others. Use :meth:`flush` to wait until everything accepted
        so far has reached the broker. Blocks only while the backend's outage
        buffer is full (the broker is away), for up to the publish timeout
        (``MSIGHT_PUBLISH_TIMEOUT``). Thread-safe.

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

        The checks run when ``listen()`` is called, not at the first ``next()``.
        Iterating blocks while no message is waiting and ends when :meth:`close`
        is called (from any thread). Each payload is ``bytes``, exactly as
        published. One thread consumes it at a time. On backends with
        acknowledgements a message counts as processed, and is acknowledged,
        when the application asks for the next one or closes the backend.

        Yields:
            The payload of each message, in arrival order.

        Raises:
            RuntimeError: at once, if nothing was subscribed.
            ClosedError: the backend was closed before the call.
        """

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every accepted message has reached the broker.

        Blocks for at most ``timeout`` seconds. Thread-safe. Returns at once
        after ``close()``, and in this default implementation, for backends
        that buffer nothing.

        Args:
            timeout: seconds to wait at most; ``None`` uses the backend's
                configured publish timeout.

        Raises:
            BackpressureError: not everything was delivered in time.
            PublishError: an accepted message failed to deliver.
        """

    def close(self) -> None:
        """Flush pending publishes, release connections and stop ``listen()``.

        Blocks while pending publishes are flushed, bounded in time (the publish
        timeout) even when the broker is gone; what could not be sent then is
        logged. Idempotent, and safe to call from any thread: a ``listen()``
        blocked in another thread ends. After it, ``publish()``,
        ``subscribe()`` and ``listen()`` raise
        :class:`~msight_core.errors.ClosedError`.

        Raises:
            PublishError: on backends that confirm deliveries (Kafka), accepted
                messages were not delivered; the backend is closed all the same.
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
