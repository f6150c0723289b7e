"""asyncio twins of the pub/sub backends, chosen with ``MSIGHT_PUBSUB_BACKEND``.

::

    from msight_core.aio import get_async_pubsub

    async with get_async_pubsub(group_id="detectors") as ps:
        await ps.subscribe("camera1.frames")
        await ps.publish("camera1.detections", payload)   # never waits for a round trip
        async for data in ps.listen():                     # bytes, as the sync listen()
            ...
        await ps.flush()

:class:`AsyncRedisPubSub`, :class:`AsyncNATSPubSub`, :class:`AsyncKafkaPubSub`
and :class:`AsyncMemoryPubSub` keep the contract of their synchronous twins
(:class:`AsyncPubSubBackend` says it once) and pass the same conformance suite
(:mod:`msight_core.testing.aio`). Importing this package imports no broker
client; each backend is imported on first use.

How it works. The Redis, Kafka and memory backends hold their synchronous twin and reuse
its I/O threads and bounded receive queue:

* **Receiving**: the reader thread queues a batch and, if the loop's consumer
  waits, resolves its future with one ``call_soon_threadsafe``; the consumer
  takes messages from the queue on the loop, without blocking. A message
  leaves the queue only in the same synchronous step that hands it to the
  application, so cancelling a task in ``listen()``/``receive()`` loses and
  acknowledges nothing it did not get. On a fast stream (over 2000 wake-ups a
  second) the consumer polls the queue every 0.5 ms instead of being woken per
  batch, until the stream pauses.
* **Publishing**: a small message to a topic already used goes straight into
  the synchronous backend's outgoing buffer, as the blocking API does, while
  that buffer is far from full; anything else (a topic's first message, which
  may connect or create a topic; large payloads; a nearly full buffer) is
  appended to an outlet that a worker thread hands over, in order. The loop
  therefore never waits for a connect, a topic creation or a full outage
  buffer; that reaches it only as backpressure (``publish()`` awaits room).
* **NATS** runs nats-py on the caller's loop, no thread: the backend's parser,
  publisher and modes (:class:`~msight_core.pubsub.nats.NATSLoopClient`) work
  there, received batches go into the same receive queue with a plain
  ``call_soon`` wake-up, and ``publish()`` appends to the publisher's buffer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..config import backend_name
from .base import AsyncPubSubBackend, Capabilities, Message

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .kafka import AsyncKafkaPubSub
    from .memory import AsyncMemoryPubSub
    from .nats import AsyncNATSPubSub
    from .redis import AsyncRedisPubSub

__all__ = [
    "AsyncKafkaPubSub",
    "AsyncMemoryPubSub",
    "AsyncNATSPubSub",
    "AsyncPubSubBackend",
    "AsyncRedisPubSub",
    "Capabilities",
    "Message",
    "get_async_pubsub",
]

_LAZY = {
    "AsyncRedisPubSub": ".redis",
    "AsyncNATSPubSub": ".nats",
    "AsyncKafkaPubSub": ".kafka",
    "AsyncMemoryPubSub": ".memory",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def get_async_pubsub(
    group_id: str | None = None, env: Mapping[str, str] | None = None
) -> AsyncPubSubBackend:
    """Build the async backend named by ``MSIGHT_PUBSUB_BACKEND`` (default ``redis``).

    Nothing connects until the first ``subscribe()`` or ``publish()``; calling
    this from inside a running loop is fine.

    Args:
        group_id: load-balancing group (NATS queue group, Kafka consumer group,
            memory group). Redis has no groups: every subscriber gets everything.
        env: environment mapping to read instead of ``os.environ``.

    Raises:
        ConfigError: unknown backend name, a backend without an async twin
            (``shm``), or an invalid ``MSIGHT_*`` value.
        MissingDependencyError: the backend's extra is not installed.
    """
    from ..errors import ConfigError
    from ..pubsub.utils import backend_config

    name = backend_name(env)
    if name == "shm":
        raise ConfigError(
            f"MSIGHT_PUBSUB_BACKEND={name} has no asyncio backend yet; use the synchronous "
            "get_pubsub() in a worker thread"
        )
    config = backend_config(name, group_id, env)
    if name == "redis":
        from .redis import AsyncRedisPubSub

        return AsyncRedisPubSub(config)
    if name == "nats":
        from .nats import AsyncNATSPubSub

        return AsyncNATSPubSub(config)
    if name == "kafka":
        from .kafka import AsyncKafkaPubSub

        return AsyncKafkaPubSub(config)
    from .memory import AsyncMemoryPubSub

    return AsyncMemoryPubSub(group_id=group_id, queue=config)
