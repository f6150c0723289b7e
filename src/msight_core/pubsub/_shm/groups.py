"""Groups as a publisher sees them: the members of each group of a topic, round robin.

Each group member owns a service of its own (``<topic>/g/<group>/<member>``,
one subscriber port) and holds a listener on the topic's group registry (an
event service nobody notifies). A publisher reads the registry's listener
count on every send (a shared-memory read): when it changes, and every
second while members exist, it lists the domain's services to learn the
members. Each message then goes to the broadcast service (if anyone listens)
and to one member of each group, in turn.

A member that left is noticed at once (a send reaches no subscriber: the
message goes to the next member). A member whose process was killed keeps
getting its share until iceoryx2 removes the dead process's ports (done by
the publisher's housekeeping every few seconds); those messages are lost, as
with a NATS queue-group member that dies with messages in flight.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ...config import ShmConfig
from ...errors import ConfigError
from .destination import Destination
from .services import Runtime, registry_name

__all__ = ["GroupRouter"]

logger = logging.getLogger("msight_core.pubsub.shm")

RESCAN_INTERVAL = 1.0

#: ``send(destination) -> subscribers reached``.
Send = Callable[[Destination], int]


class GroupRouter:
    """The groups of one topic and their members. Not thread-safe (its publisher's lock)."""

    def __init__(self, runtime: Runtime, base: str, config: ShmConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.prefix = registry_name(base) + "/"
        self.registry = runtime.event(
            registry_name(base), 4 * config.max_group_members, config.max_publishers
        )
        self.groups: dict[str, list[Destination]] = {}
        self._turn: dict[str, int] = {}
        self._count = 0
        self._next_scan = 0.0
        self._empty: set[str] = set()  # listed services without a subscriber
        self.lost = 0

    def _members(self) -> int:
        try:
            return int(self.registry.dynamic_config.number_of_listeners)
        except Exception:  # noqa: BLE001 - rescan on the timer instead
            return self._count

    def refresh(self) -> None:
        """Rescan if the registry changed, or on the timer while members exist."""
        count = self._members()
        if count != self._count or (count and time.monotonic() >= self._next_scan):
            self._count = count
            self.rescan()

    def rescan(self) -> None:
        """List the member services of this topic and connect to the new ones."""
        self._next_scan = time.monotonic() + RESCAN_INTERVAL
        found: dict[str, set[str]] = {}
        if self._count or self.groups:
            for name in self.runtime.service_names(self.prefix):
                parts = name[len(self.prefix) :].split("/")
                if len(parts) == 2 and all(parts):
                    found.setdefault(parts[0], set()).add(name)
        listed = set().union(*found.values()) if found else set()
        self._empty &= listed
        for group in list(self.groups):
            names = found.get(group, set())
            for dest in list(self.groups[group]):
                if dest.name not in names:
                    self._drop(group, dest)
        limit = self.config.max_group_members
        for group, names in found.items():
            members = self.groups.setdefault(group, [])
            known = {dest.name for dest in members}
            for name in sorted(names - known - self._empty):
                if len(members) >= limit:
                    logger.warning(
                        "shm group on %s has more than %d members "
                        "(MSIGHT_SHM_MAX_GROUP_MEMBERS): the others get nothing",
                        self.prefix[:-3],
                        limit,
                    )
                    break
                dest = self._open(name)
                if dest is not None:
                    members.append(dest)
        for group in [g for g, members in self.groups.items() if not members]:
            del self.groups[group]
            self._turn.pop(group, None)

    def _open(self, name: str) -> Destination | None:
        try:
            if not self.runtime.pubsub(name, 1).dynamic_config.number_of_subscribers:
                self.runtime.forget(name)
                self._empty.add(name)
                return None
            return Destination(self.runtime, name, 1, self.config)
        except ConfigError:
            raise
        except Exception:  # a member leaving while we connect
            logger.debug("cannot open shm group member %s", name, exc_info=True)
            self.runtime.forget(name)
            return None

    def _drop(self, group: str, dest: Destination) -> None:
        members = self.groups.get(group, [])
        if dest in members:
            members.remove(dest)
        dest.close()
        self.runtime.forget(dest.name)

    @property
    def active(self) -> bool:
        return bool(self.groups)

    def _next(self, group: str) -> Destination | None:
        members = self.groups.get(group)
        if not members:
            return None
        turn = self._turn.get(group, 0)
        self._turn[group] = turn + 1
        return members[turn % len(members)]

    def send_each(self, send: Send) -> None:
        """``send`` to one member of each group; on to the next member if one left."""
        for group in list(self.groups):
            for _ in range(len(self.groups.get(group, ())) + 1):
                dest = self._next(group)
                if dest is None:
                    self.lost += 1
                    break
                if send(dest):
                    break
                self._drop(group, dest)

    def send_batches(self, messages: list[bytes]) -> None:
        """Spread ``messages`` over each group's members in turn, one batch per member."""
        for group in list(self.groups):
            members = self.groups[group]
            turn = self._turn.get(group, 0)
            parts: list[list[bytes]] = [[] for _ in members]
            count = len(members)
            for i, message in enumerate(messages):
                parts[(turn + i) % count].append(message)
            self._turn[group] = turn + len(messages)
            retry: list[bytes] = []
            for dest, part in zip(list(members), parts):
                if part and not dest.send_batch(part):
                    self._drop(group, dest)
                    retry.extend(part)
            if retry:
                if self.groups.get(group):
                    self.send_batches_to(group, retry)
                else:
                    self.lost += len(retry)

    def send_batches_to(self, group: str, messages: list[bytes]) -> None:
        """Second chance for messages whose member left: the next member takes them all."""
        for _ in range(len(self.groups.get(group, ()))):
            dest = self._next(group)
            if dest is None:
                break
            if dest.send_batch(messages):
                return
            self._drop(group, dest)
        self.lost += len(messages)

    def close(self) -> None:
        for group in list(self.groups):
            for dest in list(self.groups[group]):
                self._drop(group, dest)
        self.groups.clear()
        self.registry = None

    def destinations(self) -> list[Any]:
        return [dest for members in self.groups.values() for dest in members]
