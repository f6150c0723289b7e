"""Broker clusters on loopback for tests: Redis Cluster and NATS clusters.

Built from the same embedded servers as :mod:`msight_core.testing.brokers`
(one :class:`~.brokers.EmbeddedBroker` per member, so every member can be
killed or restarted on its own port), wired together the way an operator
would: a Redis Cluster gets its slots assigned, its nodes introduced with
``CLUSTER MEET`` and its replicas attached with ``CLUSTER REPLICATE``; a NATS
cluster gets routes between all members and a shared cluster name.

Setting up a Redis Cluster here talks RESP over a plain socket, so it needs no
client library.
"""

from __future__ import annotations

import json
import logging
import socket
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BrokerUnavailableError
from .brokers import LOOPBACK, NatsServer, RedisServer, free_port

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["NatsCluster", "RedisCluster", "RedisClusterNode", "key_slot", "redis_command"]

logger = logging.getLogger(__name__)

SLOTS = 16384


def key_slot(key: str | bytes) -> int:
    """The cluster hash slot of ``key`` (CRC16 mod 16384, hash tags honoured)."""
    from ..pubsub._redis.slots import key_slot as _key_slot

    return _key_slot(key.encode() if isinstance(key, str) else key)


def redis_command(host: str, port: int, *args: str | int, timeout: float = 5.0) -> Any:
    """Send one command over a fresh connection and return the decoded reply.

    Raises:
        OSError: the node cannot be reached.
        RuntimeError: the node answered with an error.
    """
    import hiredis

    parts = [str(a).encode() for a in args]
    packed = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(packed)
        reader = hiredis.Reader(encoding="utf-8")
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError(f"{host}:{port} closed the connection")
            reader.feed(data)
            reply = reader.gets()
            if reply is not False:
                break
    if isinstance(reply, hiredis.ReplyError):
        raise RuntimeError(f"{host}:{port} refused {args[0]}: {reply}")  # noqa: TRY004
    return reply


class RedisClusterNode(RedisServer):
    """A ``redis-server``/``valkey-server`` started with ``--cluster-enabled yes``."""

    kind = "redis"

    def __init__(self, *args: Any, node_timeout_ms: int = 1000, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.node_timeout_ms = node_timeout_ms
        # An explicit bus port: the default (port + 10000) may be taken, or above
        # 65535, which the server refuses at start.
        self.bus_port = free_port(self.host)

    def command(self) -> list[str]:
        return super().command() + [
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.data_dir / "nodes.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-port", str(self.bus_port),
            # Let any replica take over, however stale: tests kill masters at will.
            "--cluster-replica-validity-factor", "0",
        ]  # fmt: skip

    def cmd(self, *args: str | int, timeout: float = 5.0) -> Any:
        """Run one command on this node (see :func:`redis_command`)."""
        return redis_command(self.host, self.port, *args, timeout=timeout)

    @property
    def node_id(self) -> str:
        return str(self.cmd("CLUSTER", "MYID"))

    def info(self, section: str) -> dict[str, str]:
        text = self.cmd("INFO", section) if section != "cluster" else self.cmd("CLUSTER", "INFO")
        out = {}
        for line in str(text).splitlines():
            key, sep, value = line.partition(":")
            if sep:
                out[key.strip()] = value.strip()
        return out


class RedisCluster:
    """A Redis Cluster of ``masters`` shards with ``replicas`` replicas each.

    Slots are split evenly between the masters. ``start()`` returns once every
    node reports ``cluster_state:ok`` and every replica is in sync.

    Args:
        masters: number of shards (at least 3 for automatic failover to work).
        replicas: replicas per master.
        node_timeout_ms: ``cluster-node-timeout``: how long a silent master is
            given before its replica takes over.
    """

    def __init__(self, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 1000) -> None:
        self.base_dir = Path(tempfile.mkdtemp(prefix="msight-redis-cluster-"))
        self.nodes = [
            RedisClusterNode(node_timeout_ms=node_timeout_ms, data_dir=self.base_dir / f"n{i}")
            for i in range(masters * (1 + replicas))
        ]
        self.n_masters = masters
        self.replicas = replicas
        self._next_meet = 0.0  # when start() may introduce forgotten nodes again

    # -- lifecycle ----------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Self:
        """Start all nodes, assign slots, join them and wait for ``cluster_state:ok``.

        Raises:
            BrokerUnavailableError: a node did not start or the cluster did not form.
        """
        for node in self.nodes:
            node.start()
        masters = self.nodes[: self.n_masters]
        per = SLOTS // len(masters)
        for i, node in enumerate(masters):
            first = i * per
            last = SLOTS - 1 if i == len(masters) - 1 else first + per - 1
            node.cmd("CLUSTER", "ADDSLOTSRANGE", first, last)
        deadline = time.monotonic() + timeout
        self._wait(self._met, deadline, "all nodes to know each other")
        ids = [m.node_id for m in masters]
        for j, node in enumerate(self.nodes[self.n_masters :]):
            node.cmd("CLUSTER", "REPLICATE", ids[j % len(masters)])
        self.wait_ok(deadline - time.monotonic())
        if self.replicas:
            self._wait(self._replicas_in_sync, deadline, "replicas to sync")
        logger.info("Redis Cluster ready: %s", ", ".join(n.address for n in self.nodes))
        return self

    def close(self) -> None:
        """Stop every node and remove the data directories."""
        for node in self.nodes:
            node.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries --------------------------------------------------------------------

    @property
    def running_nodes(self) -> list[RedisClusterNode]:
        return [n for n in self.nodes if n.running]

    def master_for(self, channel: str) -> RedisClusterNode:
        """The running node that currently owns ``channel``'s slot."""
        slot = key_slot(channel)
        for node in self.running_nodes:
            try:
                for start, end, master, *_ in node.cmd("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return self._node_at(master[0], int(master[1]))
            except (OSError, RuntimeError):
                continue
        raise BrokerUnavailableError(f"no running node knows the owner of slot {slot}")

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every running node reports ``cluster_state:ok`` and full coverage."""

        def ok() -> bool:
            for node in self.running_nodes:
                info = node.info("cluster")
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                    return False
            return True

        self._wait(ok, time.monotonic() + timeout, "cluster_state:ok")

    def env(self) -> dict[str, str]:
        """``MSIGHT_*`` variables for cluster mode; seeds are the first two nodes."""
        seeds = ",".join(n.address for n in self.nodes[:2])
        first = self.nodes[0]
        return {
            "MSIGHT_PUBSUB_BACKEND": "redis",
            "MSIGHT_REDIS_MESSAGE_BROKER_HOST": first.host,
            "MSIGHT_REDIS_MESSAGE_BROKER_PORT": str(first.port),
            "MSIGHT_REDIS_MESSAGE_BROKER_USE_CLUSTER": "true",
            "MSIGHT_REDIS_MESSAGE_BROKER_CLUSTER_NODES": seeds,
        }

    # -- helpers --------------------------------------------------------------------

    def _node_at(self, host: str, port: int) -> RedisClusterNode:
        for node in self.nodes:
            if node.port == port:
                return node
        raise LookupError(f"{host}:{port} is not a member of this cluster")

    def _met(self) -> bool:
        """Introduce every node the first one does not know; True once all know all.

        A handshake not finished within the node timeout is dropped by the
        server and never retried (a cluster failed to form so on a loaded
        machine, in CI), so a node the first one has forgotten is introduced
        again, at most once a second.
        """
        now = time.monotonic()
        if now >= self._next_meet:
            self._next_meet = now + 1.0
            first = self.nodes[0]
            listed = {  # "<id> <ip>:<port>@<bus port>[,<hostname>] <flags> ..."
                int(fields[1].split("@")[0].rsplit(":", 1)[1])
                for fields in (
                    row.split() for row in str(first.cmd("CLUSTER", "NODES")).splitlines()
                )
                if len(fields) > 1
            }
            for node in self.nodes[1:]:
                if node.port not in listed:
                    first.cmd("CLUSTER", "MEET", node.host, node.port, node.bus_port)
        return all(self._known(n) == len(self.nodes) for n in self.nodes)

    @staticmethod
    def _known(node: RedisClusterNode) -> int:
        return int(node.info("cluster").get("cluster_known_nodes", "0"))

    def _replicas_in_sync(self) -> bool:
        for node in self.nodes[self.n_masters :]:
            info = node.info("replication")
            if info.get("role") != "slave" or info.get("master_link_status") != "up":
                return False
        return True

    @staticmethod
    def _wait(check: Any, deadline: float, what: str) -> None:
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except (OSError, RuntimeError) as exc:
                last = exc
            time.sleep(0.1)
        raise BrokerUnavailableError(f"Redis Cluster: timed out waiting for {what} ({last})")


class NatsCluster:
    """``size`` nats-server processes routed to each other under one cluster name.

    Args:
        size: number of servers.
        jetstream: enable clustered JetStream (each server gets a store
            directory and a ``server_name``).
        name: the ``cluster_name``.
    """

    def __init__(self, size: int = 3, jetstream: bool = False, name: str = "msight") -> None:
        self.name = name
        self.jetstream = jetstream
        self.base_dir = Path(tempfile.mkdtemp(prefix="msight-nats-cluster-"))
        cluster_ports = [free_port() for _ in range(size)]
        self.monitor_ports = [free_port() for _ in range(size)]
        self.servers: list[NatsServer] = []
        for i in range(size):
            routes = ",".join(
                f"nats://{LOOPBACK}:{p}" for j, p in enumerate(cluster_ports) if j != i
            )
            args = [
                "--cluster", f"nats://{LOOPBACK}:{cluster_ports[i]}",
                "--routes", routes,
                "--cluster_name", name,
                "--server_name", f"{name}-n{i}",
                "-m", str(self.monitor_ports[i]),
            ]  # fmt: skip
            self.servers.append(
                NatsServer(jetstream=jetstream, data_dir=self.base_dir / f"n{i}", extra_args=args)
            )

    def start(self, timeout: float = 30.0) -> Self:
        """Start every server and wait until all routes (and JetStream) are up.

        Raises:
            BrokerUnavailableError: a server did not start or the routes did not form.
        """
        for server in self.servers:
            server.start()
        self.wait_routed(timeout)
        return self

    def wait_routed(self, timeout: float = 30.0) -> None:
        """Wait until every running server routes to every other running one."""
        deadline = time.monotonic() + timeout
        while True:
            running = [i for i, s in enumerate(self.servers) if s.running]
            try:
                routed = all(
                    self._monitor(i, "routez")["num_routes"] >= len(running) - 1 for i in running
                )
                if routed and self.jetstream:
                    routed = all(self._monitor(i, "healthz").get("status") == "ok" for i in running)
                if routed:
                    return
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise BrokerUnavailableError(f"NATS cluster {self.name}: routes did not form")
            time.sleep(0.1)

    def close(self) -> None:
        """Stop every server and remove the data directories."""
        for server in self.servers:
            server.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def env(self, order: list[int] | None = None) -> dict[str, str]:
        """``MSIGHT_*`` variables listing the servers (in ``order``, if given)."""
        order = list(range(len(self.servers))) if order is None else order
        listed = ", ".join(f"'{self.servers[i].url}'" for i in order)
        return {"MSIGHT_PUBSUB_BACKEND": "nats", "MSIGHT_NATS_SERVERS": f"[{listed}]"}

    def connections(self, index: int) -> int:
        """Number of client connections on server ``index`` (monitoring endpoint)."""
        return int(self._monitor(index, "connz")["num_connections"])

    def _monitor(self, index: int, path: str) -> dict[str, Any]:
        url = f"http://{LOOPBACK}:{self.monitor_ports[index]}/{path}"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                return dict(json.loads(resp.read()))
        except urllib.error.HTTPError as exc:  # healthz answers 503 while not ready
            return dict(json.loads(exc.read() or b"{}"))
