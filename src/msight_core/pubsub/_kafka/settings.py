"""librdkafka settings of the Kafka backend's clients.

:func:`producer_conf`, :func:`consumer_conf` and :func:`admin_conf` build the
property dicts from a :class:`~msight_core.config.KafkaConfig`, on top of the
shared :func:`~msight_core.config.kafka_client_conf` (servers, security, the
``client`` pass-through); each role's own pass-through (``config.producer``,
``config.consumer``) is applied last. Secrets are revealed only into these
dicts. Also here: :func:`delivery_timeout`, :func:`unique_group_id`, and the
log filter that keeps librdkafka's reconnect noise off the ERROR level.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

from ...config import KafkaConfig, Secret, kafka_client_conf
from .chunks import RECORD_OVERHEAD

__all__ = [
    "FAIL_LOG_INTERVAL",
    "METADATA_REFRESH_MS",
    "admin_conf",
    "consumer_conf",
    "delivery_timeout",
    "librdkafka_logger",
    "producer_conf",
    "unique_group_id",
]

#: Where every client built here sends librdkafka's log lines (served by ``poll()``).
librdkafka_logger = logging.getLogger("msight_core.pubsub.kafka.librdkafka")
#: Consumers' metadata refresh (ms): how soon new topics matching a wildcard are seen.
METADATA_REFRESH_MS = 2000
#: Seconds between two logged connection failures of one librdkafka client.
FAIL_LOG_INTERVAL = 30.0
MiB = 1024 * 1024


class _RetriedFailuresAreWarnings(logging.Filter):
    """Keep librdkafka's reconnect noise out of the ERROR level and off the logs.

    librdkafka logs each failed broker connection (facility ``FAIL``) as an
    error, though it retries, and other bootstrap servers may be fine; the
    outage itself is reported once through ``error_cb``. The first such line of
    a client in :data:`FAIL_LOG_INTERVAL` seconds is kept as a WARNING, the rest
    only reach DEBUG. ``FATAL`` lines of a producer become warnings too: the
    publisher replaces a failed producer and logs what it does about it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.levelno <= logging.DEBUG or not isinstance(args, tuple) or len(args) < 2:
            return True
        facility, client = args[0], str(args[1])
        if facility == "FATAL" and "producer" in client:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            return True
        if facility != "FAIL":
            return True
        now = time.monotonic()
        if now - self._last.get(client, -FAIL_LOG_INTERVAL) < FAIL_LOG_INTERVAL:
            if not librdkafka_logger.isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return True
        if len(self._last) > 1000:
            self._last.clear()
        self._last[client] = now
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


librdkafka_logger.addFilter(_RetriedFailuresAreWarnings())


def _revealed(props: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.reveal() if isinstance(v, Secret) else v) for k, v in props.items()}


def _client_conf(config: KafkaConfig, error_cb: Any) -> dict[str, Any]:
    # The shared properties come last: the ``client`` pass-through overrides ours.
    conf: dict[str, Any] = {"logger": librdkafka_logger}
    if error_cb is not None:
        conf["error_cb"] = error_cb
    conf.update(kafka_client_conf(config))
    return conf


def admin_conf(config: KafkaConfig) -> dict[str, Any]:
    """Properties of the AdminClient (topic creation and limits)."""
    return _client_conf(config, None)


def delivery_timeout(config: KafkaConfig) -> float:
    """Seconds librdkafka keeps trying an accepted message (``message.timeout.ms``).

    ``KafkaConfig.delivery_timeout`` if set, else 3 x ``PublishConfig.timeout``
    (30 s by default): a message the broker cannot take is reported as a
    :class:`~msight_core.errors.PublishError` after that, not after librdkafka's
    default of 300 s.
    """
    if config.delivery_timeout is not None:
        return config.delivery_timeout
    return min(3 * config.publish.timeout, 2_000_000.0)


def producer_conf(
    config: KafkaConfig, on_delivery: Any, error_cb: Any, stats_cb: Any = None
) -> dict[str, Any]:
    """Idempotent, ``acks=all``, batched producer with a bounded outage buffer.

    ``stats_cb`` (optional) receives librdkafka's statistics 4 times a second;
    the publisher uses them to notice a broker that keeps rejecting its producer id.
    """
    biggest = config.max_message_bytes + RECORD_OVERHEAD
    conf = _client_conf(config, error_cb)
    conf.update(
        {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": max(100, int(delivery_timeout(config) * 1000)),
            # A topic missing from the metadata fails its messages after 1 s (not
            # 30 s): the publisher then creates it again and re-sends them.
            "topic.metadata.propagation.max.ms": 1000,
            "message.max.bytes": min(max(1_000_000, biggest), 1_000_000_000),
            # librdkafka's own bound is the outage buffer; one maximal frame always fits.
            "queue.buffering.max.kbytes": max(
                1, min(max(config.publish.buffer_bytes, biggest + MiB) // 1024, 2**31 - 1)
            ),
            "queue.buffering.max.messages": 1_000_000,
            "delivery.report.only.error": True,
            "on_delivery": on_delivery,
        }
    )
    if stats_cb is not None:
        conf["stats_cb"] = stats_cb
        conf["statistics.interval.ms"] = 250
    if not config.ordered:
        # Every message picks a partition on its own, so one publisher's burst is
        # balanced across a group (sticky batching would send it all to one member).
        conf["sticky.partitioning.linger.ms"] = 0
    conf.update(_revealed(config.producer))
    return conf


def consumer_conf(config: KafkaConfig, group_id: str, error_cb: Any) -> dict[str, Any]:
    """Manual-commit consumer able to fetch the largest frame the config allows."""
    fetch_max = max(52_428_800, config.max_message_bytes + MiB)
    conf = _client_conf(config, error_cb)
    conf.update(
        {
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": config.start,
            "enable.partition.eof": False,
            "fetch.max.bytes": fetch_max,
            "receive.message.max.bytes": min(fetch_max + 2 * MiB, 2_147_483_647),
            # A broker may hold an empty fetch this long even when data arrives
            # meanwhile (tansu does): at camera rates it adds up to this much
            # latency. 10 ms costs an idle consumer ~100 small requests a second.
            "fetch.wait.max.ms": 10,
            # Also how soon a wildcard subscription sees a new topic (:mod:`.patterns`).
            "topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS,
        }
    )
    conf.update(_revealed(config.consumer))
    if "heartbeat.interval.ms" not in conf and "session.timeout.ms" in conf:
        # librdkafka's 3 s default is too slow for a short session: a third of it.
        try:
            session = int(conf["session.timeout.ms"])
        except (TypeError, ValueError):
            session = 45_000
        conf["heartbeat.interval.ms"] = max(100, min(3000, session // 3))
    return conf


def unique_group_id() -> str:
    """A consumer group used by one instance only (broadcast subscribers)."""
    return f"msight-solo-{uuid.uuid4().hex}"
