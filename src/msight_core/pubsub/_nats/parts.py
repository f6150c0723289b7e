"""How a NATS backend is put together from its roles (not public API).

:func:`assemble` builds the connection, the large-frame store, the publisher,
the mode and the subscriber of one backend, wired through their narrow
arguments, for the synchronous backend (nats-py on a loop thread of its own)
or the asyncio one (nats-py on the caller's loop: ``native``). :func:`counters`
is the ``stats()`` both report. Neither holds a reference to the backend.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...config import NatsConfig, OverflowPolicy
from ...tracing import outgoing
from .._core import Delivery
from .commands import header_lines
from .conn import Connection, client_options
from .frames import LargeFrames
from .listeners import Listeners
from .modes import CoreMode, JetStreamMode
from .publisher import Publisher
from .subscriber import Subscriber

__all__ = ["Parts", "assemble", "counters", "trace_lines"]


@dataclass(frozen=True)
class Parts:
    """The roles of one NATS backend."""

    conn: Connection
    large: LargeFrames
    publisher: Publisher
    mode: CoreMode | JetStreamMode
    subscriber: Subscriber
    listeners: Listeners


def assemble(
    config: NatsConfig,
    deliver: Callable[[list[Delivery]], Any],
    fail: Callable[[BaseException], None],
    offer: Callable[[deque[Delivery]], None] | None = None,
) -> Parts:
    """The roles of a backend with ``config`` feeding a receive queue.

    Args:
        config: the backend's settings.
        deliver: the queue's ``put_many``.
        fail: the queue's ``fail`` (the connection closed for good).
        offer: the queue's ``offer`` for a backend whose client runs on the
            caller's loop (the asyncio one); ``None``: a loop thread of its own.

    Raises:
        ConfigError: TLS files cannot be loaded, or auth settings conflict.
    """
    native = offer is not None
    conn = Connection(config, client_options(config))
    large = LargeFrames(
        config.large_frame_ttl,
        config.large_frame_store_bytes,
        config.publish.timeout,
        core=not config.jetstream,
    )
    publisher = Publisher(config.jetstream, config.publish, large, conn.where, conn.describe)
    mode: CoreMode | JetStreamMode
    if config.jetstream:
        mode = JetStreamMode(config, None if native else conn.run, conn.current, publisher.send_raw)
    else:
        mode = CoreMode(config.group_id, config.connect_timeout)
    subscriber = Subscriber(
        mode,
        large,
        deliver,
        config.connect_timeout,
        blocking=config.queue.overflow is OverflowPolicy.BLOCK,
        offer=offer,
    )
    listeners = Listeners(
        created=subscriber.attach,
        connected=publisher.start,
        lost=publisher.lost_connection,
        restored=publisher.reconnected,
        dropped=subscriber.route_done,
        closed=fail,
        topics=subscriber.topics,
        refused=publisher.refused,
    )
    return Parts(conn, large, publisher, mode, subscriber, listeners)


def trace_lines() -> bytes:
    """The header lines (W3C trace context) a publish adds now; ``b""`` mostly."""
    headers = outgoing()
    return header_lines(headers) if headers else b""


def counters(parts: Parts) -> dict[str, Any]:
    """The backend's counters beyond the receive queue's (its ``stats()``)."""
    pub = parts.publisher
    conn = parts.conn
    buffered, unacked = pub.pending()
    return {
        "published": pub.published,
        "possibly_lost": pub.possibly_lost,
        "publish_buffered": buffered,
        "unacknowledged": unacked,
        "resent": pub.resent,
        "publish_retried": pub.retried,
        "publish_failed": pub.failed,
        "refused": pub.refusals,
        "large_frames_sent": pub.frames,
        "large_frames_unchunked": parts.large.quiet.skipped,
        "large_frames_received": parts.large.fetched,
        "large_frames_lost": parts.large.lost,
        # Frames that waited for their subscribers' confirmations, how long in all,
        # and subscribers no longer waited for (they kept frames waiting too long).
        "large_frames_paced": parts.large.flow.waits,
        "large_frames_pace_seconds": round(parts.large.flow.waited, 3),
        "large_frame_readers_set_aside": parts.large.flow.set_aside,
        "malformed_dropped": parts.subscriber.dropped,
        "reconnects": conn.reconnects,
        "outage_seconds": round(conn.outage_seconds, 3),
        "slow_consumer_drops": conn.slow_consumer_drops,
    }
