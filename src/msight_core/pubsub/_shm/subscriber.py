"""``Subscriber``: one subscription of one backend instance, and sample decoding.

Without a group, a subscriber port joins the topic's broadcast service and
receives every message published after ``subscribe()`` returned. In a group,
the member gets a service of its own (one subscriber port) and joins the
topic's group registry, where publishers find it (:mod:`.groups`).

:class:`Decoder` turns samples into messages: it checks each header
(:mod:`.frames`), copies the payload out for ``listen()`` and counts what was
lost: samples a publisher overwrote because this subscriber fell behind (gaps
in the publisher's message index) and samples that were not valid.
"""

from __future__ import annotations

import ctypes
import logging
import time
import uuid
from collections import OrderedDict
from itertools import repeat
from typing import Any

from ...config import ShmConfig
from ...errors import BrokerUnavailableError
from .._core import Delivery
from . import frames, internals, memcopy
from .services import Runtime, base_name, group_key, member_name, registry_name

__all__ = ["Decoder", "Subscriber"]

logger = logging.getLogger("msight_core.pubsub.shm")

_string_at = ctypes.string_at
_tuple_new = tuple.__new__
_MAX_SOURCES = 1024
_LOG_INTERVAL = 5.0


class Subscriber:
    """A subscriber port (and the listener publishers wake) for ``topic``.

    Raises:
        ConfigError: the topic's services exist with other settings, or are full.
        BrokerUnavailableError: iceoryx2 refused otherwise.
    """

    def __init__(
        self, runtime: Runtime, topic: str, group_id: str | None, config: ShmConfig
    ) -> None:
        self.topic = topic
        self.runtime = runtime
        # A member's service is its own: every sample on it was sent after it joined.
        self.grouped = group_id is not None
        base = base_name(config.domain, topic)
        if group_id is None:
            self.name, ports = base, config.max_subscribers
        else:
            self.name = member_name(base, group_key(group_id), uuid.uuid4().hex[:16])
            ports = 1
        service = runtime.pubsub(self.name, ports)
        events = runtime.event(self.name, ports, config.max_publishers)
        limit = "MSIGHT_SHM_MAX_SUBSCRIBERS"
        self._ports: list[Any] = []
        try:
            builder = service.subscriber_builder().buffer_size(config.buffer_depth)
            self.port = self._add(runtime.create_port(builder.create, "shm subscriber", limit))
            self.listener = self._add(
                runtime.create_port(events.listener_builder().create, "shm listener", limit)
            )
            if group_id is not None:
                # Joined last: a publisher that sees the registry change finds a ready member.
                registry = runtime.event(
                    registry_name(base), 4 * config.max_group_members, config.max_publishers
                )
                self._add(
                    runtime.create_port(
                        registry.listener_builder().create,
                        "shm group membership",
                        "MSIGHT_SHM_MAX_GROUP_MEMBERS",
                    )
                )
        except BaseException:
            self.close()
            raise
        self._receive_error = runtime.iox.ReceiveError
        self.closed = False

    def _add(self, port: Any) -> Any:
        self._ports.append(port)
        return port

    def take(self) -> Any:
        """The next sample, or ``None`` (nothing waiting, or the borrow limit reached).

        Raises:
            BrokerUnavailableError: iceoryx2 failed otherwise.
        """
        port = self.port
        if port is None:
            return None
        try:
            return port.receive()
        except self._receive_error as exc:
            if "ExceedsMaxBorrows" in internals.error_reason(exc):
                return None
            raise BrokerUnavailableError(
                f"shm receive on {self.topic!r} failed: {internals.error_reason(exc)}"
            ) from exc

    def clear_events(self) -> None:
        """Consume pending wake-ups (they are level-triggered in the wait set)."""
        listener = self.listener
        if listener is None:
            return
        try:
            listener.try_wait()
        except Exception:  # the next wait tells
            logger.debug("shm listener try_wait failed", exc_info=True)

    def close(self) -> None:
        """Leave the topic (or group). Idempotent."""
        ports, self._ports = self._ports, []
        for port in reversed(ports):
            try:
                port.delete()
            except Exception:  # closing goes on
                logger.debug("deleting an shm port failed", exc_info=True)
        self.port = self.listener = None
        if ports and self.name != base_name(self.runtime.config.domain, self.topic):
            self.runtime.forget(self.name)
        self.closed = True


class Decoder:
    """Reads samples: header checks, copies for ``listen()``, loss counts.

    Losses are counted from the second sample of each publisher on: what a
    publisher sent before this subscriber first heard from it is not counted
    (it may have started long before). A group member counts from the first
    message (``from_start``): its service is its own, so everything sent on
    it was sent to it. One consuming thread at a time; ``stats()`` reads the
    counts from any.
    """

    def __init__(self) -> None:
        self._expected: OrderedDict[int, int] = OrderedDict()
        self.lost: dict[str, int] = {}
        self.invalid = 0
        self._last_log = 0.0
        self._unlogged = 0

    def header(
        self, topic: str, sample: Any, from_start: bool = False
    ) -> tuple[frames.Header, int, int] | None:
        """``(header, address, size)`` of a valid sample; ``None`` (counted) if invalid."""
        address = sample.payload_ptr
        size = sample.header.number_of_elements
        try:
            head = frames.parse(_string_at(address, min(size, frames.HEADER_SIZE)), size)
        except frames.FrameError as exc:
            self._invalid(topic, str(exc))
            return None
        self._track(topic, head, from_start)
        return head, address, size

    def _track(self, topic: str, head: frames.Header, from_start: bool) -> None:
        count = head.messages
        expected = self._expected.get(head.source, 0 if from_start else None)
        if expected is not None and head.first > expected:
            # The publisher overwrote samples we had not taken: we fell behind.
            gap = min(head.first - expected, 1 << 32)
            self.lost[topic] = self.lost.get(topic, 0) + gap
            self._log(topic, gap)
        self._expected[head.source] = head.first + count
        self._expected.move_to_end(head.source)
        if len(self._expected) > _MAX_SOURCES:
            self._expected.popitem(last=False)

    def _log(self, topic: str, gap: int) -> None:
        self._unlogged += gap
        now = time.monotonic()
        if now - self._last_log >= _LOG_INTERVAL:
            logger.warning(
                "shm subscriber of %r fell behind: %d message(s) overwritten by newer ones "
                "(MSIGHT_SHM_BUFFER_DEPTH samples wait in shared memory)",
                topic,
                self._unlogged,
            )
            self._unlogged = 0
            self._last_log = now

    def failed(self, topic: str, exc: BaseException) -> None:
        """Count a sample whose decoding raised."""
        self._invalid(topic, f"decoding failed: {type(exc).__name__}: {exc}")

    def _invalid(self, topic: str, why: str) -> None:
        self.invalid += 1
        now = time.monotonic()
        if now - self._last_log >= _LOG_INTERVAL:
            self._last_log = now
            logger.warning("shm sample on %r dropped: %s (%d so far)", topic, why, self.invalid)

    def messages(self, topic: str, sample: Any, from_start: bool = False) -> list[Delivery]:
        """Copy the messages of ``sample`` out and release it."""
        try:
            found = self.header(topic, sample, from_start)
            if found is None:
                return []
            head, address, size = found
            if head.kind == frames.SINGLE:
                return [Delivery(topic, memcopy.to_bytes(address + head.offset, head.value))]
            messages = self.batch(topic, head, address, size)
            # Delivery(topic, m) for each message, built in C loops: what the
            # NamedTuple's own __new__ does, without a Python call per message.
            rows = zip(repeat(topic), messages, repeat(None), repeat(None))
            return list(map(_tuple_new, repeat(Delivery), rows))
        finally:
            sample.delete()

    def batch(self, topic: str, head: frames.Header, address: int, size: int) -> list[bytes]:
        """The messages of a batch sample (copies); a broken tail is counted invalid."""
        body = _string_at(address + head.offset, size - head.offset)
        messages, complete = frames.split(body, head.value)
        if not complete:
            self._invalid(topic, f"batch records do not fit ({len(messages)} of {head.value})")
        return messages
