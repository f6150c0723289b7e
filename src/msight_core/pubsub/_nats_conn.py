"""Connection plumbing for the NATS backend (not public API).

One :class:`LoopThread` per :class:`~msight_core.pubsub.nats.NATSPubSub` runs a
private asyncio event loop; the synchronous facade hands coroutines to it with
:meth:`LoopThread.run`. Client options (servers, auth, TLS, reconnect policy)
are built from :class:`~msight_core.config.NatsConfig` here, and nats-py
exceptions are translated into the msight error tree by :func:`translate`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..config import NatsConfig
from ..errors import (
    AuthenticationError,
    BrokerError,
    BrokerUnavailableError,
    ConfigError,
    MissingDependencyError,
    MsightError,
)

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.aio.client import RawCredentials
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError("nats-py", "nats") from exc

__all__ = ["LoopThread", "client_options", "nats", "safe_servers", "translate"]

logger = logging.getLogger("msight_core.pubsub.nats")

_T = TypeVar("_T")


class LoopThread:
    """A daemon thread running one asyncio event loop until :meth:`stop`."""

    def __init__(self, name: str = "msight-nats-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(
                        asyncio.wait(pending, timeout=1.0, return_when=asyncio.ALL_COMPLETED)
                    )
            except Exception:  # pragma: no cover - best effort at shutdown
                logger.debug("error while cancelling NATS tasks", exc_info=True)
            self.loop.close()

    @property
    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Schedule ``coro`` on the loop without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None, what: str) -> _T:
        """Run ``coro`` on the loop and wait for its result.

        Raises:
            BrokerUnavailableError: it did not finish within ``timeout`` seconds.
            MsightError: whatever :func:`translate` makes of the coroutine's error.
        """
        if self.in_loop:  # pragma: no cover - programming error guard
            coro.close()
            raise RuntimeError("LoopThread.run() called from the loop thread")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise BrokerUnavailableError(
                f"NATS did not answer ({what}) within {timeout:g}s"
            ) from None
        except MsightError:
            raise
        except Exception as exc:
            raise translate(exc, what) from exc

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (cancelling its tasks) and join the thread."""
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # already closed
            return
        if not self.in_loop:
            self._thread.join(timeout)


def translate(exc: BaseException, what: str) -> MsightError:
    """Map a nats-py (or socket) exception to the msight error tree.

    The text of nats-py errors never contains credentials; we still only use the
    exception's class name and the server's short error text.
    """
    if isinstance(exc, MsightError):
        return exc
    if isinstance(exc, nats.errors.AuthorizationError) or "authoriz" in str(exc).lower():
        return AuthenticationError(f"NATS refused the configured credentials ({what})")
    if isinstance(exc, nats.errors.InvalidUserCredentialsError):
        return AuthenticationError(f"NATS user credentials are invalid ({what})")
    tls_errors = (
        ssl.SSLError,
        nats.errors.SecureConnFailedError,
        nats.errors.SecureConnRequiredError,
    )
    if isinstance(exc, tls_errors):
        return BrokerUnavailableError(f"TLS with NATS failed ({what}): {type(exc).__name__}")
    if isinstance(exc, nats.js.errors.APIError):
        return BrokerError(f"NATS JetStream refused {what}: {exc.description or exc.code}")
    if isinstance(
        exc,
        (
            OSError,
            asyncio.TimeoutError,
            nats.errors.NoServersError,
            nats.errors.ConnectionClosedError,
            nats.errors.StaleConnectionError,
            nats.errors.NoRespondersError,
            nats.errors.TimeoutError,
            nats.js.errors.NoStreamResponseError,
        ),
    ):
        return BrokerUnavailableError(f"NATS unavailable ({what}): {type(exc).__name__}")
    return BrokerError(f"NATS error ({what}): {type(exc).__name__}")


def safe_servers(servers: tuple[str, ...]) -> str:
    """Server URLs for logs and errors, with any ``user:pass@`` removed."""
    shown = []
    for url in servers:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
        shown.append(f"{parts.scheme}://{host}{port}")
    return ", ".join(shown)


def _tls_context(config: NatsConfig) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=config.tls_ca_cert_file)
        if config.tls_cert_file:
            context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the NATS TLS files (MSIGHT_NATS_TLS_*): {type(exc).__name__}: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ) from None
    if not config.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def client_options(config: NatsConfig) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` (callbacks excluded).

    Raises:
        ConfigError: TLS files cannot be loaded, or auth settings conflict.
        MissingDependencyError: nkey/JWT auth without the ``nkeys`` package.
    """
    options: dict[str, Any] = {
        "servers": list(config.servers),
        "connect_timeout": config.connect_timeout,
        "reconnect_time_wait": config.reconnect_wait,
        # The first connect tries each server once; afterwards we reconnect forever.
        "max_reconnect_attempts": 1,
        "allow_reconnect": True,
        "ping_interval": 5,
        "max_outstanding_pings": 3,
        # Our writer bounds what it hands to nats-py and flushes it itself
        # (_nats_pub.Publisher._emit): nats-py must never flush in the middle.
        "pending_size": 1 << 30,
        "flush_timeout": max(config.publish.timeout, 1.0),
        "drain_timeout": max(int(config.publish.timeout), 1),
    }
    if config.name:
        options["name"] = config.name
    if config.username is not None:
        options["user"] = config.username
        options["password"] = config.password.reveal() if config.password else ""
    if config.token is not None:
        options["token"] = config.token.reveal()
    needs_nkeys = bool(config.nkey_seed or config.user_jwt or config.user_credentials)
    if needs_nkeys:
        try:
            import nkeys  # noqa: F401
        except ImportError:
            raise MissingDependencyError("nkeys", "nats") from None
    if config.user_jwt is not None:
        if config.nkey_seed is None:
            raise ConfigError("MSIGHT_NATS_USER_JWT needs MSIGHT_NATS_NKEY_SEED to sign with")
        options["user_credentials"] = RawCredentials(
            "-----BEGIN NATS USER JWT-----\n"
            f"{config.user_jwt.reveal()}\n"
            "------END NATS USER JWT------\n\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{config.nkey_seed.reveal()}\n"
            "------END USER NKEY SEED------\n"
        )
    elif config.user_credentials is not None:
        options["user_credentials"] = config.user_credentials
    elif config.nkey_seed is not None:
        options["nkeys_seed_str"] = config.nkey_seed.reveal()
    tls_wanted = config.use_tls or any(s.startswith("tls://") for s in config.servers)
    if tls_wanted or config.tls_ca_cert_file or config.tls_cert_file:
        options["tls"] = _tls_context(config)
        host = urlsplit(config.servers[0] if "://" in config.servers[0] else "").hostname
        if host:
            options["tls_hostname"] = host
    return options
