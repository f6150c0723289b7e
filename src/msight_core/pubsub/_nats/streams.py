"""JetStream stream and consumer helpers of the NATS backend (not public API).

JetStream mode stores each topic in a stream: :func:`ensure_topic_stream` finds
the stream that already covers the subject or creates ``MSIGHT_<topic>_<hash>``.
A group's durable consumer is named by :func:`durable_name`; the push consumer
settings msight uses are :func:`consumer_config`.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import nats.js.errors
from nats.js import api

from ...errors import BrokerError

__all__ = ["consumer_config", "durable_name", "ensure_topic_stream", "stream_name"]

_NAME_RE = re.compile(r"[^A-Za-z0-9_-]")


def stream_name(topic: str) -> str:
    """The name of the stream msight creates for ``topic``."""
    digest = hashlib.sha1(topic.encode()).hexdigest()[:8]
    return f"MSIGHT_{_NAME_RE.sub('_', topic)[:100]}_{digest}"


def durable_name(group_id: str) -> str:
    """A JetStream consumer name for ``group_id`` (stable across restarts)."""
    clean = _NAME_RE.sub("_", group_id)[:100]
    if clean != group_id:
        clean += "_" + hashlib.sha1(group_id.encode()).hexdigest()[:8]
    return clean


def consumer_config(grouped: bool, ack_wait: float, max_ack_pending: int) -> Any:
    """Explicit acks; a group replays what it has not acknowledged, a lone
    subscriber starts at new messages."""
    return api.ConsumerConfig(
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_ack_pending=max_ack_pending,
        deliver_policy=api.DeliverPolicy.ALL if grouped else api.DeliverPolicy.NEW,
    )


async def ensure_topic_stream(
    nc: Any, topic: str, max_age: float, max_bytes: int, timeout: float, replicas: int = 1
) -> str:
    """The stream that stores ``topic``: an existing one, or a new file stream
    replicated on ``replicas`` servers of a JetStream cluster."""
    jsm = nc.jsm(timeout=timeout)
    try:
        return str(await jsm.find_stream_name_by_subject(topic))
    except nats.js.errors.NotFoundError:
        pass
    name = stream_name(topic)
    config = api.StreamConfig(
        name=name,
        description=f"msight topic {topic}",
        subjects=[topic],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_age=max_age,
        max_bytes=max_bytes or -1,
        duplicate_window=min(max_age, 120.0),
        num_replicas=replicas,
    )
    try:
        await jsm.add_stream(config)
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != 10058:
            raise BrokerError(
                f"NATS JetStream cannot create a stream for {topic!r}: {exc.description}"
            ) from exc
    return name
