"""Raw RESP connections for the Redis backend: endpoints, set-up, bulk reading.

The pub/sub hot path talks RESP directly over a socket and parses replies in bulk
with hiredis: redis-py's PubSub reads one reply per call and falls behind near
20k msg/s, after which Redis disconnects the subscriber and drops its backlog.
Connection set-up (TLS, AUTH) is done here too, so the reader and writer threads
own their sockets outright.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...config import RedisConfig, Secret
from ...errors import AuthenticationError, BrokerUnavailableError, MissingDependencyError

try:
    import hiredis
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError("hiredis", "redis") from exc

__all__ = [
    "Endpoint",
    "cluster_endpoints",
    "connect",
    "endpoint_from_client",
    "endpoint_from_config",
    "endpoint_from_kwargs",
    "is_cluster_client",
    "pack_command",
    "send_buffers",
]


@dataclass(frozen=True)
class Endpoint:
    """Where and how to connect; secrets stay wrapped."""

    host: str
    port: int
    username: str | None = None
    password: Secret | None = None
    use_tls: bool = False
    tls_ca_cert_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True
    connect_timeout: float = 5.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def endpoint_from_config(config: RedisConfig) -> Endpoint:
    return Endpoint(
        host=config.host,
        port=config.port,
        username=config.username,
        password=config.password,
        use_tls=config.use_tls,
        tls_ca_cert_file=config.tls_ca_cert_file,
        tls_cert_file=config.tls_cert_file,
        tls_key_file=config.tls_key_file,
        tls_verify=config.tls_verify,
        connect_timeout=config.connect_timeout,
    )


def is_cluster_client(client: Any) -> bool:
    """True for a ``redis.RedisCluster`` (it lists its nodes), False for ``redis.Redis``."""
    return callable(getattr(client, "get_nodes", None))


def client_settings(client: Any) -> dict[str, Any]:
    """The connection keywords of a redis-py client, through its public API.

    Raises:
        TypeError: ``client`` is not a redis-py client.
    """
    get = getattr(client, "get_connection_kwargs", None)
    if not callable(get):
        raise TypeError(
            "RedisPubSub expects a redis.Redis or redis.RedisCluster client "
            f"(e.g. get_redis_client()) or a RedisConfig, got {type(client).__name__}"
        )
    return dict(get())


def endpoint_from_client(client: Any) -> Endpoint:
    """Host, port, credentials and TLS settings of a ``redis.Redis`` client."""
    return endpoint_from_kwargs(client_settings(client))


def cluster_endpoints(client: Any) -> list[Endpoint]:
    """Every node a ``redis.RedisCluster`` knows, with its credentials and TLS settings."""
    kwargs = client_settings(client)
    out: list[Endpoint] = []
    for node in client.get_nodes():
        endpoint = endpoint_from_kwargs({**kwargs, "host": node.host, "port": node.port})
        if endpoint not in out:
            out.append(endpoint)
    return out


def endpoint_from_kwargs(kwargs: dict[str, Any]) -> Endpoint:
    """An :class:`Endpoint` from redis-py connection keyword arguments.

    Shared by plain clients and ``redis.RedisCluster`` (which keeps the same
    keywords for every node). redis-py passes ``ssl_*`` keywords only to TLS
    connections; a cluster also names its ``connection_class``.
    """
    if "path" in kwargs:
        raise TypeError("unix-socket Redis clients are not supported; use host and port")
    password = kwargs.get("password")
    connection_class = kwargs.get("connection_class")
    use_tls = (
        "SSL" in getattr(connection_class, "__name__", "")
        or bool(kwargs.get("ssl"))
        or any(key.startswith("ssl_") for key in kwargs)
    )
    cert_reqs = kwargs.get("ssl_cert_reqs", "required")
    return Endpoint(
        host=kwargs.get("host") or "localhost",
        port=int(kwargs.get("port") or 6379),
        username=kwargs.get("username"),
        password=Secret(password) if isinstance(password, str) else None,
        use_tls=use_tls,
        tls_ca_cert_file=kwargs.get("ssl_ca_certs"),
        tls_cert_file=kwargs.get("ssl_certfile"),
        tls_key_file=kwargs.get("ssl_keyfile"),
        tls_verify=cert_reqs not in ("none", ssl.CERT_NONE),
        connect_timeout=float(kwargs.get("socket_connect_timeout") or 5.0),
    )


def pack_command(*parts: bytes) -> bytes:
    """RESP-encode a command whose arguments are all ``bytes``."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def connect(endpoint: Endpoint) -> socket.socket:
    """Open, secure and authenticate a connection.

    Raises:
        AuthenticationError: the server refused the credentials.
        BrokerUnavailableError: the server cannot be reached or speaks no RESP.
    """
    try:
        sock = socket.create_connection(
            (endpoint.host, endpoint.port), timeout=endpoint.connect_timeout
        )
    except OSError as exc:
        raise BrokerUnavailableError(
            f"cannot connect to Redis at {endpoint.address}: {exc.strerror or exc}"
        ) from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # No SO_RCVBUF: setting it turns off the kernel's autotuning, which can
        # grow the buffer well past rmem_max and absorb whole camera frames while
        # the reader thread is descheduled.
        if endpoint.use_tls:
            sock = _wrap_tls(sock, endpoint)
        if endpoint.password is not None:
            secret = endpoint.password.reveal().encode()
            if endpoint.username:
                cmd = pack_command(b"AUTH", endpoint.username.encode(), secret)
            else:
                cmd = pack_command(b"AUTH", secret)
            sock.sendall(cmd)
            reply = read_one(sock)
            if isinstance(reply, hiredis.ReplyError):
                # The reply text never contains the password; keep only its first word.
                raise AuthenticationError(
                    f"Redis at {endpoint.address} refused the credentials "
                    f"({str(reply).split(' ', 1)[0]})"
                )
        sock.settimeout(None)
        return sock
    except (OSError, ssl.SSLError, hiredis.ProtocolError) as exc:
        sock.close()
        raise BrokerUnavailableError(
            f"cannot set up the connection to Redis at {endpoint.address}: {type(exc).__name__}"
        ) from exc
    except BaseException:
        sock.close()
        raise


def _wrap_tls(sock: socket.socket, endpoint: Endpoint) -> socket.socket:
    context = ssl.create_default_context(cafile=endpoint.tls_ca_cert_file)
    if endpoint.tls_cert_file:
        context.load_cert_chain(endpoint.tls_cert_file, endpoint.tls_key_file)
    if not endpoint.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context.wrap_socket(sock, server_hostname=endpoint.host)


def read_one(sock: socket.socket) -> Any:
    """Read exactly one reply (used during set-up only)."""
    reader = hiredis.Reader()
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionResetError("connection closed by the server")
        reader.feed(data)
        reply = reader.gets()
        if reply is not False:
            return reply


def send_buffers(sock: socket.socket, buffers: Sequence[bytes]) -> None:
    """Send ``buffers`` in order, coalescing small ones and never copying big ones."""
    small: list[bytes] = []
    size = 0
    for buf in buffers:
        if len(buf) >= 256 * 1024:
            if small:
                sock.sendall(b"".join(small))
                small, size = [], 0
            sock.sendall(buf)
            continue
        small.append(buf)
        size += len(buf)
        if size >= 256 * 1024:
            sock.sendall(b"".join(small))
            small, size = [], 0
    if small:
        sock.sendall(b"".join(small))
