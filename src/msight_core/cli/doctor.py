"""``msight doctor``: resolved configuration, connection check, broker limits.

Secrets are never printed: the configuration is rendered from the config
dataclasses, whose :class:`~msight_core.config.Secret` fields print ``***``, and
error messages from the backends carry no credentials.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping
from enum import Enum
from typing import Any, TextIO

from ..config import (
    Secret,
    backend_name,
    kafka_client_conf,
    load_kafka_config,
    load_nats_config,
    load_queue_config,
    load_redis_config,
    load_shm_config,
    mask_url,
    masked,
)
from ..errors import ConfigError, MsightError
from ..pubsub import get_pubsub
from .common import base_env, broker_addresses, fmt_bytes

__all__ = ["render_config", "run_doctor"]

MiB = 1024 * 1024
_FRAME = 16 * MiB  # the largest camera frame we plan for


def run_doctor(backend: str | None, timeout: float, out: TextIO) -> int:
    """Print the checks to ``out``; return 0 when the broker answered a round trip."""
    env = base_env()
    if backend is not None:
        env["MSIGHT_PUBSUB_BACKEND"] = backend
    w = out.write
    try:
        kind = backend_name(env)
        config = _load(kind, env)
    except ConfigError as exc:
        w(f"configuration: ERROR {exc}\n\nverdict: FAIL - fix the configuration above\n")
        return 1
    w(f"backend: {kind}" + (" (MSIGHT_PUBSUB_BACKEND unset: default)" if
      "MSIGHT_PUBSUB_BACKEND" not in env else "") + "\n")  # fmt: skip
    w("\nconfiguration:\n")
    for key, value in render_config(config):
        w(f"  {key:<28} {value}\n")
    if kind == "memory":
        w("\nverdict: OK - the memory backend needs no broker (in-process only)\n")
        return 0
    if kind == "shm":
        return _shm_verdict(config, w)

    w("\nconnection:\n")
    addresses = broker_addresses(kind, env)
    any_open = False
    for host, port in addresses:
        started = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=min(timeout, 3.0)):
                any_open = True
                ms = (time.perf_counter() - started) * 1e3
                w(f"  tcp {host}:{port:<6} open ({ms:.1f} ms)\n")
        except OSError as exc:
            w(f"  tcp {host}:{port:<6} FAILED: {exc.strerror or type(exc).__name__}\n")
    shown = ", ".join(f"{h}:{p}" for h, p in addresses)
    if not any_open:
        w(
            f"\nverdict: FAIL - no {kind} broker reachable at {shown}. Start one "
            f"(`msight broker {kind}` for development) or fix the MSIGHT_* settings.\n"
        )
        return 1
    ok, detail = _round_trip(env, timeout)
    w(f"  publish/subscribe round trip: {detail}\n")

    w("\nbroker limits for frames:\n")
    try:
        for line in _LIMITS[kind](config, env, timeout):
            w(f"  {line}\n")
    except Exception as exc:  # noqa: BLE001 - limits are advisory; report and go on
        w(f"  not available: {type(exc).__name__}: {_clean(exc)}\n")

    if ok:
        w(f"\nverdict: OK - the {kind} broker at {shown} works with these settings\n")
        return 0
    reason = detail.removeprefix("FAILED: ")
    w(f"\nverdict: FAIL - the {kind} broker at {shown} is reachable, but: {reason}\n")
    return 1


def _load(kind: str, env: Mapping[str, str]) -> Any:
    if kind == "redis":
        return load_redis_config(env)
    if kind == "nats":
        return load_nats_config(env=env)
    if kind == "kafka":
        return load_kafka_config(env=env)
    if kind == "shm":
        return load_shm_config(env)
    return load_queue_config(env)


def _shm_verdict(config: Any, w: Any) -> int:
    """No broker: say whether /dev/shm holds what one publisher of a topic may use."""
    need = config.segment_bound()
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        w("\nverdict: FAIL - no /dev/shm on this system\n")
        return 1
    free = st.f_bavail * st.f_frsize
    w(f"\nshared memory:\n  /dev/shm free {free / 2**20:.0f} MiB, one publisher of a topic "
      f"may use up to {need / 2**20:.0f} MiB\n")  # fmt: skip
    if need > free:
        w("\nverdict: FAIL - /dev/shm is too small (docker run --shm-size, or lower "
          "MSIGHT_SHM_MAX_FRAME_BYTES / MSIGHT_SHM_MAX_SUBSCRIBERS)\n")  # fmt: skip
        return 1
    w("\nverdict: OK - the shm backend needs no broker (processes of this host and user)\n")
    return 0


def render_config(config: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(name, shown value)`` for every field; secrets as ``***``, nested flattened."""
    rows: list[tuple[str, str]] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        name = prefix + f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            rows.extend(render_config(value, name + "."))
        elif isinstance(value, Mapping):
            if not value:
                rows.append((name, "{}"))
            for key in sorted(value):
                rows.append((f"{name}[{key}]", _shown(masked(value[key], str(key)))))
        else:
            rows.append((name, _shown(value)))
    return rows


def _shown(value: Any) -> str:
    if isinstance(value, Secret) or value == "***":
        return "*** (set)"
    if value is None:
        return "-"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return ", ".join(mask_url(str(v)) for v in value) or "-"
    return mask_url(str(value))


def _clean(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _round_trip(env: Mapping[str, str], timeout: float) -> tuple[bool, str]:
    topic = f"msight.doctor.{uuid.uuid4().hex[:12]}"
    payload = b"msight doctor " + uuid.uuid4().hex.encode()
    started = time.perf_counter()
    try:
        with get_pubsub(env=env) as backend:
            backend.subscribe(topic)
            sent = time.perf_counter()
            backend.publish(topic, payload)
            backend.flush(timeout)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                message = backend.receive(max(deadline - time.monotonic(), 0.01))  # type: ignore[attr-defined]
                if message is not None and message.data == payload:
                    ms = (time.perf_counter() - sent) * 1e3
                    setup = (sent - started) * 1e3
                    return True, f"OK ({ms:.1f} ms; connect and subscribe {setup:.0f} ms)"
            return False, f"FAILED: the test message did not come back within {timeout:g}s"
    except MsightError as exc:
        return False, f"FAILED: {type(exc).__name__}: {_clean(exc)}"


# --------------------------------------------------------------------------- limits


def _redis_limits(config: Any, env: Mapping[str, str], timeout: float) -> list[str]:
    from ..utils import get_redis_client

    client = get_redis_client(env=env, socket_timeout=timeout)
    try:
        import redis

        lines = []
        try:
            info = client.info("server")
            lines.append(f"server: {info.get('redis_version', '?')}")
        except redis.RedisError as exc:
            lines.append(f"server version not available ({_clean(exc)})")
        try:
            raw = client.config_get("client-output-buffer-limit")
        except redis.RedisError as exc:
            return [*lines, f"client-output-buffer-limit not readable ({_clean(exc)})"]
        text = raw.get("client-output-buffer-limit", "")
        parts = text.split()
        limits = {parts[i]: parts[i + 1 : i + 4] for i in range(0, len(parts) - 3, 4)}
        pubsub = limits.get("pubsub")
        if not pubsub:
            return [*lines, f"client-output-buffer-limit: {text or '?'}"]
        hard, soft, secs = (int(v) for v in pubsub)
        lines.append(
            f"pubsub output buffer: hard {fmt_bytes(hard) if hard else 'none'}, soft "
            f"{fmt_bytes(soft) if soft else 'none'} for {secs}s"
        )
        if hard and hard < 4 * _FRAME:
            lines.append(
                f"  note: a subscriber more than {fmt_bytes(hard)} behind is disconnected "
                "and loses its backlog; msight drains the socket on its own thread, but for "
                "16 MB frames consider: CONFIG SET client-output-buffer-limit "
                "'pubsub 256mb 128mb 60'"
            )
        return lines
    finally:
        client.close()


def _nats_limits(config: Any, env: Mapping[str, str], timeout: float) -> list[str]:
    host, port = broker_addresses("nats", env)[0]
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        data = b""
        while b"\r\n" not in data and len(data) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    line = data.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        return [f"unexpected greeting from {host}:{port}: {line[:60]!r}"]
    info = json.loads(line[5:])
    max_payload = int(info.get("max_payload", 0))
    js = bool(info.get("jetstream"))
    lines = [
        (
            f"server: nats-server {info.get('version', '?')} at {host}:{port} "
            f"(JetStream {'on' if js else 'off'}, auth "
            f"{'required' if info.get('auth_required') else 'not required'}, TLS "
            f"{'required' if info.get('tls_required') else 'not required'})"
        ),
        f"max_payload: {fmt_bytes(max_payload)} ({max_payload} bytes)",
    ]
    if max_payload < _FRAME:
        if js:
            lines.append(
                f"  note: frames above {fmt_bytes(max_payload)} travel as JetStream chunks "
                "(slower); set max_payload: 64MB in nats-server.conf to send them whole"
            )
        else:
            lines.append(
                f"  note: frames above {fmt_bytes(max_payload)} are refused "
                "(PayloadTooLargeError): raise max_payload (up to 64MB) or enable JetStream"
            )
    return lines


def _kafka_limits(config: Any, env: Mapping[str, str], timeout: float) -> list[str]:
    try:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient, ConfigResource
    except ImportError:
        return ["not available: pip install 'msight-core[kafka]'"]
    created = fmt_bytes(config.max_message_bytes)
    lines = [
        f"max.message.bytes of topics msight creates: {created} (MSIGHT_KAFKA_MAX_MESSAGE_BYTES)"
    ]
    # A logger keeps librdkafka's own lines off stderr (it is never polled here).
    admin = AdminClient({**kafka_client_conf(config), "logger": logging.getLogger(__name__)})
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        return [*lines, f"cluster metadata not available ({_clean(exc)})"]
    brokers = sorted(metadata.brokers)
    lines.append(f"brokers: {', '.join(str(metadata.brokers[b]) for b in brokers)}")
    if brokers:
        resource = ConfigResource("broker", str(brokers[0]))
        try:
            entries = admin.describe_configs([resource], request_timeout=timeout)[resource].result(
                timeout + 1
            )
            entry = entries.get("message.max.bytes")
            value = getattr(entry, "value", None)
            if value is not None:
                lines.append(f"broker message.max.bytes: {fmt_bytes(int(value))} ({value})")
            else:
                lines.append("broker message.max.bytes: not reported")
        except Exception as exc:  # noqa: BLE001 - some brokers do not implement DescribeConfigs
            lines.append(f"broker message.max.bytes: not available ({_clean(exc)})")
    lines.append(
        "  note: msight splits frames above a topic's max.message.bytes into chunks, "
        "so existing topics with the 1 MB default still carry them"
    )
    return lines


_LIMITS = {"redis": _redis_limits, "nats": _nats_limits, "kafka": _kafka_limits}
