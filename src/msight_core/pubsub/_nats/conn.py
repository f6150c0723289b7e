"""Connection plumbing of the NATS backend (not public API).

:class:`LoopThread` runs one private asyncio event loop on a daemon thread; the
synchronous backend hands coroutines to it with :meth:`LoopThread.run` (the
asyncio backend awaits them on its own loop: :func:`run_here`). :class:`Connection`
owns the nats-py client: connect, callbacks (errors, disconnects, reconnects),
reconnect bookkeeping, close; it tells the backend what happened through
:class:`Listeners`. :func:`client_options` turns a ``NatsConfig`` into ``connect()``
arguments (via ``config.nats_connect_options``); :func:`translate` maps nats-py
exceptions to the msight error tree.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

import nats  # without nats-py, the package's __init__ raised the hint already
import nats.errors
import nats.js.errors
from nats.aio.client import RawCredentials

from ...config import NatsConfig, nats_connect_options
from ...errors import (
    AuthenticationError,
    BrokerError,
    BrokerUnavailableError,
    ClosedError,
    MissingDependencyError,
    MsightError,
)
from . import internals
from .listeners import Listeners

__all__ = [
    "Connection",
    "Listeners",
    "LoopThread",
    "client_options",
    "nats",
    "run_here",
    "safe_servers",
    "translate",
]

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


async def run_here(coro: Coroutine[Any, Any, _T], timeout: float | None, what: str) -> _T:
    """:meth:`LoopThread.run` for the running loop (the asyncio backend): awaits."""
    try:
        return await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        raise BrokerUnavailableError(f"NATS did not answer ({what}) within {timeout:g}s") from None
    except MsightError:
        raise
    except Exception as exc:
        raise translate(exc, what) from exc


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
        why = exc.description or exc.code or "no answer (is JetStream enabled on the server?)"
        return BrokerError(f"NATS JetStream refused to {what}: {why}")
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


def client_options(config: NatsConfig) -> dict[str, Any]:
    """Keyword arguments for nats-py's ``connect()`` (callbacks excluded).

    Raises:
        ConfigError: TLS files cannot be loaded, or auth settings conflict.
        MissingDependencyError: nkey/JWT auth without the ``nkeys`` package.
    """
    if config.nkey_seed or config.user_jwt or config.user_credentials:
        try:
            import nkeys  # noqa: F401
        except ImportError:
            raise MissingDependencyError("nkeys", "nats") from None
    options = nats_connect_options(config)
    inline = options.get("user_credentials")
    if inline is not None and not isinstance(inline, str):
        options["user_credentials"] = RawCredentials(str(inline))  # nats-py's own type for it
    return options


class Connection:
    """One nats-py client on its own event loop thread, made on first use."""

    def __init__(self, config: NatsConfig, options: dict[str, Any]) -> None:
        self.config = config
        self.where = safe_servers(config.servers)
        self._options = options
        self._lock = threading.Lock()
        self._thread: LoopThread | None = None
        self.client: Any = None
        """The connected nats-py client; ``None`` before the first connect."""
        self.max_payload = 1024 * 1024
        self.jetstream_available = False
        self.reconnects = 0
        self.slow_consumer_drops = 0
        self.outage_seconds = 0.0
        self._listeners: Listeners | None = None
        self._lost_at: float | None = None
        self._connect_error: BaseException | None = None
        self._connect_failures = 0
        self._give_up: asyncio.Event | None = None
        self._closing = False
        self._opening: asyncio.Lock | None = None  # open_here(): one connect at a time
        self._made: Any = None  # the client of the connect under way

    def current(self) -> Any:
        """The nats-py client (``None`` before the first connect)."""
        return self.client

    def describe(self) -> str:
        """The connection's state in words, for logs and errors."""
        nc = self.client
        if nc is None:
            return "not connected"
        if nc.is_connected:
            return "connected"
        if self._lost_at is not None:
            return f"disconnected for {time.monotonic() - self._lost_at:.1f}s"
        return "disconnected"

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None, what: str) -> _T:
        """:meth:`LoopThread.run` on this connection's loop (connected before)."""
        assert self._thread is not None, "run() before open()"
        return self._thread.run(coro, timeout, what)

    # -- connect ----------------------------------------------------------------------

    def open(self, listeners: Listeners) -> bool:
        """Connect unless connected; blocks. Returns ``True`` if this call connected.

        Raises:
            BrokerUnavailableError: no server could be reached.
            AuthenticationError: the server refused the credentials.
        """
        if self.client is not None:
            return False
        with self._lock:
            if self.client is not None:
                return False
            self._listeners = listeners
            thread = LoopThread()
            self._thread = thread
            budget = self.config.connect_timeout * (len(self.config.servers) + 1) + 2
            try:
                thread.run(self._connect(listeners), budget, f"connect to {self.where}")
            except MsightError as exc:
                thread.stop()
                self._thread = None
                if isinstance(exc, AuthenticationError):
                    raise
                raise type(exc)(f"{exc} (servers: {self.where})") from None
        return True

    async def open_here(self, listeners: Listeners) -> bool:
        """:meth:`open` on the running loop, which the client then runs on (the
        asyncio backend): no thread. Awaits; raises as :meth:`open`."""
        if self.client is not None:
            return False
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self.client is not None:
                return False
            self._listeners = listeners
            budget = self.config.connect_timeout * (len(self.config.servers) + 1) + 2
            try:
                await run_here(self._connect(listeners), budget, f"connect to {self.where}")
            except BaseException as exc:
                made, self._made = self._made, None
                if made is not None:  # nothing of a failed connect stays on the loop
                    with contextlib.suppress(Exception):
                        await made.close()
                if not isinstance(exc, MsightError) or isinstance(exc, AuthenticationError):
                    raise
                raise type(exc)(f"{exc} (servers: {self.where})") from None
            if self._closing:  # closed while connecting: what was made does not stay
                with contextlib.suppress(Exception):
                    await run_here(self.client.close(), self.config.connect_timeout, "close")
                raise ClosedError("the NATS backend was closed while connecting")
        return True

    async def close_here(self, timeout: float) -> None:
        """:meth:`close` for a client on the running loop (see :meth:`open_here`)."""
        self._closing = True
        with contextlib.suppress(MsightError):
            if self.client is not None:
                await run_here(self.client.close(), timeout, "close")

    async def _connect(self, listeners: Listeners) -> None:
        nc = self._made = nats.aio.client.Client()
        listeners.created(nc)
        options = dict(self._options)
        lift_later = internals.can_lift_reconnect_limit(nc)
        self._connect_failures = 0
        self._give_up = None
        if not lift_later:
            # Public path: nats-py reconnects forever from the start; the first
            # connect still gives up once every server failed (see _on_error).
            options["max_reconnect_attempts"] = -1
            self._give_up = asyncio.Event()
        try:
            connecting = nc.connect(
                **options,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                closed_cb=self._on_closed,
            )
            if self._give_up is None:
                await connecting
            else:
                await self._first_round(nc, connecting, self._give_up)
        except Exception as exc:  # noqa: BLE001 - translated just below
            # nats-py reports "no servers" after trying them all; the reason (refused
            # credentials, say) went to the error callback.
            cause = self._connect_error if isinstance(exc, nats.errors.NoServersError) else exc
            raise translate(cause or exc, f"connect to {self.where}") from None
        self._give_up = None
        if lift_later:
            internals.lift_reconnect_limit(nc)  # from now on: reconnect forever
        self.max_payload = int(nc.max_payload)
        known = internals.server_jetstream(nc)
        self.jetstream_available = await self._ask_jetstream(nc) if known is None else known
        self.client = nc
        self._made = None
        listeners.connected(nc)

    @staticmethod
    async def _first_round(nc: Any, connecting: Coroutine[Any, Any, Any], give_up: Any) -> None:
        task = asyncio.ensure_future(connecting)
        waiter = asyncio.ensure_future(give_up.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()
            return
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        with contextlib.suppress(Exception):
            await nc.close()
        raise nats.errors.NoServersError

    async def _ask_jetstream(self, nc: Any) -> bool:
        """Public path: whether the server answers JetStream requests for us."""
        try:
            await nc.jsm(timeout=self.config.connect_timeout).account_info()
        except Exception as exc:  # noqa: BLE001 - no JetStream, or none for this account
            logger.debug("no JetStream at %s: %s", self.where, type(exc).__name__)
            return False
        return True

    async def _refresh_jetstream(self, nc: Any) -> None:
        self.jetstream_available = await self._ask_jetstream(nc)

    # -- nats-py's callbacks ------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            self.slow_consumer_drops += 1
            if self._listeners is not None:
                self._listeners.dropped(exc.sid)  # dropped: the callback will not see it
            if self.slow_consumer_drops == 1 or self.slow_consumer_drops % 1000 == 0:
                logger.warning(
                    "NATS slow consumer: dropped %d message(s) so far (last on %r)",
                    self.slow_consumer_drops,
                    exc.subject,
                )
            return
        if self.client is None:  # still connecting: the caller gets the error
            previous = self._connect_error
            if previous is None or not isinstance(translate(previous, ""), AuthenticationError):
                self._connect_error = exc  # a refusal outranks the reset that follows it
            self._connect_failures += 1
            if self._give_up is not None and self._connect_failures >= len(self.config.servers):
                self._give_up.set()
            return
        if self._lost_at is not None or self._closing:
            logger.debug("NATS error while disconnected: %s", type(exc).__name__)
            return
        if isinstance(exc, nats.errors.AuthorizationError) or "authoriz" in str(exc).lower():
            logger.error("NATS at %s refused the credentials", self.where)
        elif "permissions violation" in str(exc).lower() and self._listeners is not None:
            self._listeners.refused(str(exc))
        else:
            logger.debug("NATS error: %s", type(exc).__name__)

    async def _on_disconnected(self) -> None:
        if self._closing or self._lost_at is not None:
            return
        self._lost_at = time.monotonic()
        self.reconnects += 1
        at_risk = self._listeners.lost() if self._listeners is not None else 0
        jetstream = self.config.jetstream
        logger.warning(
            "lost NATS at %s; reconnecting every %gs. Publishes wait in a buffer of up "
            "to %d bytes; %s",
            self.where,
            self.config.reconnect_wait,
            self.config.publish.buffer_bytes,
            "unacknowledged JetStream messages will be resent"
            if jetstream
            else f"{at_risk} message(s) sent just before may be lost, and messages "
            "published meanwhile by others are lost (NATS is best-effort)",
        )

    async def _on_reconnected(self) -> None:
        nc = self.client
        if nc is not None:
            self.max_payload = int(nc.max_payload)
            known = internals.server_jetstream(nc)
            if known is None:
                # Not here: a request from this callback would hold up nats-py's reconnect.
                asyncio.ensure_future(self._refresh_jetstream(nc))
            else:
                self.jetstream_available = known
        outage = 0.0
        if self._lost_at is not None:
            outage = time.monotonic() - self._lost_at
            self.outage_seconds += outage
            self._lost_at = None
        listeners = self._listeners
        backlog = listeners.restored() if listeners is not None else 0
        topics = ", ".join(listeners.topics()) if listeners is not None else ""
        logger.warning(
            "reconnected to NATS at %s after %.2fs; subscriptions restored: %s%s",
            self.where,
            outage,
            topics or "none",
            f"; sending {backlog} buffered message(s), which subscribers that are not back yet miss"
            if backlog
            else "",
        )

    async def _on_closed(self) -> None:
        if not self._closing:
            exc = BrokerUnavailableError(f"the NATS connection to {self.where} closed")
            logger.error("%s; no more messages will arrive", exc)
            if self._listeners is not None:
                self._listeners.closed(exc)

    # -- close -------------------------------------------------------------------------

    def begin_close(self) -> None:
        """From now on a disconnect or close is ours: not reported as a loss."""
        self._closing = True

    def close(self, timeout: float) -> None:
        """Close the client (bounded by ``timeout``) and stop the loop thread."""
        thread = self._thread
        if thread is None:
            return
        self._closing = True
        try:
            if self.client is not None:
                thread.run(self.client.close(), timeout, "close")
        except MsightError:
            logger.debug("closing the NATS connection failed", exc_info=True)
        finally:
            thread.stop()
