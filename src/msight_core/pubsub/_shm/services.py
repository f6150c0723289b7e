"""One iceoryx2 node per backend instance, the services it opens and their names.

Service names (all under the domain, ``MSIGHT_SHM_DOMAIN``)::

    <domain>/<topic>                    broadcast: pub/sub + event service
    <domain>/<topic>/g                  group registry: an event service whose
                                        listeners are the topic's group members
    <domain>/<topic>/g/<group>/<member> one group member: pub/sub + event service

``<group>`` is a hash of the ``group_id``; ``<member>`` is random. A topic name
too long for iceoryx2's 255-character service names is shortened with a hash.
Each service is opened with the same settings (from :class:`ShmConfig`);
another process with other ``MSIGHT_SHM_*`` values cannot open it and gets a
:class:`~msight_core.errors.ConfigError` saying so.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
from typing import Any

from ...config import ShmConfig
from ...errors import BrokerUnavailableError, ConfigError
from . import internals

__all__ = ["Runtime", "base_name", "group_key", "member_name", "registry_name"]

logger = logging.getLogger("msight_core.pubsub.shm")

SHM_DIR = "/dev/shm"
_MAX_NAME = 255
_LIMIT_REASONS = ("ExceedsMaxSupported", "DoesNotSupportRequested")


def base_name(domain: str, topic: str) -> str:
    """Name of the topic's broadcast services, short enough for every derived name."""
    name = f"{domain}/{topic}"
    if len(name) > 160:
        digest = hashlib.sha1(topic.encode()).hexdigest()[:24]
        name = f"{domain}/{topic[:100]}~{digest}"
    return name


def group_key(group_id: str) -> str:
    return hashlib.sha1(group_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def registry_name(base: str) -> str:
    return f"{base}/g"


def member_name(base: str, group: str, member: str) -> str:
    return f"{base}/g/{group}/{member}"


class Runtime:
    """The iceoryx2 node of one backend instance and the services it holds open.

    Thread-safe. Services are opened once and shared by the publishers and
    subscribers of the instance; ``close()`` releases them and the node.
    """

    def __init__(self, config: ShmConfig) -> None:
        self.config = config
        self.iox = iox = internals.load()
        self.iox_config, self.prefixed = internals.make_config(iox, config.domain)
        self.payload = iox.Slice[ctypes.c_uint8]
        self._lock = threading.RLock()
        self._services: dict[tuple[str, str], Any] = {}
        try:
            self.node = internals.create_node(iox, self.iox_config, f"msight.{os.getpid()}")
        except Exception as exc:  # translated at the boundary
            raise BrokerUnavailableError(
                f"cannot create an iceoryx2 node in shm domain {config.domain!r}: "
                f"{internals.error_reason(exc)}"
            ) from exc

    # -- services ---------------------------------------------------------------------

    def pubsub(self, name: str, subscribers: int) -> Any:
        """The pub/sub service ``name`` (created if absent) for ``subscribers`` ports."""
        key = (name, "pubsub")
        with self._lock:
            service = self._services.get(key)
            if service is None:
                cfg = self.config
                builder = (
                    self.node.service_builder(self._service_name(name))
                    .publish_subscribe(self.payload)
                    .max_subscribers(subscribers)
                    .max_publishers(cfg.max_publishers)
                    .max_nodes(subscribers + cfg.max_publishers + 2)
                    .subscriber_max_buffer_size(cfg.buffer_depth)
                    .subscriber_max_borrowed_samples(cfg.max_views + 1)
                    .history_size(0)
                    .enable_safe_overflow(True)
                )
                service = self._open(builder, name, "pub/sub")
                self._services[key] = service
            return service

    def event(self, name: str, listeners: int, notifiers: int) -> Any:
        """The event service ``name`` (created if absent)."""
        key = (name, "event")
        with self._lock:
            service = self._services.get(key)
            if service is None:
                builder = (
                    self.node.service_builder(self._service_name(name))
                    .event()
                    .max_listeners(listeners)
                    .max_notifiers(notifiers)
                    .max_nodes(listeners + notifiers + 2)
                )
                service = self._open(builder, name, "event")
                self._services[key] = service
            return service

    def forget(self, name: str) -> None:
        """Stop holding the services named ``name`` open (their ports are closed)."""
        with self._lock:
            self._services.pop((name, "pubsub"), None)
            self._services.pop((name, "event"), None)

    def _service_name(self, name: str) -> Any:
        if len(name) > _MAX_NAME:  # pragma: no cover - base_name keeps names short
            raise ConfigError(f"shm service name too long: {name[:60]}...")
        return self.iox.ServiceName.new(name)

    def _open(self, builder: Any, name: str, kind: str) -> Any:
        try:
            return builder.open_or_create()
        except Exception as first:  # translated below
            reason = internals.error_reason(first)
            if "DoesNotSupportRequested" in reason or "Incompatible" in reason:
                raise ConfigError(
                    f"shm {kind} service {name!r} exists with other settings ({reason}): "
                    "every process of a domain must use the same MSIGHT_SHM_* values"
                ) from first
            # A dead process may still hold it: clean up once and retry.
            self.cleanup_dead_nodes()
            try:
                return builder.open_or_create()
            except Exception as exc:
                raise BrokerUnavailableError(
                    f"cannot open shm {kind} service {name!r}: {internals.error_reason(exc)}"
                ) from exc

    def create_port(self, create: Any, what: str, limit_var: str) -> Any:
        """``create()`` a port; after a dead-node cleanup, once more if full.

        Raises:
            ConfigError: the service has no room for another port of this kind.
            BrokerUnavailableError: iceoryx2 refused for another reason.
        """
        for attempt in (1, 2):
            try:
                return create()
            except Exception as exc:  # translated below
                reason = internals.error_reason(exc)
                if attempt == 1:
                    self.cleanup_dead_nodes()
                    continue
                if any(r in reason for r in _LIMIT_REASONS):
                    raise ConfigError(
                        f"cannot create a {what}: {reason}; raise {limit_var} "
                        "(the same value in every process of the domain)"
                    ) from exc
                raise BrokerUnavailableError(f"cannot create a {what}: {reason}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- discovery and housekeeping ----------------------------------------------------

    def service_names(self, prefix: str) -> list[str]:
        """Names of the pub/sub services of the domain starting with ``prefix``."""
        iox = self.iox
        try:
            found = iox.Service.list(self.iox_config, iox.ServiceType.Ipc)
        except Exception:  # discovery is retried on the next refresh
            logger.debug("listing shm services failed", exc_info=True)
            return []
        pattern = iox.MessagingPattern.PublishSubscribe
        names = []
        for details in found:
            try:
                if details.messaging_pattern() != pattern:
                    continue
                name = details.name().to_string()
            except Exception:  # a service vanishing while listed
                logger.debug("listing: a service vanished", exc_info=True)
                continue
            if name.startswith(prefix):
                names.append(name)
        return names

    def cleanup_dead_nodes(self) -> None:
        """Remove what processes that died (SIGKILL) left behind. Never raises."""
        try:
            self.node.try_cleanup_dead_nodes()
        except Exception:  # best effort
            logger.debug("dead node cleanup failed", exc_info=True)

    def check_space(self, need: int, what: str) -> None:
        """Raise :class:`ConfigError` if ``/dev/shm`` has less than ``need`` bytes free."""
        try:
            st = os.statvfs(SHM_DIR)
        except OSError:  # no /dev/shm (not Linux): iceoryx2 reports its own errors
            return
        free = st.f_bavail * st.f_frsize
        if need > free:
            cfg = self.config
            raise ConfigError(
                f"{what} needs up to {need / 2**20:.0f} MiB of {SHM_DIR} "
                f"(MSIGHT_SHM_MAX_FRAME_BYTES={cfg.max_frame_bytes} x up to "
                f"{need // (cfg.max_frame_bytes + 4096)} frames in flight), but only "
                f"{free / 2**20:.0f} MiB are free. Give the container more (docker run "
                "--shm-size=2g) or lower MSIGHT_SHM_MAX_FRAME_BYTES, MSIGHT_SHM_MAX_SUBSCRIBERS, "
                "MSIGHT_SHM_BUFFER_DEPTH or MSIGHT_SHM_MAX_VIEWS"
            )

    def close(self) -> None:
        """Release the services and the node (after every port was deleted)."""
        with self._lock:
            self._services.clear()
            node, self.node = self.node, None
        if node is not None:
            try:
                node.delete()
            except Exception:  # closing goes on
                logger.debug("deleting the iceoryx2 node failed", exc_info=True)
