"""The clients ``msight bench`` measures: msight's PubSubBackend and each raw client.

Every client has the same small shape: ``open(topic, on_message)`` subscribes
and starts delivering payloads to ``on_message`` from a receiving thread,
``publish(data)`` sends one payload without waiting for the broker, ``flush()``
waits until everything sent reached the broker, and ``close()`` releases all.
The raw clients are used the way their documentation shows, with settings that
let them carry 16 MB messages; nothing else is tuned.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from ..config import (
    kafka_client_conf,
    load_kafka_config,
    load_nats_config,
    nats_connect_options,
)
from ..errors import BrokerUnavailableError, MissingDependencyError, MsightError
from ..pubsub import get_pubsub

__all__ = ["BenchClient", "clients_for"]

OnMessage = Callable[[bytes], None]
MiB = 1024 * 1024
_OPEN_TIMEOUT = 30.0


class BenchClient:
    """Base: a publisher and a subscriber on one topic."""

    name = ""
    #: Largest payload the client can send (``None``: no limit known).
    max_payload: int | None = None

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self, topic: str, on_message: OnMessage) -> None:
        raise NotImplementedError

    def publish(self, data: bytes) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Wait until published messages reached the broker (default: nothing to do)."""

    def close(self) -> None:
        raise NotImplementedError

    def _spawn(self, target: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=target, name=f"bench-{self.name}", daemon=True)
        self._thread.start()

    def _join(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


class MsightClient(BenchClient):
    """msight's :class:`~msight_core.pubsub.PubSubBackend` from ``get_pubsub()``."""

    def __init__(self, env: Mapping[str, str], kind: str) -> None:
        super().__init__(env)
        self.name = f"msight {kind}"
        self.pub: Any = None
        self.sub: Any = None

    def open(self, topic: str, on_message: OnMessage) -> None:
        self.topic = topic
        self.sub = get_pubsub(env=self.env)
        self.pub = get_pubsub(env=self.env)
        self.sub.subscribe(topic)
        sub = self.sub

        def run() -> None:
            while not self._stop.is_set():
                try:
                    message = sub.receive(0.2)
                except MsightError:
                    return
                if message is not None:
                    on_message(message.data)

        self._spawn(run)

    def publish(self, data: bytes) -> None:
        self.pub.publish(self.topic, data)

    def flush(self) -> None:
        self.pub.flush()

    def close(self) -> None:
        self._stop.set()
        for backend in (self.pub, self.sub):
            if backend is not None:
                backend.close()
        self._join()


class RawRedisClient(BenchClient):
    """redis-py: ``PUBLISH`` per message, ``PubSub.get_message()`` in a thread."""

    name = "redis-py"

    def open(self, topic: str, on_message: OnMessage) -> None:
        from ..utils import get_redis_client

        self.topic = topic
        self.client = get_redis_client(env=self.env)
        self.sub_client = get_redis_client(env=self.env)
        self.pubsub = self.sub_client.pubsub()
        self.pubsub.subscribe(topic)
        confirmed = self.pubsub.get_message(timeout=_OPEN_TIMEOUT)
        if not confirmed or confirmed.get("type") != "subscribe":
            raise BrokerUnavailableError("redis-py: SUBSCRIBE was not confirmed")
        pubsub = self.pubsub

        def run() -> None:
            while not self._stop.is_set():
                try:
                    message = pubsub.get_message(timeout=0.2)
                except Exception:  # noqa: BLE001 - closed under us at the end
                    return
                if message is not None and message.get("type") == "message":
                    on_message(message["data"])

        self._spawn(run)

    def publish(self, data: bytes) -> None:
        self.client.publish(self.topic, data)

    def close(self) -> None:
        self._join()
        self.pubsub.close()
        self.sub_client.close()
        self.client.close()


class RawNatsClient(BenchClient):
    """nats-py on its own event loop: ``nc.publish`` and a subscription callback."""

    name = "nats-py"

    def open(self, topic: str, on_message: OnMessage) -> None:
        try:
            import nats
        except ImportError:
            raise MissingDependencyError("nats-py", "nats") from None
        config = load_nats_config(env=self.env)
        self.topic = topic
        self.loop = asyncio.new_event_loop()
        self._spawn(self.loop.run_forever)
        self.errors: list[BaseException] = []

        async def connect() -> Any:
            nc = await nats.connect(**nats_connect_options(config))

            async def cb(msg: Any) -> None:
                on_message(msg.data)

            await nc.subscribe(
                topic, cb=cb, pending_msgs_limit=1_000_000, pending_bytes_limit=1024 * MiB
            )
            await nc.flush()
            return nc

        self.nc = self._run(connect())
        self.max_payload = int(self.nc.max_payload)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(_OPEN_TIMEOUT)

    def publish(self, data: bytes) -> None:
        self.loop.call_soon_threadsafe(self._send, data)

    def _send(self, data: bytes) -> None:
        # nc.publish only appends to nats-py's pending buffer before its first
        # suspension point, so tasks created in order publish in order.
        task = self.loop.create_task(self.nc.publish(self.topic, data))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(task.exception())  # type: ignore[arg-type]

    def flush(self) -> None:
        self._run(self.nc.flush(timeout=_OPEN_TIMEOUT))
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        try:
            self._run(self.nc.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._join()
            self.loop.close()


class RawKafkaClient(BenchClient):
    """confluent-kafka: ``Producer.produce`` + ``poll``, a ``Consumer`` in a thread."""

    name = "confluent-kafka"

    def open(self, topic: str, on_message: OnMessage) -> None:
        try:
            from confluent_kafka import Consumer, KafkaException, Producer
            from confluent_kafka.admin import AdminClient, NewTopic
        except ImportError:
            raise MissingDependencyError("confluent-kafka", "kafka") from None
        config = load_kafka_config(env=self.env)
        self.KafkaException = KafkaException
        limit = config.max_message_bytes
        # A logger keeps librdkafka's own lines off stderr (served by poll()).
        base = {**kafka_client_conf(config), "logger": logging.getLogger(__name__)}
        self.topic = topic
        admin = AdminClient(base)
        futures = admin.create_topics(
            [NewTopic(topic, num_partitions=1, replication_factor=config.replication_factor,
                      config={"max.message.bytes": str(limit)})]
        )  # fmt: skip
        futures[topic].result(_OPEN_TIMEOUT)
        self.producer = Producer(
            {**base, "linger.ms": 5, "message.max.bytes": limit + 64 * 1024,
             "queue.buffering.max.kbytes": 1024 * 1024}
        )  # fmt: skip
        fetch = limit + MiB
        self.consumer = Consumer(
            {**base, "group.id": f"bench-{uuid.uuid4().hex}", "auto.offset.reset": "earliest",
             "enable.auto.commit": False, "fetch.max.bytes": fetch,
             "max.partition.fetch.bytes": fetch, "receive.message.max.bytes": fetch + MiB,
             "fetch.wait.max.ms": 100}
        )  # fmt: skip
        assigned = threading.Event()
        self.consumer.subscribe([topic], on_assign=lambda c, parts: assigned.set())
        consumer = self.consumer

        def run() -> None:
            while not self._stop.is_set():
                msg = consumer.poll(0.1)
                if msg is not None and msg.error() is None:
                    on_message(msg.value())

        self._spawn(run)
        if not assigned.wait(_OPEN_TIMEOUT):
            raise BrokerUnavailableError("confluent-kafka: no partition assigned in time")

    def publish(self, data: bytes) -> None:
        while True:
            try:
                self.producer.produce(self.topic, data)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.producer.poll(0)

    def flush(self) -> None:
        left = self.producer.flush(_OPEN_TIMEOUT)
        if left:
            raise BrokerUnavailableError(f"confluent-kafka: {left} message(s) not delivered")

    def close(self) -> None:
        self._join()
        self.consumer.close()
        self.producer.flush(5)


def clients_for(kind: str, env: Mapping[str, str], raw: bool) -> list[Callable[[], BenchClient]]:
    """Factories of the clients to compare on backend ``kind``: msight first, then raw."""
    factories: list[Callable[[], BenchClient]] = [lambda: MsightClient(env, kind)]
    raw_cls = {"redis": RawRedisClient, "nats": RawNatsClient, "kafka": RawKafkaClient}.get(kind)
    if raw and raw_cls is not None:
        factories.append(lambda: raw_cls(env))
    return factories
