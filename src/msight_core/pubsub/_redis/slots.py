"""Redis Cluster hash slots and the slot-to-node map.

A channel's slot is ``CRC16(name) mod 16384`` (CRC16-XMODEM, as in the cluster
spec), computed on the part between the first ``{`` and the next ``}`` when that
part is not empty (a hash tag). :class:`SlotMap` learns which master owns each
slot with ``CLUSTER SLOTS`` from any reachable node and is shared by the
publishing and the subscribing thread of one backend.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from ...config import parse_redis_node
from ...errors import (
    AuthenticationError,
    BrokerUnavailableError,
    ConfigError,
    MsightError,
    ShardedPubSubUnsupportedError,
)
from .wire import Endpoint, connect, hiredis, pack_command

__all__ = ["SLOTS", "SlotMap", "crc16", "key_slot"]

logger = logging.getLogger("msight_core.pubsub.redis")

SLOTS = 16384
_MIN_REFRESH_INTERVAL = 0.1


def _table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _table()


def crc16(data: bytes) -> int:
    """CRC16-XMODEM (polynomial 0x1021, initial value 0), as Redis Cluster uses."""
    crc = 0
    table = _CRC16
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ byte) & 0xFF]
    return crc


def key_slot(key: bytes) -> int:
    """The hash slot of ``key``, honouring a non-empty ``{hash tag}``."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc16(key) % SLOTS


def read_replies(sock: socket.socket, count: int) -> list[Any]:
    """Read exactly ``count`` replies from ``sock`` (set-up and refresh only)."""
    reader = hiredis.Reader()
    out: list[Any] = []
    while len(out) < count:
        reply = reader.gets()
        if reply is not False:
            out.append(reply)
            continue
        data = sock.recv(65536)
        if not data:
            raise ConnectionResetError("connection closed by the server")
        reader.feed(data)
    return out


class SlotMap:
    """Which master owns each slot, refreshed from any reachable node.

    Thread-safe. Lookups (:meth:`owner`, :meth:`slot`) take no lock: a stale
    answer is corrected by a ``MOVED`` reply or the next refresh.
    """

    def __init__(self, seeds: Sequence[Endpoint]) -> None:
        if not seeds:
            raise ConfigError("Redis cluster mode needs at least one node")
        self.template = seeds[0]
        self._endpoints: dict[tuple[str, int], Endpoint] = {}
        self._known: list[Endpoint] = [self._endpoint(e.host, e.port) for e in seeds]
        self._owners: list[Endpoint | None] = [None] * SLOTS
        self._slots: dict[str, int] = {}
        self._lock = threading.Lock()
        self._refreshed_at = 0.0
        self._checked = False
        self.version = 0
        self.refreshes = 0

    # -- lookups (any thread) -----------------------------------------------------

    @property
    def nodes(self) -> tuple[Endpoint, ...]:
        """The nodes known so far, those that answered last time first."""
        return tuple(self._known)

    def slot(self, name: str) -> int:
        slot = self._slots.get(name)
        if slot is None:
            slot = key_slot(name.encode())
            if len(self._slots) < 100_000:
                self._slots[name] = slot
        return slot

    def owner(self, slot: int) -> Endpoint | None:
        return self._owners[slot]

    @property
    def loaded(self) -> bool:
        return self.version > 0

    def moved(self, slot: int, address: bytes | str) -> Endpoint:
        """Record a ``MOVED slot host:port`` redirection and return the new owner."""
        text = address.decode() if isinstance(address, bytes) else address
        host, port = parse_redis_node(text)
        endpoint = self._endpoint(host or self.template.host, port)
        self._owners[slot] = endpoint
        return endpoint

    # -- refresh ----------------------------------------------------------------

    def refresh(self, force: bool = False) -> bool:
        """Reload the map from the first node that answers.

        Skipped (returning ``False``) when another thread refreshed within the
        last 100 ms, unless ``force``. Blocks for one round trip per node tried.

        Raises:
            BrokerUnavailableError: no known node answered.
            ShardedPubSubUnsupportedError: the servers have no sharded pub/sub.
            ConfigError: the server is not in cluster mode.
            AuthenticationError: the credentials were refused.
        """
        with self._lock:
            if not force and time.monotonic() - self._refreshed_at < _MIN_REFRESH_INTERVAL:
                return False
            problems: list[str] = []
            for endpoint in list(self._known):
                try:
                    self._load_from(endpoint)
                except AuthenticationError:
                    raise
                except (OSError, BrokerUnavailableError, hiredis.ProtocolError) as exc:
                    why = str(exc) if isinstance(exc, MsightError) else repr(exc)
                    problems.append(f"{endpoint.address}: {why}")
                    # Try the nodes that answered last time first.
                    self._known.remove(endpoint)
                    self._known.append(endpoint)
                    continue
                self._refreshed_at = time.monotonic()
                self.version += 1
                self.refreshes += 1
                return True
            self._refreshed_at = time.monotonic()
            raise BrokerUnavailableError(
                "no Redis Cluster node answered CLUSTER SLOTS: " + "; ".join(problems)
            )

    def _load_from(self, endpoint: Endpoint) -> None:
        sock = connect(endpoint)
        try:
            sock.settimeout(endpoint.connect_timeout)
            commands = [pack_command(b"CLUSTER", b"SLOTS")]
            if not self._checked:
                commands.append(pack_command(b"COMMAND", b"INFO", b"SPUBLISH"))
            sock.sendall(b"".join(commands))
            replies = read_replies(sock, len(commands))
        finally:
            sock.close()
        slots = replies[0]
        if isinstance(slots, hiredis.ReplyError):
            if "cluster support disabled" in str(slots).lower():
                raise ConfigError(
                    f"MSIGHT_REDIS_MESSAGE_BROKER_USE_CLUSTER is set but the Redis server at "
                    f"{endpoint.address} is not in cluster mode"
                )
            raise BrokerUnavailableError(f"CLUSTER SLOTS refused: {slots}")
        if len(replies) > 1:
            info = replies[1]
            if isinstance(info, hiredis.ReplyError) or not info or info[0] is None:
                raise ShardedPubSubUnsupportedError(
                    f"the Redis server at {endpoint.address} has no sharded pub/sub "
                    "(SPUBLISH/SSUBSCRIBE need Redis 7+ or Valkey 7+); upgrade the cluster, "
                    "or use the plain Redis backend on a single server"
                )
            self._checked = True
        owners: list[Endpoint | None] = [None] * SLOTS
        seen: list[Endpoint] = []
        for entry in slots:
            start, end, master = int(entry[0]), int(entry[1]), entry[2]
            host = master[0].decode() if master[0] else endpoint.host
            if host == "?":  # a node that does not know its own address yet
                host = endpoint.host
            owner = self._endpoint(host, int(master[1]))
            owners[start : end + 1] = [owner] * (end - start + 1)
            seen.append(owner)
            for replica in entry[3:]:
                if replica and replica[0]:
                    seen.append(self._endpoint(replica[0].decode(), int(replica[1])))
        if not any(owners):
            raise BrokerUnavailableError(f"{endpoint.address} reports no slot assignment yet")
        self._owners = owners
        for node in seen:
            if node not in self._known:
                self._known.append(node)

    def _endpoint(self, host: str, port: int) -> Endpoint:
        key = (host, port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = dataclasses.replace(
                self.template, host=host, port=port
            )
        return endpoint
