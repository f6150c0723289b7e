"""Shared CLI helpers: broker resolution, sizes, tables, terminal output."""

from __future__ import annotations

import argparse
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit

from ..config import (
    BACKENDS,
    backend_name,
    environment,
    load_kafka_config,
    load_nats_config,
    load_redis_config,
    mask_url,
)
from ..errors import ConfigError, MsightError

__all__ = [
    "EMBEDDED_NATS_MAX_PAYLOAD",
    "CliError",
    "HelpFormatter",
    "Target",
    "base_env",
    "broker_addresses",
    "fmt_bytes",
    "fmt_ms",
    "parse_size",
    "parse_sizes",
    "reachable",
    "refuse_in_process",
    "render_table",
    "resolve_target",
    "say",
    "start_embedded",
]

MiB = 1024 * 1024
#: max_payload of the NATS servers the CLI starts: carries 16 MB frames in one message.
EMBEDDED_NATS_MAX_PAYLOAD = 64 * MiB

# Variables that say where (and as whom) to connect; dropped when the CLI points
# a command at an embedded broker instead, so stale credentials are not sent to it.
_CONNECTION_VARS: dict[str, tuple[str, ...]] = {
    "redis": ("MSIGHT_REDIS_MESSAGE_BROKER_",),
    "nats": (
        "MSIGHT_NATS_SERVERS", "MSIGHT_NATS_USERNAME", "MSIGHT_NATS_PASSWORD",
        "MSIGHT_NATS_TOKEN", "MSIGHT_NATS_NKEY_SEED", "MSIGHT_NATS_USER_JWT",
        "MSIGHT_NATS_USER_CREDENTIALS", "MSIGHT_NATS_USE_TLS", "MSIGHT_NATS_TLS_",
    ),
    "kafka": (
        "MSIGHT_KAFKA_SERVERS", "MSIGHT_KAFKA_SASL_", "MSIGHT_KAFKA_USE_TLS",
        "MSIGHT_KAFKA_TLS_", "MSIGHT_KAFKA_CLIENT_",
    ),
}  # fmt: skip
# The variable whose presence means "a broker is configured".
_CONFIGURED_BY: dict[str, tuple[str, ...]] = {
    "redis": (
        "MSIGHT_REDIS_MESSAGE_BROKER_HOST",
        "MSIGHT_REDIS_MESSAGE_BROKER_PORT",
        "MSIGHT_REDIS_MESSAGE_BROKER_CLUSTER_NODES",
    ),
    "nats": ("MSIGHT_NATS_SERVERS",),
    "kafka": ("MSIGHT_KAFKA_SERVERS",),
}


class CliError(MsightError):
    """A command cannot go on; ``main()`` prints the message on one line."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, unless it has none (``None``), it is
    an on/off flag, or its help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        flag = action.nargs == 0  # store_true/store_false/count: the name says it
        if flag or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def base_env() -> dict[str, str]:
    """A copy of the process environment, handed to the config loaders as ``env=``.

    The CLI needs a mapping it can amend (backend override, embedded broker
    address); parsing stays in :mod:`msight_core.config`.
    """
    return environment()


# --------------------------------------------------------------------------- brokers


def broker_addresses(kind: str, env: Mapping[str, str]) -> list[tuple[str, int]]:
    """``(host, port)`` of each configured server of ``kind`` (defaults if unset).

    Raises:
        ConfigError: a malformed ``MSIGHT_*`` value.
    """
    out: list[tuple[str, int]] = []
    if kind == "redis":
        cfg = load_redis_config(env)
        if cfg.use_cluster and cfg.cluster_nodes:
            for node in cfg.cluster_nodes:
                out.append(_host_port(node, 6379))
        else:
            out.append((cfg.host, cfg.port))
    elif kind == "nats":
        for server in load_nats_config(env=env).servers:
            out.append(_host_port(server, 4222))
    elif kind == "kafka":
        for server in load_kafka_config(env=env).servers:
            out.append(_host_port(server, 9092))
    return out


def _host_port(server: str, default_port: int) -> tuple[str, int]:
    text = server if "://" in server else f"tcp://{server}"
    try:
        parts = urlsplit(text)
        port = parts.port or default_port
    except ValueError as exc:
        raise ConfigError(f"malformed server address {mask_url(server)!r}: {exc}") from None
    return parts.hostname or "localhost", port


def reachable(addresses: Sequence[tuple[str, int]], timeout: float = 1.5) -> str | None:
    """``host:port`` of the first address accepting a TCP connection, else ``None``."""
    for host, port in addresses:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return f"{host}:{port}"
        except OSError:
            continue
    return None


def start_embedded(kind: str, port: int | None = None) -> Any:
    """Start an embedded broker of ``kind`` (NATS: JetStream, 64 MiB max_payload).

    Raises:
        MissingDependencyError: the ``brokers`` extra is not installed.
        BrokerUnavailableError: the server did not start.
    """
    from ..testing.brokers import broker_for

    kwargs: dict[str, Any] = {"port": port}
    if kind == "nats":
        kwargs.update(jetstream=True, max_payload=EMBEDDED_NATS_MAX_PAYLOAD)
    broker = broker_for(kind, **kwargs)
    return broker.start()


@dataclass
class Target:
    """Where a command talks to: backend name, env mapping for the loaders, broker."""

    backend: str
    env: dict[str, str]
    embedded: Any = None
    description: str = ""
    notes: list[str] = field(default_factory=list)

    def close(self) -> None:
        """Stop the embedded broker, if this command started one."""
        if self.embedded is not None:
            self.embedded.close()
            self.embedded = None


def resolve_target(
    backend: str | None = None, embedded: str = "auto", port: int | None = None
) -> Target:
    """Pick the backend and broker a command uses; start an embedded one if needed.

    Args:
        backend: override of ``MSIGHT_PUBSUB_BACKEND``.
        embedded: ``auto`` (embedded when nothing is configured or reachable),
            ``always`` or ``never``.
        port: port for an embedded broker (default: a free one).

    Raises:
        ConfigError: unknown backend or malformed ``MSIGHT_*`` value.
        CliError: ``embedded="never"`` and the broker is unreachable.
        MissingDependencyError, BrokerUnavailableError: the embedded broker cannot start.
    """
    env = base_env()
    if backend is not None:
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
        env["MSIGHT_PUBSUB_BACKEND"] = backend
    kind = backend_name(env)
    if kind == "memory":
        return Target(kind, env, description="the in-process memory backend (no broker)")
    if kind == "shm":
        return Target(kind, env, description="shared memory on this host (no broker)")
    configured = any(env.get(var, "").strip() for var in _CONFIGURED_BY[kind])
    addresses = broker_addresses(kind, env)
    shown = ", ".join(f"{h}:{p}" for h, p in addresses)
    if embedded != "always":
        found = reachable(addresses)
        if found is not None:
            where = "configured" if configured else "default"
            return Target(kind, env, description=f"the {where} {kind} broker at {found}")
        if embedded == "never":
            raise CliError(
                f"no {kind} broker reachable at {shown}; start one (`msight broker {kind}` "
                "prints the settings to use) or fix the MSIGHT_* settings"
            )
    broker = start_embedded(kind, port)
    for var in list(env):
        if var.startswith(_CONNECTION_VARS[kind]):
            del env[var]
    env.update(broker.env())
    target = Target(kind, env, embedded=broker)
    target.description = f"an embedded {kind} broker at {broker.address}"
    if embedded == "always":
        target.notes.append(f"started an embedded {kind} broker on {broker.address}")
    elif configured:
        target.notes.append(
            f"configured {kind} broker at {shown} is unreachable: started an embedded "
            f"{kind} broker on {broker.address} instead (use --no-embedded to fail instead)"
        )
    else:
        target.notes.append(
            f"no {kind} broker configured or reachable at {shown}: started an embedded "
            f"{kind} broker on {broker.address}"
        )
    return target


def refuse_in_process(target: Target, command: str) -> None:
    """Stop a command that talks to other processes when the backend is ``memory``.

    The memory backend lives inside one process: what ``msight pub`` publishes
    there reaches nobody, and ``msight sub`` hears nothing. Exit code 2.

    Raises:
        CliError: ``target`` is the in-process memory backend.
    """
    if target.backend == "memory":
        raise CliError(
            f"`msight {command}` cannot use the memory backend: it only connects code "
            "inside one process, so nothing would reach or leave this command. Pick a "
            "broker with --backend redis|nats|kafka (or shm on one machine), or set "
            "MSIGHT_PUBSUB_BACKEND",
            code=2,
        )


# --------------------------------------------------------------------------- formatting

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": MiB, "g": 1024 * MiB}


def parse_size(text: str) -> int:
    """``"64K"``, ``"1M"``, ``"512"``, ``"1.5MB"`` -> bytes (binary units).

    Raises:
        ConfigError: not a size.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"not a size: {text!r} (examples: 1K, 256K, 4M)")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value < 1:
        raise ConfigError(f"size must be at least 1 byte, got {text!r}")
    return value


def parse_sizes(text: str) -> list[int]:
    """A comma-separated list of sizes, or a range ``1K..16M`` (powers of 4)."""
    if ".." in text:
        low_text, high_text = text.split("..", 1)
        low, high = parse_size(low_text), parse_size(high_text)
        if low > high:
            raise ConfigError(f"size range {text!r} goes downwards")
        sizes = []
        size = low
        while size < high:
            sizes.append(size)
            size *= 4
        sizes.append(high)
        return sizes
    sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise ConfigError("no sizes given")
    return sizes


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (binary units, short)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover - loop always returns


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; the first column left-aligned, the rest right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        return "  ".join(parts).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells[1:])
    return "\n".join(out)


def say(text: str, stream: TextIO | None = None) -> None:
    """Print a status line to stderr (results go to stdout)."""
    print(text, file=stream or sys.stderr, flush=True)
