"""In-process backend for unit tests: no broker, same contract.

All :class:`MemoryPubSub` instances sharing a :class:`MemoryBroker` (by default
the process-wide one) see each other's messages: broadcast to every subscriber
without a group, and round-robin among members of one ``group_id``, like a NATS
queue group. Payloads are delivered as the exact ``bytes`` published.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Callable
from typing import Any

from ..config import QueueConfig, load_queue_config
from ..topics import topic_matcher
from ._core import Delivery, QueueBackend
from .base import Capabilities

__all__ = ["MemoryBroker", "MemoryPubSub"]


#: How a broker hands a message to one subscriber (its receive queue's ``put``).
Deliver = Callable[[Delivery], object]


class MemoryBroker:
    """Routes messages between :class:`MemoryPubSub` instances of one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # topic -> group key (("solo", deliver) for broadcast members) -> members
        self._routes: dict[str, dict[Any, list[Deliver]]] = {}
        # pattern -> (its matcher, group key -> members), for wildcard subscriptions
        self._patterns: dict[str, tuple[re.Pattern[str], dict[Any, list[Deliver]]]] = {}
        self._turn = itertools.count()

    def join(self, name: str, group_id: str | None, deliver: Deliver) -> None:
        """Route messages of ``name`` to ``deliver``, shared with others of ``group_id``."""
        with self._lock:
            groups = self._routes.setdefault(name, {})
            key = group_id if group_id is not None else ("solo", deliver)
            groups.setdefault(key, []).append(deliver)

    def join_pattern(self, pattern: str, group_id: str | None, deliver: Deliver) -> None:
        """Route messages of every topic ``pattern`` matches to ``deliver``."""
        with self._lock:
            _, groups = self._patterns.setdefault(pattern, (topic_matcher(pattern), {}))
            key = group_id if group_id is not None else ("solo", deliver)
            groups.setdefault(key, []).append(deliver)

    def leave(self, deliver: Deliver) -> None:
        """Stop routing anything to ``deliver``."""
        with self._lock:
            every = [*self._routes.values(), *(groups for _, groups in self._patterns.values())]
            for groups in every:
                for key in list(groups):
                    if deliver in groups[key]:
                        groups[key].remove(deliver)
                    if not groups[key]:
                        del groups[key]

    def route(self, name: str, data: bytes) -> None:
        with self._lock:
            every = list(self._routes.get(name, {}).values())
            for matcher, groups in self._patterns.values():
                if matcher.fullmatch(name):
                    every.extend(groups.values())
            if not every:
                return
            targets = [
                members[0] if len(members) == 1 else members[next(self._turn) % len(members)]
                for members in every
            ]
            delivery = Delivery(name, data)
            # Deliver under the lock so one publisher's order is kept per subscriber.
            for deliver in targets:
                deliver(delivery)


_default_broker = MemoryBroker()


class MemoryPubSub(QueueBackend):
    """In-memory pub/sub (``MSIGHT_PUBSUB_BACKEND=memory``).

    Args:
        group_id: subscribers with the same ``group_id`` share the messages.
        broker: the :class:`MemoryBroker` to use (default: one per process).
        queue: receive-queue bounds (default: from the environment).
    """

    capabilities = Capabilities(
        broadcast=True, groups=True, persistent=False, ordered=True, patterns=True
    )

    def __init__(
        self,
        group_id: str | None = None,
        broker: MemoryBroker | None = None,
        queue: QueueConfig | None = None,
    ) -> None:
        super().__init__(queue or load_queue_config())
        self.group_id = group_id
        self.broker = broker or _default_broker

    def __repr__(self) -> str:
        return f"<MemoryPubSub group_id={self.group_id!r} topics={list(self.topics)}>"

    def _subscribe(self, name: str) -> None:
        self.broker.join(name, self.group_id, self._queue.put)

    def _subscribe_pattern(self, pattern: str) -> None:
        self.broker.join_pattern(pattern, self.group_id, self._queue.put)

    def _publish(self, name: str, data: bytes) -> None:
        self.broker.route(name, data)

    def _close(self) -> None:
        self.broker.leave(self._queue.put)
