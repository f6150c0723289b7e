"""NodeConfig: msight-core 2.x's node settings plus a few of ours."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Any

from ..errors import ConfigError

__all__ = ["ErrorPolicy", "NodeConfig", "NodeStatus"]


class ErrorPolicy(str, Enum):
    """What a node does when handling one message (or producing one) raises."""

    STOP = "stop"
    """Log the error with its traceback, shut down cleanly, then re-raise it."""
    CONTINUE = "continue"
    """Log the error (traceback at most every few seconds), count it, go on."""


class NodeStatus(Enum):
    REGISTERED = "registered"
    RUNNING = "running"
    STOPPED = "stopped"
    ERROR = "error"


@dataclass
class NodeConfig:
    """Settings of one node; ``None`` means "use the node class's default".

    Attributes:
        name: the node's name (required), used in logs and statistics.
        publish_topic_name: topic the node publishes to.
        subscribe_topic_name: topic the node subscribes to.
        publish_topic_data_type: :class:`~msight_core.data.Data` subclass (or tag)
            published.
        subscribe_topic_data_type: Data subclass (or tag) expected; messages of
            other types are errors. Default: any Data.
        action_on_error: ``"stop"`` or ``"continue"`` (see :class:`ErrorPolicy`).
        gap: handle only every ``gap + 1``-th frame (0: all).
        group_id: load-balancing group: nodes sharing it split the messages on
            NATS and Kafka (Redis has no groups).
        sensor_name: source nodes stamp it on SensorData they produce.
        logging_level: level of the node's logger (``"INFO"``, ``"DEBUG"`` ...).
        heartbeat_update_interval, heartbeat_tolerance, heartbeat_checking_duration:
            accepted so msight-core 2.x configs load; not used (no heartbeat thread).
        rate: source nodes: frames per second (``None``/0: as fast as ``get_data``).
        stats_interval: seconds between one-line statistics summaries (0: never).
        device_name: source nodes stamp it on SensorData they produce.
        register_topics: use the Redis topic registry; ``None`` = only when the
            backend is Redis (a registry failure then only logs a warning).
        receive_timeout: seconds a loop waits for a message before checking the
            stop flag again.
        flush_timeout: seconds to wait for pending publishes at shutdown.
        zero_copy: processing nodes on a backend with ``receive_view()`` (shm)
            decode messages straight from shared memory (default ``True``; see
            :mod:`msight_core.nodes` for how long the arrays stay valid).
        metrics_port: serve Prometheus ``/metrics`` on this port while spinning
            (extra ``metrics``; 0: any free port; default ``MSIGHT_METRICS_PORT``,
            unset: no endpoint). See :mod:`msight_core.metrics`.
    """

    name: str | None = None
    publish_topic_name: str | None = None
    subscribe_topic_name: str | None = None
    publish_topic_data_type: Any = None
    subscribe_topic_data_type: Any = None
    heartbeat_update_interval: int | None = None
    action_on_error: str | ErrorPolicy | None = None
    heartbeat_tolerance: float | None = None
    heartbeat_checking_duration: float | None = None
    gap: int | None = None
    group_id: str | None = None
    sensor_name: str | None = None
    logging_level: str | None = None
    rate: float | None = None
    stats_interval: float | None = None
    device_name: str | None = None
    register_topics: bool | None = None
    receive_timeout: float | None = None
    flush_timeout: float | None = None
    metrics_port: int | None = None
    zero_copy: bool | None = None

    def update(self, cfg: NodeConfig | None) -> None:
        """Copy every non-``None`` value of ``cfg`` into this config."""
        if cfg is None:
            return
        for f in fields(self):
            v = getattr(cfg, f.name, None)
            if v is not None:
                setattr(self, f.name, v)

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key, None)
        return default if value is None else value

    def copy(self) -> NodeConfig:
        return replace(self)

    def __repr__(self) -> str:
        inner = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) is not None
        )
        return f"NodeConfig({inner})"

    # -- validation used by the nodes ----------------------------------------------

    def error_policy(self) -> ErrorPolicy:
        try:
            return ErrorPolicy(str(getattr(self.action_on_error, "value", self.action_on_error)))
        except ValueError:
            raise ConfigError(
                f"action_on_error must be 'stop' or 'continue', got {self.action_on_error!r}"
            ) from None

    def log_level(self) -> int:
        level = self.logging_level or "INFO"
        value = logging.getLevelName(str(level).upper()) if isinstance(level, str) else level
        if not isinstance(value, int):
            raise ConfigError(f"logging_level {level!r} is not a logging level")
        return value

    def number(self, key: str, minimum: float = 0.0) -> float:
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            raise ConfigError(f"NodeConfig.{key} must be a number >= {minimum}, got {value!r}")
        return float(value)
