"""Shared-memory backend: ``ShmPubSub``, processes of one host without a broker.

``MSIGHT_PUBSUB_BACKEND=shm`` (extra ``shm``, iceoryx2). The same contract as
every backend (broadcast, groups, order per publisher, bytes from ``listen()``),
plus two zero-copy paths for large frames::

    with ShmPubSub() as ps:
        ps.subscribe("camera1.frames")
        while True:
            with ps.receive_view(timeout=1.0) as view:     # None on timeout
                frame = ImageData.deserialize(view.data)    # arrays in shared memory
                ...

    with ps.loan("camera1.frames", nbytes) as buf:          # write in place
        buf[:] = ...                                        # sent when the block ends

    with ps.loan("camera1.frames", image.serialized_size()) as buf:
        image.serialize_into(buf)                           # an ImageData, built in place

Processing and sink nodes (:mod:`msight_core.nodes`) on this backend use
``receive_view()`` by themselves: ``process()`` gets arrays in shared memory,
read-only, valid during the call; a message the node keeps is copied out when
the call returns (see :mod:`msight_core.nodes` for the rule).

Settings come from ``MSIGHT_SHM_*`` (:class:`~msight_core.config.ShmConfig`):
memory in ``/dev/shm`` is bounded by the largest frame, the subscribers per
topic and the depth of their buffers, checked before use. Only processes of the
same OS user (and the same ``MSIGHT_SHM_DOMAIN``) can attach. Create backends
in the process that uses them (with ``multiprocessing``, after the fork or with
the ``spawn`` start method). How it works: :mod:`msight_core.pubsub._shm`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from ..config import ShmConfig, load_shm_config
from ..errors import ClosedError, ConfigError, PayloadTooLargeError
from ._core import Delivery, QueueBackend, State
from ._queue import CLOSED
from ._shm.inbox import Inbox, Puller, Reader
from ._shm.publisher import Flusher, Loan, Publisher
from ._shm.services import Runtime
from ._shm.subscriber import Decoder, Subscriber
from ._shm.views import Ledger, ShmView
from .base import Capabilities

__all__ = ["Loan", "ShmPubSub", "ShmView"]

logger = logging.getLogger("msight_core.pubsub.shm")


class ShmPubSub(QueueBackend):
    """Pub/sub through shared memory between processes of one host (iceoryx2).

    Broadcast to every subscriber; subscribers with the same ``group_id``
    share a topic's messages (each to one member, in turn). Best-effort: a
    message published while nobody subscribes is dropped, and a subscriber
    that falls behind loses its oldest messages (counted in ``stats()``);
    the publisher never waits.

    Args:
        config: shm settings (default: from ``MSIGHT_SHM_*``).
        group_id: share messages with the other subscribers of this group.

    Raises:
        MissingDependencyError: iceoryx2 (the ``shm`` extra) is not installed.
        ConfigError: ``group_id`` is empty.

    Nothing is created in shared memory until the first ``subscribe()``,
    ``publish()``, ``loan()`` or ``reserve()``. Thread safety and the
    behaviour after ``close()`` are those of
    :class:`~msight_core.pubsub.base.PubSubBackend`; ``receive_view()`` is a
    consuming call like ``listen()`` (one thread at a time).
    """

    def __init__(self, config: ShmConfig | None = None, group_id: str | None = None) -> None:
        if group_id is not None and (not isinstance(group_id, str) or not group_id):
            raise ConfigError(f"group_id must be a non-empty str, got {group_id!r}")
        config = config or load_shm_config()
        super().__init__(config.queue)
        self.config = config
        self.group_id = group_id
        self.capabilities = Capabilities(
            broadcast=True,
            groups=True,
            persistent=False,
            ordered=True,
            max_payload=config.max_frame_bytes,
        )
        self._lock = threading.RLock()
        self._runtime: Runtime | None = None
        self._publishers: dict[str, Publisher] = {}
        self._fast: dict[str, Publisher] = {}
        self._max_frame = config.max_frame_bytes
        self._subscribers: list[Subscriber] = []
        self._inbox: Inbox | None = None
        self._reader: Reader | None = None
        self._puller: Puller | None = None
        self._flusher: Flusher | None = None
        self._decoder = Decoder()
        self._ledger = Ledger(config.max_views)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        group = f" group_id={self.group_id!r}" if self.group_id else ""
        return (
            f"<ShmPubSub domain={self.config.domain!r}{group} {state} topics={list(self.topics)}>"
        )

    # -- set-up -----------------------------------------------------------------------

    def _ensure_runtime(self) -> Runtime:
        with self._lock:
            self._check_open()
            if self._runtime is None:
                self._runtime = Runtime(self.config)
            return self._runtime

    def _publisher(self, name: str) -> Publisher:
        publisher = self._publishers.get(name)
        if publisher is not None:
            return publisher
        with self._lock:
            publisher = self._publishers.get(name)
            if publisher is None:
                runtime = self._ensure_runtime()
                if self._flusher is None:
                    self._flusher = Flusher(self._housekeeping)
                publisher = Publisher(runtime, name, self.config, self._flusher.request)
                self._publishers[name] = publisher
            return publisher

    def _housekeeping(self) -> None:
        runtime = self._runtime
        if runtime is not None and any(
            p.housekeeping_due() for p in list(self._publishers.values())
        ):
            runtime.cleanup_dead_nodes()

    # -- the seed contract ------------------------------------------------------------

    def _subscribe(self, name: str) -> None:
        runtime = self._ensure_runtime()
        with self._lock:
            if self._inbox is None:
                self._inbox = Inbox(runtime.iox)
            subscriber = Subscriber(runtime, name, self.group_id, self.config)
            self._subscribers.append(subscriber)
            self._inbox.add(subscriber)
            if self._reader is None and self._puller is None:
                self._reader = Reader(self._inbox, self._decoder, self._queue)
                self._pull = self._reader.pull  # listen() takes samples itself when it waits

    def publish(self, topic: Any, serialized_data: bytes) -> None:
        """Publish a message; small ones travel batched, large ones are copied at once.

        Never waits for subscribers. Thread-safe. See
        :meth:`PubSubBackend.publish <msight_core.pubsub.base.PubSubBackend.publish>`.

        Raises:
            TypeError: the payload is not bytes-like.
            InvalidTopicError: the name is not portable.
            PayloadTooLargeError: above ``max_frame_bytes`` (``MSIGHT_SHM_MAX_FRAME_BYTES``).
            ConfigError: ``/dev/shm`` is too small for this topic's publisher.
            ClosedError: the backend was closed.
            PublishError: a batch sent in the background failed.
        """
        # A str topic published before maps straight to its publisher: no name check.
        publisher = self._fast.get(topic) if type(topic) is str else None
        name = self._name(topic) if publisher is None else topic
        if type(serialized_data) is bytes:  # the common case, checked inline
            data, length = serialized_data, len(serialized_data)
        else:
            data, length = _payload(serialized_data)
        if self._state is not State.OPEN:
            raise ClosedError("ShmPubSub is closed")
        if length > self._max_frame:
            self._check_size(length)
        if publisher is None:
            publisher = self._publishers.get(name) or self._publisher(name)
            if type(topic) is str and len(self._fast) < 10_000:
                self._fast[topic] = publisher
        publisher.publish(data, length)

    def _publish(self, name: str, data: bytes) -> None:
        self._publisher(name).publish(data, len(data))

    def _check_size(self, length: int) -> None:
        if length > self.config.max_frame_bytes:
            raise PayloadTooLargeError(
                f"{length} bytes is above MSIGHT_SHM_MAX_FRAME_BYTES={self.config.max_frame_bytes}"
            )

    def _flush(self, timeout: float | None) -> None:
        for publisher in list(self._publishers.values()):
            publisher.flush()

    def _listen(self) -> Iterator[bytes]:
        # listen() without per-message calls: batches taken on this thread or from
        # the reader's queue, the state checked before each message (shm has
        # nothing to acknowledge).
        local = self._local
        while self._puller is None:
            while local:
                if self._state is not State.OPEN:
                    return
                self.delivered += 1
                yield local.popleft().data
            if self._puller is not None:
                break
            if self._pull is not None:
                batch = self._pulled(None, 4096)
            else:
                batch = self._queue.get_many(None, 4096)
            if batch is CLOSED or not batch:
                return
            local.extend(batch)
        yield from super()._listen()  # views were asked for: copies through the puller

    def _next(self, timeout: float | None) -> Delivery | None:
        puller = self._puller
        if puller is None:
            return super()._next(timeout)
        if self.closed:
            return None
        item = puller.next_delivery(timeout)
        if item is not None:
            self.delivered += 1
        return item

    # -- zero copy --------------------------------------------------------------------

    def receive_view(self, timeout: float | None = None) -> ShmView | None:
        """The next message as a read-only view of shared memory; ``None`` after ``timeout``.

        The first call switches this instance to views: from then on samples are
        taken from shared memory only when asked for (``listen()``/``receive()``
        keep working, as copies). Messages that arrived before are handed out
        first, as copies. Large messages are zero-copy (``view.zero_copy``);
        small ones travel batched and come as copies. Release each view (leave
        its ``with`` block) when done: at most ``MSIGHT_SHM_MAX_VIEWS`` are held.
        Blocks up to ``timeout`` seconds (``None``: until a message or ``close()``).
        One consuming thread at a time; views may be released from any thread.
        ``close()`` releases the views still held.

        Raises:
            RuntimeError: nothing was subscribed, or ``listen()``/``receive()``
                already consumed messages on this instance.
            BackpressureError: ``MSIGHT_SHM_MAX_VIEWS`` views are held.
            ClosedError: the backend is closed.
        """
        self._check_listen()
        puller = self._puller or self._start_views()
        view = puller.next_view(timeout)
        if view is None:
            self._check_open()
            return None
        self.delivered += 1
        return view

    def _start_views(self) -> Puller:
        with self._lock:
            if self._puller is not None:
                return self._puller
            if self.delivered:
                raise RuntimeError(
                    "receive_view() on an instance whose listen()/receive() already took "
                    "messages: use receive_view() from the start, or another ShmPubSub"
                )
            reader, self._reader = self._reader, None
            self._pull = None
            if reader is not None:
                reader.stop()
            # Everything the reader copied, in order (get_many hands out ~1 MB a call).
            leftovers = list(self._local)
            self._local.clear()
            while isinstance(batch := self._queue.get_many(0, 1 << 30), list) and batch:
                leftovers += batch
            assert self._inbox is not None  # subscribe() came first
            self._puller = Puller(self._inbox, self._decoder, self._ledger, leftovers)
            return self._puller

    def loan(self, topic: Any, nbytes: int) -> Loan:
        """Lend shared memory to build one message in place; see :class:`Loan`.

        ``with ps.loan(topic, n) as buf:`` gives a writable ``memoryview`` of ``n``
        bytes (uninitialized); the message is sent when the block ends without an
        exception, dropped otherwise. Thread-safe (each loan is one thread's).

        Raises:
            TypeError / ValueError: ``nbytes`` is not a non-negative int.
            PayloadTooLargeError: above ``MSIGHT_SHM_MAX_FRAME_BYTES``.
            BackpressureError: too many loans outstanding on this topic.
            ClosedError: the backend was closed.
        """
        name = self._name(topic)
        nbytes = _size_arg(nbytes)
        self._check_open()
        self._check_size(nbytes)
        return self._publisher(name).loan(nbytes)

    def reserve(self, topic: Any, nbytes: int) -> None:
        """Set up publishing on ``topic`` now, with memory for ``nbytes`` frames pre-faulted.

        Optional: the first frame of a new size otherwise pays for creating and
        touching its segment (tens of ms for 16 MB). Blocks for that work.

        Raises:
            TypeError / ValueError: ``nbytes`` is not a non-negative int.
            PayloadTooLargeError: above ``MSIGHT_SHM_MAX_FRAME_BYTES``.
            BackpressureError: too many loans outstanding on this topic.
            ClosedError: the backend was closed.
        """
        self.loan(topic, nbytes).discard()

    # -- lifecycle --------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters: delivered, queued, dropped per topic (receive queue overflow plus
        samples overwritten in shared memory), invalid samples, views held, published,
        unrouted (no subscriber anywhere), samples sent."""
        out = super().stats()
        dropped = dict(out["dropped"])
        for topic, count in dict(self._decoder.lost).items():
            dropped[topic] = dropped.get(topic, 0) + count
        out["dropped"] = dropped
        out["invalid"] = self._decoder.invalid
        out["views_held"] = self._ledger.held()
        out["mode"] = "views" if self._puller is not None else "bytes"
        totals = {"published": 0, "samples": 0, "unrouted": 0, "group_members": 0}
        for publisher in list(self._publishers.values()):
            for key, value in publisher.stats().items():
                totals[key] += value
        out.update(totals)
        return out

    def _close(self) -> None:
        with self._lock:
            flusher, self._flusher = self._flusher, None
            reader, self._reader = self._reader, None
            self._pull = None
            publishers = list(self._publishers.values())
            inbox = self._inbox
        if flusher is not None:
            flusher.stop()
        for publisher in publishers:
            publisher.close()
        if reader is not None:
            reader.stop()
        if inbox is not None:
            inbox.closed = True
            inbox.wake()
        puller = self._puller
        locked = puller.lock.acquire(timeout=5.0) if puller is not None else False
        try:
            self._ledger.close()
            for subscriber in self._subscribers:
                subscriber.close()
            if inbox is not None:
                inbox.close()
            # Drop every reference to iceoryx2 objects: services and the node go with them.
            self._publishers = {}
            self._fast = {}
            self._subscribers = []
            self._inbox = None
            runtime, self._runtime = self._runtime, None
            if runtime is not None:
                runtime.close()
        finally:
            if locked and puller is not None:
                puller.lock.release()


def _payload(data: Any) -> tuple[Any, int]:
    """``(data, length in bytes)`` for a bytes-like payload; ``TypeError`` otherwise."""
    if type(data) is bytes:
        return data, len(data)
    if isinstance(data, (bytes, bytearray)):
        return data, len(data)
    if isinstance(data, memoryview):
        return data, data.nbytes
    raise TypeError(
        "serialized_data must be bytes, bytearray or memoryview, got "
        f"{type(data).__name__} (serialize it first, e.g. data.serialize() or text.encode())"
    )


def _size_arg(nbytes: Any) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return nbytes
