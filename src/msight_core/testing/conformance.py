"""The conformance suite every backend passes.

Subclass :class:`PubSubConformance` in a test module and provide a
``make_backend`` fixture returning a factory ``make(group_id=None)`` that builds
a fresh, unconnected backend pointed at a real broker::

    class TestMyConformance(PubSubConformance):
        @pytest.fixture
        def make_backend(self, msight_redis_server):
            config = load_redis_config(msight_redis_server.env())
            return lambda group_id=None: RedisPubSub(config)

What a backend does not offer (its ``capabilities``) is skipped with a reason,
never passed silently. Backends must provide ``receive(timeout)`` (all msight
backends do, through ``QueueBackend``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ..errors import ClosedError, InvalidTopicError
from ..pubsub.base import Capabilities, Message, PubSubBackend
from ..topics import Topic

__all__ = ["BAD_PAYLOADS", "BAD_TOPIC_NAMES", "PubSubConformance", "collect"]

MiB = 1024 * 1024

BAD_TOPIC_NAMES: tuple[Any, ...] = (
    "",
    "a..b",
    ".a",
    "a.",
    "a b",
    "a*",
    "a>",
    "caf\u00e9",
    "x" * 250,
    "tab\tname",
    None,
    123,
)

BAD_PAYLOADS: tuple[Any, ...] = ("text", 42, None, [1, 2], {"a": 1}, 1.5, object())


def collect(backend: Any, count: int, timeout: float) -> list[Message]:
    """Receive up to ``count`` messages, waiting at most ``timeout`` seconds in all."""
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        message = backend.receive(min(remaining, 1.0))
        if message is not None:
            out.append(message)
    return out


class PubSubConformance:
    """Shared behaviour tests. Subclasses supply the ``make_backend`` fixture."""

    #: Seconds to wait for messages that should arrive.
    timeout: float = 15.0
    #: Seconds to wait when checking that nothing (more) arrives.
    quiet: float = 0.5

    @pytest.fixture
    def make_backend(self) -> Callable[..., PubSubBackend]:  # pragma: no cover - overridden
        raise NotImplementedError("define a make_backend fixture in the subclass")

    @pytest.fixture
    def unique_topic(self, msight_unique_topic: str) -> str:
        """This test's own topic (the plugin's ``msight_unique_topic``)."""
        return msight_unique_topic

    @pytest.fixture
    def backends(self, make_backend: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
        made: list[Any] = []

        def make(group_id: str | None = None) -> Any:
            backend = make_backend(group_id=group_id)
            made.append(backend)
            return backend

        yield make
        for backend in made:
            backend.close()

    @pytest.fixture
    def caps(self, backends: Callable[..., Any]) -> Capabilities:
        # A backend's capabilities may depend on its configuration (NATS with
        # JetStream is persistent): ask the instance, not the class.
        return backends().capabilities

    @pytest.fixture
    def pair(self, backends: Callable[..., Any], unique_topic: str) -> tuple[Any, Any, str]:
        sub = backends()
        sub.subscribe(unique_topic)
        return backends(), sub, unique_topic

    # -- the seed contract ------------------------------------------------------------

    def test_listen_before_subscribe_raises_at_once(self, backends: Callable[..., Any]) -> None:
        backend = backends()
        with pytest.raises(RuntimeError):
            backend.listen()  # raises on the call, not on the first next()
        with pytest.raises(RuntimeError):
            backend.receive(0.1)

    def test_seed_example_round_trip(self, backends: Callable[..., Any], unique_topic: str) -> None:
        topic = Topic(unique_topic, data_type="BytesData", description="conformance")
        pubsub = backends()
        pubsub.subscribe(topic)
        publisher = backends()
        publisher.publish(topic, b"seed-example")
        publisher.flush()
        result: list[bytes] = []

        def consume() -> None:
            for message in pubsub.listen():
                result.append(message)
                break

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        thread.join(self.timeout)
        assert result == [b"seed-example"]
        assert type(result[0]) is bytes

    def test_round_trip_in_order(self, pair: tuple[Any, Any, str], caps: Capabilities) -> None:
        pub, sub, topic = pair
        sent = [b"msg-%d" % i for i in range(500)]
        for payload in sent:
            pub.publish(topic, payload)
        pub.flush()
        got = [m.data for m in collect(sub, len(sent), self.timeout)]
        if caps.ordered:
            assert got == sent
        else:
            assert sorted(got) == sorted(sent)

    def test_receive_times_out_with_none(self, pair: tuple[Any, Any, str]) -> None:
        _, sub, _ = pair
        started = time.monotonic()
        assert sub.receive(0.2) is None
        assert time.monotonic() - started < 5

    def test_binary_safety(self, pair: tuple[Any, Any, str]) -> None:
        pub, sub, topic = pair
        payloads = [
            bytes(range(256)),
            b"",
            b"\x00" * 64,
            b"\r\n*3\r\n$-1\r\n",
            bytes(range(255, -1, -1)),
        ]
        for payload in payloads:
            pub.publish(topic, payload)
        pub.publish(topic, bytearray(b"from-bytearray"))
        pub.publish(topic, memoryview(b"from-memoryview"))
        pub.flush()
        got = collect(sub, len(payloads) + 2, self.timeout)
        data = [m.data for m in got]
        assert all(type(d) is bytes for d in data)
        assert sorted(data) == sorted(payloads + [b"from-bytearray", b"from-memoryview"])

    def test_mutable_buffer_is_copied_at_publish(self, pair: tuple[Any, Any, str]) -> None:
        pub, sub, topic = pair
        buf = bytearray(b"original")
        pub.publish(topic, buf)
        buf[:] = b"mutated!"
        pub.flush()
        got = collect(sub, 1, self.timeout)
        assert [m.data for m in got] == [b"original"]

    def test_large_frames_16mb(self, pair: tuple[Any, Any, str], caps: Capabilities) -> None:
        if caps.max_payload is not None and caps.max_payload < 16 * MiB:
            pytest.skip(f"backend carries at most {caps.max_payload} bytes")
        pub, sub, topic = pair
        frames = [os.urandom(16 * MiB), os.urandom(16 * MiB) + b"tail"]
        for frame in frames:
            pub.publish(topic, frame)
            pub.flush()
            # Paced like a camera: Redis drops a subscriber with two 16 MB frames queued.
            time.sleep(0.1)
        got = collect(sub, len(frames), self.timeout * 2)
        assert len(got) == len(frames)
        assert sorted(m.data for m in got) == sorted(frames)

    def test_two_broadcast_subscribers(
        self, backends: Callable[..., Any], unique_topic: str, caps: Capabilities
    ) -> None:
        if not caps.broadcast:
            pytest.skip("backend does not broadcast")
        first, second = backends(), backends()
        first.subscribe(unique_topic)
        second.subscribe(unique_topic)
        pub = backends()
        sent = [b"b-%d" % i for i in range(100)]
        for payload in sent:
            pub.publish(unique_topic, payload)
        pub.flush()
        for sub in (first, second):
            assert sorted(m.data for m in collect(sub, 100, self.timeout)) == sorted(sent)

    def test_several_topics_on_one_instance(
        self, backends: Callable[..., Any], unique_topic: str
    ) -> None:
        names = [f"{unique_topic}.{suffix}" for suffix in ("camera", "lidar", "det")]
        sub = backends()
        for name in names:
            sub.subscribe(name)
        sub.subscribe(names[0])  # twice: a no-op
        assert tuple(sub.topics) == tuple(names)
        pub = backends()
        for name in names:
            for i in range(5):
                pub.publish(name, f"{name}:{i}".encode())
        pub.flush()
        got = collect(sub, 15, self.timeout)
        assert len(got) == 15
        for message in got:
            assert message.data.decode().split(":")[0] == message.topic

    def test_topic_isolation(self, backends: Callable[..., Any], unique_topic: str) -> None:
        sub = backends()
        sub.subscribe(unique_topic + ".a")
        pub = backends()
        pub.publish(unique_topic + ".b", b"not-for-you")
        pub.publish(unique_topic + ".a", b"for-you")
        pub.flush()
        got = collect(sub, 1, self.timeout)
        assert [m.data for m in got] == [b"for-you"]
        assert sub.receive(self.quiet) is None

    def test_publish_from_four_threads(
        self, pair: tuple[Any, Any, str], caps: Capabilities
    ) -> None:
        pub, sub, topic = pair
        per_thread = 250

        def worker(tid: int) -> None:
            for i in range(per_thread):
                pub.publish(topic, b"%d:%d" % (tid, i))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        pub.flush()
        got = [m.data for m in collect(sub, 4 * per_thread, self.timeout)]
        assert len(got) == 4 * per_thread
        assert len(set(got)) == len(got)
        if caps.ordered:
            for tid in range(4):
                seq = [int(d.split(b":")[1]) for d in got if d.startswith(b"%d:" % tid)]
                assert seq == list(range(per_thread))

    def test_bad_payload_types_are_refused_and_lose_nothing(
        self, pair: tuple[Any, Any, str], caps: Capabilities
    ) -> None:
        pub, sub, topic = pair
        pub.publish(topic, b"before")
        for bad in BAD_PAYLOADS:
            with pytest.raises(TypeError):
                pub.publish(topic, bad)
        pub.publish(topic, b"after")
        pub.flush()
        got = [m.data for m in collect(sub, 2, self.timeout)]
        if not caps.ordered:
            got.sort(reverse=True)  # b"before" > b"after"
        assert got == [b"before", b"after"]
        assert sub.receive(self.quiet) is None

    @pytest.mark.parametrize("bad", BAD_TOPIC_NAMES, ids=repr)
    def test_bad_topic_names(self, backends: Callable[..., Any], bad: Any) -> None:
        backend = backends()
        with pytest.raises(InvalidTopicError):
            backend.publish(bad, b"x")
        with pytest.raises(InvalidTopicError):
            backend.subscribe(bad)
        with pytest.raises(InvalidTopicError):
            backend.subscribe(_Named(bad))

    # -- lifecycle --------------------------------------------------------------------

    def test_close_is_idempotent_and_final(
        self, backends: Callable[..., Any], unique_topic: str
    ) -> None:
        backend = backends()
        backend.subscribe(unique_topic)
        backend.close()
        backend.close()
        with pytest.raises(ClosedError):
            backend.publish(unique_topic, b"x")
        with pytest.raises(ClosedError):
            backend.subscribe(unique_topic + ".other")
        with pytest.raises(ClosedError):
            backend.listen()

    def test_close_wakes_a_blocked_listen(self, pair: tuple[Any, Any, str]) -> None:
        _, sub, _ = pair
        ended = threading.Event()

        def consume() -> None:
            for _ in sub.listen():
                pass
            ended.set()

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        time.sleep(0.2)
        started = time.monotonic()
        sub.close()
        assert ended.wait(5), "listen() did not return after close()"
        assert time.monotonic() - started < 5

    def test_context_manager_closes(
        self, make_backend: Callable[..., Any], unique_topic: str
    ) -> None:
        with make_backend() as backend:
            backend.publish(unique_topic, b"x")
        with pytest.raises(ClosedError):
            backend.publish(unique_topic, b"y")

    def test_close_delivers_accepted_messages(
        self, backends: Callable[..., Any], make_backend: Callable[..., Any], unique_topic: str
    ) -> None:
        sub = backends()
        sub.subscribe(unique_topic)
        pub = make_backend()
        sent = [b"c-%d" % i for i in range(200)]
        for payload in sent:
            pub.publish(unique_topic, payload)
        pub.close()  # no flush(): close must deliver what publish() accepted
        assert sorted(m.data for m in collect(sub, 200, self.timeout)) == sorted(sent)

    # -- capabilities -----------------------------------------------------------------

    def test_wildcard_subscriptions(
        self, backends: Callable[..., Any], unique_topic: str, caps: Capabilities
    ) -> None:
        if not caps.patterns:
            pytest.skip("backend takes no wildcard patterns")
        sub, pub = backends(), backends()
        sub.subscribe(f"{unique_topic}.*")
        sub.subscribe(f"{unique_topic}.deep.>")
        wanted = {f"{unique_topic}.a", f"{unique_topic}.b", f"{unique_topic}.deep.x.y"}
        unwanted = [f"{unique_topic}.a.x", f"{unique_topic}.b.x.y", f"{unique_topic}x.a"]
        seen: set[str] = set()
        deadline = time.monotonic() + self.timeout
        # Published until each wanted topic arrived: a broker may pick up topics
        # created after the subscription with a delay (Kafka's metadata refresh).
        while seen != wanted and time.monotonic() < deadline:
            for name in [*sorted(wanted - seen), *unwanted]:
                pub.publish(name, name.encode())
            pub.flush()
            while (message := sub.receive(0.5)) is not None:
                assert message.topic in wanted, message.topic
                assert message.data == message.topic.encode()
                seen.add(message.topic)
        assert seen == wanted
        with pytest.raises(InvalidTopicError):
            pub.publish(f"{unique_topic}.*", b"a pattern is not a topic")
        for bad in ("*", ">", f"{unique_topic}.>.x", f"{unique_topic}.a*", "_INBOX.>"):
            with pytest.raises(InvalidTopicError):
                sub.subscribe(bad)

    def test_group_members_share_messages(
        self, backends: Callable[..., Any], unique_topic: str, caps: Capabilities
    ) -> None:
        if not caps.groups:
            pytest.skip("backend has no load-balancing groups (every subscriber gets all)")
        group = "g-" + unique_topic.replace(".", "-")
        members = [backends(group_id=group), backends(group_id=group)]
        for member in members:
            member.subscribe(unique_topic)
        pub = backends()
        sent = [b"g-%d" % i for i in range(300)]
        for i, payload in enumerate(sent):
            # Distinct keys per message where the backend partitions by key.
            pub.publish(unique_topic, payload)
        pub.flush()
        received: list[list[bytes]] = [[], []]
        deadline = time.monotonic() + self.timeout
        while sum(map(len, received)) < len(sent) and time.monotonic() < deadline:
            for idx, member in enumerate(members):
                message = member.receive(0.05)
                if message is not None:
                    received[idx].append(message.data)
        union = received[0] + received[1]
        assert sorted(union) == sorted(sent), "each message exactly once across the group"
        assert received[0] and received[1], "both members must get some messages"

    def test_persistent_delivery_to_a_returning_group(
        self, backends: Callable[..., Any], unique_topic: str, caps: Capabilities
    ) -> None:
        if not caps.persistent:
            pytest.skip("backend is best-effort: nothing is kept for absent subscribers")
        group = "p-" + unique_topic.replace(".", "-")
        first = backends(group_id=group)
        first.subscribe(unique_topic)
        pub = backends()
        pub.publish(unique_topic, b"first")
        pub.flush()
        assert [m.data for m in collect(first, 1, self.timeout)] == [b"first"]
        first.close()
        sent = [b"kept-%d" % i for i in range(20)]
        for payload in sent:
            pub.publish(unique_topic, payload)
        pub.flush()
        second = backends(group_id=group)
        second.subscribe(unique_topic)
        got = [m.data for m in collect(second, len(sent), self.timeout)]
        assert sorted(got) == sorted(sent)


class _Named:
    """An object with a ``.name``, like the seed's Topic, carrying any value."""

    def __init__(self, name: Any) -> None:
        self.name = name
