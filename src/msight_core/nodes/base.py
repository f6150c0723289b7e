"""Node base classes: a source, a processing node and a sink.

A node composes the data types and a pub/sub backend, nothing else. The
backend is the one named by ``MSIGHT_PUBSUB_BACKEND`` (through
:func:`msight_core.pubsub.get_pubsub`, with the node's ``group_id``), or one
passed in. :meth:`Node.spin` runs the loop in the calling thread:

- SIGINT/SIGTERM (when spinning in the main thread) or :meth:`Node.stop` end it
  cleanly: the message in hand is finished, pending publishes are flushed and the
  backend is closed (which commits Kafka offsets); ``spin()`` then returns, so a
  script exits with code 0. A second signal interrupts at once.
- A received message that does not decode (a
  :class:`~msight_core.errors.DeserializationError`: a peer's malformed or
  hostile bytes) costs that message only, whatever the policy: it is counted as
  an error, handed to ``on_error`` and logged, and the node goes on.
- An exception while producing, processing or publishing (this node's own code)
  follows ``action_on_error``: ``"continue"`` logs and counts it, ``"stop"`` logs
  it, shuts down cleanly and re-raises it from ``spin()``. The policy covers
  everything done with a received message (latency, statistics, the hooks,
  processing, publishing the result).
- Statistics (counts, rates, processing time, latency from the capture
  timestamp) are logged as one line every ``stats_interval`` seconds.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from ..data import Data, SensorData, get_data_type
from ..errors import (
    BackpressureError,
    BrokerError,
    ClosedError,
    ConfigError,
    DeserializationError,
)
from ..pubsub import PubSubBackend, get_pubsub
from ..topics import Topic, get_topic
from ._config import ErrorPolicy, NodeConfig, NodeStatus
from ._stats import NodeStats
from ._views import copy_out, kept, weak

__all__ = ["DataProcessingNode", "Node", "ProcessingNode", "SinkNode", "SourceNode"]

_TRACEBACK_INTERVAL = 5.0


def _data_class(value: Any, what: str) -> type[Data] | None:
    if value is None:
        return None
    if isinstance(value, type) and issubclass(value, Data):
        return value
    if isinstance(value, str):
        found = get_data_type(value) or get_data_type(value.rsplit(".", 1)[-1])
        if found is not None:
            return found
    raise ConfigError(f"{what} must be a Data subclass or a registered tag, got {value!r}")


class Node:
    """Base of all nodes: configuration, backend, topics, loop control, statistics.

    Args:
        configs: the node's settings, merged over the class's ``default_configs``.
        pubsub: a backend to use instead of ``get_pubsub(group_id=...)``. The node
            owns it from now on and closes it at shutdown.
        redis_client: client for the topic registry (default: one from
            ``MSIGHT_REDIS_MESSAGE_BROKER_*`` when the registry is used).
        env: environment mapping to read instead of ``os.environ``.
        metrics_port: serve Prometheus metrics on this port while spinning
            (overrides ``NodeConfig.metrics_port`` and ``MSIGHT_METRICS_PORT``;
            0: any free port, see :attr:`metrics_url`).

    Raises:
        ConfigError: a missing name or an invalid setting.
        MissingDependencyError: the backend's extra is not installed, or a
            metrics port is set without the ``metrics`` extra.
        BrokerError: the topic registry was required and failed.
    """

    default_configs: ClassVar[NodeConfig] = NodeConfig(
        action_on_error="stop",
        gap=0,
        logging_level="INFO",
        stats_interval=10.0,
        receive_timeout=0.2,
        flush_timeout=10.0,
    )
    combined_configs: ClassVar[NodeConfig]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        merged = getattr(cls, "combined_configs", Node.default_configs).copy()
        merged.update(cls.__dict__.get("default_configs"))
        cls.combined_configs = merged

    def __init__(
        self,
        configs: NodeConfig | None = None,
        pubsub: PubSubBackend | None = None,
        *,
        redis_client: Any = None,
        env: Any = None,
        metrics_port: int | None = None,
    ) -> None:
        base = getattr(type(self), "combined_configs", Node.default_configs)
        self.configs = base.copy()
        self.configs.update(configs)
        cfg = self.configs
        if not cfg.name or not isinstance(cfg.name, str):
            raise ConfigError("NodeConfig.name is required")
        self.name: str = cfg.name
        self.group_id = cfg.group_id
        self.error_policy = cfg.error_policy()
        self.gap = int(cfg.number("gap"))
        self.stats_interval = cfg.number("stats_interval")
        self.receive_timeout = cfg.number("receive_timeout", 0.001)
        self.flush_timeout = cfg.number("flush_timeout")
        self.logger = logging.getLogger(f"msight_core.nodes.{self.name}")
        self.logger.setLevel(cfg.log_level())
        self.stats = NodeStats(self.name)
        self.status = NodeStatus.REGISTERED
        self._stop_event = threading.Event()
        self._signal: int | None = None
        self._closed = False
        self._gap_count = 0
        self._last_traceback = 0.0
        self._last_pinned = 0.0
        self._own_redis: Any = None
        self._redis_client = redis_client
        self._env = env
        self.publish_topic_data_type = _data_class(
            cfg.publish_topic_data_type, "publish_topic_data_type"
        )
        wanted = _data_class(cfg.subscribe_topic_data_type, "subscribe_topic_data_type")
        self._metrics_config = _metrics_config(metrics_port, cfg.metrics_port, env)
        self._metrics: Any = None
        self._observer: Any = None
        if self._metrics_config is not None:
            from ..metrics import NodeObserver  # MissingDependencyError without the extra

            self._observer = self.stats.observer = NodeObserver()
        self._tracer: Any = None
        self.pubsub: PubSubBackend = (
            pubsub if pubsub is not None else get_pubsub(group_id=self.group_id, env=env)
        )
        try:
            self.publish_topic = self._topic(cfg.publish_topic_name, self.publish_topic_data_type)
            self.subscribe_topic = self._topic(cfg.subscribe_topic_name, wanted)
        except BaseException:
            self.close()
            raise
        registered = self.subscribe_topic.data_class if self.subscribe_topic else None
        self.subscribe_topic_data_type: type[Data] = wanted or registered or Data

    # -- topics ---------------------------------------------------------------------

    def _topic(self, name: str | None, data_type: type[Data] | None) -> Topic | None:
        if name is None:
            return None
        use = self.configs.register_topics
        if use is None:
            use = self._redis_client is not None or type(self.pubsub).__name__ == "RedisPubSub"
        if not use:
            return Topic(name, data_type)
        try:
            client = self._redis_client
            if client is None:
                from ..utils import get_redis_client

                client = self._redis_client = self._own_redis = get_redis_client(env=self._env)
            return get_topic(client, name, register_if_not_exist=True, data_type=data_type or Data)
        except BrokerError as exc:
            if self.configs.register_topics:
                raise
            self.logger.warning("topic registry unavailable (%s); using %r without it", exc, name)
            return Topic(name, data_type)

    # -- lifecycle hooks (override as needed) ---------------------------------------

    def on_before_spin(self) -> None:
        """Called in ``spin()`` once subscriptions are active, before the loop."""

    def on_before_iteration(self) -> None:
        """Called before each frame is produced or each message is processed."""

    def on_after_iteration(self) -> None:
        """Called after each frame or message was handled without error."""

    def on_before_publish(self, data: Data | list[Data]) -> None:
        """Called before :meth:`publish` sends ``data``."""

    def on_error(self, exc: Exception) -> None:
        """Called for every handling error, before the error policy applies."""

    def on_stop(self) -> None:
        """Called after the loop ended, before pending publishes are flushed."""

    # -- public API -----------------------------------------------------------------

    @property
    def metrics_url(self) -> str | None:
        """``http://host:port/metrics`` while the node serves metrics, else ``None``."""
        return self._metrics.url if self._metrics is not None else None

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called or a stop signal arrived."""
        return self._stop_event.is_set()

    def stop(self) -> None:
        """Ask the loop to end after the message in hand. Thread- and signal-safe."""
        self._stop_event.set()

    def publish(self, data: Data | list[Data]) -> None:
        """Serialize and publish ``data`` (or each item of a list) to the publish topic.

        Does not wait for the broker (see the backend's ``publish``).

        Raises:
            ConfigError: the node has no publish topic.
            SerializationError: a value cannot be serialized.
            BrokerError: the backend refused the message.
        """
        if self.publish_topic is None:
            raise ConfigError(f"node {self.name!r} has no publish_topic_name")
        self.on_before_publish(data)
        if self._tracer is None:
            self._publish_items(data)
            return
        with self._tracer.producing():  # a source's frame starts a trace
            self._publish_items(data)

    def _publish_items(self, data: Data | list[Data]) -> None:
        for item in data if isinstance(data, list) else (data,):
            payload = item.serialize()
            self.pubsub.publish(self.publish_topic, payload)
            self.stats.published(len(payload))

    def spin(self, life_span: int = -1, handle_signals: bool = True) -> None:
        """Run the node's loop in this thread until stopped.

        Args:
            life_span: iterations (frames produced or messages handled) before
                stopping by itself; -1 runs until stopped.
            handle_signals: install SIGINT/SIGTERM handlers for a clean stop
                (only possible in the main thread; restored on return).

        Raises:
            Exception: with ``action_on_error="stop"``, the error that stopped the
                node, re-raised after a clean shutdown.
            ClosedError: the node was already closed.
        """
        if self._closed:
            raise ClosedError(f"node {self.name!r} is closed")
        previous = self._install_signals() if handle_signals else {}
        _ensure_logging()
        try:
            self._start_telemetry()
            self._start()
            self.on_before_spin()
            self.status = NodeStatus.RUNNING
            self.logger.info("node %s running (%s)", self.name, self._describe())
            self._loop(life_span)
            if self._signal is not None:
                self.logger.info(
                    "node %s stopping on %s", self.name, signal.Signals(self._signal).name
                )
            self.status = NodeStatus.STOPPED
        except BaseException:
            self.status = NodeStatus.ERROR
            raise
        finally:
            try:
                self.close()
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

    def close(self) -> None:
        """Flush pending publishes and close the backend; idempotent, bounded in time."""
        if self._closed:
            return
        self._closed = True
        try:
            self.on_stop()
        except Exception:
            self.logger.exception("on_stop failed")
        try:
            self.pubsub.flush(self.flush_timeout)
        except Exception as exc:  # noqa: BLE001 - shutdown must reach close()
            self.logger.warning("pending publishes not flushed at shutdown: %s", exc)
        try:
            self.pubsub.close()
        except Exception as exc:  # noqa: BLE001 - shutdown must finish
            self.logger.warning("closing the backend failed: %s", exc)
        if self._own_redis is not None:
            try:
                self._own_redis.close()
            except Exception:
                self.logger.debug("closing the registry client failed", exc_info=True)
        metrics, self._metrics = self._metrics, None
        if metrics is not None:
            metrics.close()
        if self.status is not NodeStatus.REGISTERED:
            self.logger.info("node %s stopped: %s", self.name, self.stats.summary())

    def __enter__(self) -> Node:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop ---------------------------------------------------------------------

    def _start(self) -> None:
        """Set up before the loop (processing nodes subscribe here)."""

    def _start_telemetry(self) -> None:
        """Start the ``/metrics`` endpoint (metrics port set) and the tracer (otel set up)."""
        from ..tracing import node_tracer

        topic = self.subscribe_topic or self.publish_topic
        self._tracer = node_tracer(self.name, topic.name if topic else "", self.pubsub)
        config = self._metrics_config
        if config is None or self._metrics is not None:
            return
        from ..metrics import MetricsEndpoint, NodeCollector, backend_label

        collector = NodeCollector(
            self.name,
            backend_label(self.pubsub),
            self.subscribe_topic.name if self.subscribe_topic else None,
            self.publish_topic.name if self.publish_topic else None,
            self.stats.snapshot,
            getattr(self.pubsub, "stats", None),
            self._observer,
        )
        self._metrics = MetricsEndpoint(collector, config.address, config.port)
        self.logger.info("node %s serves metrics on %s", self.name, self._metrics.url)

    def _loop(self, life_span: int) -> None:
        raise NotImplementedError

    def _describe(self) -> str:
        parts = [f"backend {type(self.pubsub).__name__}"]
        if self.subscribe_topic is not None:
            parts.append(f"in {self.subscribe_topic.name}")
        if self.publish_topic is not None:
            parts.append(f"out {self.publish_topic.name}")
        if self.group_id is not None:
            parts.append(f"group {self.group_id}")
        return ", ".join(parts)

    def _take_frame(self) -> bool:
        """Apply ``gap``: True for every ``gap + 1``-th frame."""
        self._gap_count += 1
        if self._gap_count > self.gap:
            self._gap_count = 0
            return True
        return False

    def _rejected(self, exc: DeserializationError) -> None:
        """A received message that is not a valid message of the expected type.

        It comes from a peer, not from this node's code: whatever the error
        policy, it costs that message only (counted as an error, handed to
        :meth:`on_error`, logged at most with one traceback per interval).
        """
        self.stats.error()
        if self._observer is not None:
            self._observer.rejected()
        try:
            self.on_error(exc)
        except Exception:
            self.logger.exception("on_error failed")
        now = time.monotonic()
        if now - self._last_traceback >= _TRACEBACK_INTERVAL:
            self._last_traceback = now
            self.logger.warning("dropped a message that does not decode: %s", exc)

    def _failed(self, exc: Exception, what: str) -> None:
        self.stats.error()
        try:
            self.on_error(exc)
        except Exception:
            self.logger.exception("on_error failed")
        if self.error_policy is ErrorPolicy.STOP:
            self.logger.error(
                "node %s stopping: error while %s (action_on_error=stop)",
                self.name,
                what,
                exc_info=exc,
            )
            raise exc
        now = time.monotonic()
        if now - self._last_traceback >= _TRACEBACK_INTERVAL:
            self._last_traceback = now
            self.logger.error(
                "error while %s (continuing; %d so far)",
                what,
                self.stats.snapshot()["errors"],
                exc_info=exc,
            )
        else:
            self.logger.error("error while %s (continuing): %r", what, exc)

    def _tick_stats(self, next_summary: float) -> float:
        if self.stats_interval <= 0:
            return float("inf")
        now = time.monotonic()
        if now < next_summary:
            return next_summary
        self.logger.info("%s", self.stats.summary())
        return now + self.stats_interval

    def _next_summary(self) -> float:
        return time.monotonic() + self.stats_interval if self.stats_interval > 0 else float("inf")

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum: int, frame: Any) -> None:
            if self._stop_event.is_set():
                raise KeyboardInterrupt  # second signal: stop waiting for the loop
            self._signal = signum
            self.stop()

        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.getsignal(signum)
            signal.signal(signum, on_signal)
        return previous


class SourceNode(Node):
    """A node that brings data in: override :meth:`get_data`.

    The loop calls ``get_data()`` at ``rate`` frames per second (or back to back
    when no rate is set), runs :meth:`post_process` and publishes the result.
    ``None`` from either means "nothing this time". SensorData without a
    ``sensor_name``/``device_name`` gets the node's.
    """

    default_configs = NodeConfig(action_on_error="stop")

    def __init__(self, configs: NodeConfig | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(configs, *args, **kwargs)
        self.sensor_name = self.configs.get("sensor_name", "default_sensor")
        rate = self.configs.rate
        self.rate = None if not rate else self.configs.number("rate", 1e-9)
        if self.publish_topic is None:
            self.close()
            raise ConfigError(f"source node {self.name!r} needs a publish_topic_name")

    def get_data(self) -> Data | list[Data] | None:
        """Produce the next frame (called at ``rate`` Hz). Must be overridden."""
        raise NotImplementedError("SourceNode subclasses implement get_data()")

    def post_process(self, data: Data) -> Data | list[Data] | None:
        """Transform a produced frame before it is published (default: unchanged)."""
        return data

    def _stamp(self, data: Any) -> None:
        for item in data if isinstance(data, list) else (data,):
            if isinstance(item, SensorData):
                if item.sensor_name is None:
                    item.sensor_name = self.sensor_name
                if item.device_name is None and self.configs.device_name is not None:
                    item.device_name = self.configs.device_name

    def _loop(self, life_span: int) -> None:
        period = 1.0 / self.rate if self.rate else 0.0
        next_frame = time.monotonic()
        next_summary = self._next_summary()
        remaining = life_span
        while not self._stop_event.is_set() and remaining != 0:
            started = time.perf_counter()
            try:
                self.on_before_iteration()
                data = self.get_data()
                if data is not None and self._take_frame():
                    data = self.post_process(data)  # type: ignore[arg-type]
                    if data is not None:
                        self._stamp(data)
                        self.publish(data)
                elif data is not None:
                    self.stats.skipped()
                self.on_after_iteration()
                self.stats.processed(time.perf_counter() - started, None)
            except Exception as exc:  # noqa: BLE001 - handed to the error policy
                self._failed(exc, "producing a frame")
            if remaining > 0:
                remaining -= 1
            next_summary = self._tick_stats(next_summary)
            if period:
                next_frame += period
                delay = next_frame - time.monotonic()
                if delay > 0:
                    self._stop_event.wait(delay)
                elif delay < -period:  # fell behind: do not burst to catch up
                    next_frame = time.monotonic()


class DataProcessingNode(Node):
    """A node that subscribes, processes each message and publishes the result.

    Override :meth:`process`; returning ``None`` publishes nothing. Nodes sharing
    a ``group_id`` split the messages on NATS and Kafka.
    """

    default_configs = NodeConfig(action_on_error="stop")

    def __init__(self, configs: NodeConfig | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(configs, *args, **kwargs)
        if self.subscribe_topic is None:
            self.close()
            raise ConfigError(f"node {self.name!r} needs a subscribe_topic_name")
        self._closer: threading.Thread | None = None

    def process(self, data: Data) -> Data | list[Data] | None:
        """Handle one received message. Must be overridden."""
        raise NotImplementedError("DataProcessingNode subclasses implement process()")

    def stop(self) -> None:
        super().stop()
        if not hasattr(self.pubsub, "receive") and self._closer is None:
            # A seed-style backend without receive(): only close() wakes listen().
            self._closer = threading.Thread(target=self.pubsub.close, daemon=True)
            self._closer.start()

    def _start(self) -> None:
        self.pubsub.subscribe(self.subscribe_topic)

    def _messages(self) -> Iterator[Any]:
        """Payloads (``bytes``), views (from ``receive_view()``) or ``None`` (a timeout)."""
        receive_view = getattr(self.pubsub, "receive_view", None)
        if receive_view is not None and self.configs.get("zero_copy", True):
            yield from self._views(receive_view)
            return
        receive = getattr(self.pubsub, "receive", None)
        if receive is None:
            yield from self.pubsub.listen()
            return
        while True:
            try:
                message = receive(self.receive_timeout)
            except ClosedError:
                return
            except BrokerError as exc:
                self._failed(exc, "receiving")
                self._stop_event.wait(min(1.0, self.receive_timeout * 5))
                continue
            yield None if message is None else message.data

    def _views(self, receive_view: Any) -> Iterator[Any]:
        """Views of shared memory; copies while earlier messages' arrays pin every view."""
        while True:
            try:
                yield receive_view(self.receive_timeout)
                continue
            except ClosedError:
                return
            except BackpressureError as exc:
                self._pinned(exc)
            except BrokerError as exc:
                self._failed(exc, "receiving")
                self._stop_event.wait(min(1.0, self.receive_timeout * 5))
                continue
            try:
                message = self.pubsub.receive(self.receive_timeout)  # type: ignore[attr-defined]
            except ClosedError:
                return
            except BrokerError as exc:
                self._failed(exc, "receiving")
                continue
            yield None if message is None else message.data

    def _pinned(self, exc: BackpressureError) -> None:
        now = time.monotonic()
        if now - self._last_pinned >= _TRACEBACK_INTERVAL:
            self._last_pinned = now
            self.logger.warning(
                "receiving copies: arrays kept from earlier messages pin every shared-memory "
                "view (%s); keep arr.copy() instead of the arrays themselves",
                exc,
            )

    def _loop(self, life_span: int) -> None:
        next_summary = self._next_summary()
        remaining = life_span
        messages = self._messages()
        try:
            while not self._stop_event.is_set() and remaining != 0:
                try:
                    payload = next(messages)
                except StopIteration:
                    return
                except ClosedError:
                    return
                if payload is not None:
                    if isinstance(payload, (bytes, bytearray)):
                        self._handle(payload)
                    else:
                        self._handle_view(payload)
                    if remaining > 0:
                        remaining -= 1
                next_summary = self._tick_stats(next_summary)
        finally:
            messages.close()

    def _handle_view(self, view: Any) -> None:
        """Handle a message from a view of shared memory, then give the memory back."""
        try:
            self._handle(view.data, view.zero_copy)
        finally:
            view.release()

    def _handle(self, payload: Any, shared: bool = False) -> None:
        if self._tracer is None:
            self._handle_payload(payload, shared)
            return
        with self._tracer.processing():  # continues the sender's trace
            self._handle_payload(payload, shared)

    def _handle_payload(self, payload: Any, shared: bool = False) -> None:
        started = time.perf_counter()
        self.stats.received(len(payload))
        if not self._take_frame():
            self.stats.skipped()
            return
        data: Any = None
        result: Any = None
        # Everything done with the message, down to its statistics, is under the
        # error policy: the message comes from a peer and may be anything.
        try:
            self.on_before_iteration()
            try:
                data = self.subscribe_topic_data_type.deserialize(payload)
            except DeserializationError as exc:
                self._rejected(exc)
                return
            result = self.process(data)
            if result is not None:
                self.publish(result)
            self.on_after_iteration()
            latency = data.age() if isinstance(data, SensorData) else None
            self.stats.processed(time.perf_counter() - started, latency)
        except Exception as exc:  # noqa: BLE001 - handed to the error policy
            self._failed(exc, "processing a message")
        finally:
            if shared and data is not None:
                # Decoded from shared memory: if the application kept the message,
                # its arrays are copied out so the sample can go back (_views.py).
                ref = weak(data)
                data = result = None
                obj = kept(ref)
                if obj is not None:
                    copied = copy_out(obj, payload)
                    if copied:
                        self.logger.debug("message kept: %d array(s) copied out", copied)


ProcessingNode = DataProcessingNode


class SinkNode(DataProcessingNode):
    """A node that only consumes: override :meth:`on_message`."""

    def on_message(self, data: Data) -> None:
        """Handle one received message. Must be overridden."""
        raise NotImplementedError("SinkNode subclasses implement on_message()")

    def process(self, data: Data) -> None:
        self.on_message(data)


def _metrics_config(explicit: int | None, configured: int | None, env: Any) -> Any:
    """The node's :class:`~msight_core.config.MetricsConfig`, or ``None`` without a port."""
    from ..config import load_metrics_config

    port = explicit if explicit is not None else configured
    config = load_metrics_config(env, **({"port": port} if port is not None else {}))
    return config if config.port is not None else None


def _ensure_logging() -> None:
    """Give a bare script somewhere to log: a stderr handler if nothing is configured."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        root.addHandler(handler)
