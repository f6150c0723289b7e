"""Every iceoryx2 detail the shm backend relies on beyond its documented examples.

The backend uses iceoryx2's public Python API (``Node``, ``ServiceBuilder``,
``Publisher.loan_slice_uninit``, ``Subscriber.receive``, ``WaitSet``, ...) and,
where a call sits on the hot path or a setting is not reachable otherwise, the
few pieces listed here. Each is looked up once; when it is missing, or when
:data:`FORCE_PUBLIC` is set, the public path is taken instead. Which path each
feature takes is logged once at DEBUG on ``msight_core.pubsub.shm``.

================  ============================================  ==========================
feature           iceoryx2 detail                               fallback
================  ============================================  ==========================
loan              ``Publisher.__loan_slice_uninit`` (the        ``loan_slice_uninit``,
                  binding under the extension's typing check)   which checks the payload
                                                                type on every call
init              ``SampleMutUninit.__assume_init``             ``assume_init()``
domain            ``config.global_cfg.prefix`` setter (files    the global config: the
                  named ``<domain>_*``)                         domain still prefixes
                                                                every service name
signals           ``SignalHandlingMode.Disabled`` (iceoryx2     iceoryx2's default
                  must not take SIGINT/SIGTERM from Python)
error reasons     the text of ``LoanError('ExceedsMaxLoans')``  the exception class name
                  and friends (``exc.args[0]``)
================  ============================================  ==========================

``Sample.payload_ptr`` and ``header.number_of_elements`` are the attributes
iceoryx2's own ``payload()`` is built on; they are used as public API. A sample
must never be touched after ``delete()``: iceoryx2 aborts the process (a Rust
panic), so every holder here tracks whether it released its sample.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ...errors import MissingDependencyError

__all__ = [
    "FORCE_PUBLIC",
    "assume_init",
    "create_node",
    "error_reason",
    "load",
    "loaner",
    "make_config",
    "signals_off",
]

logger = logging.getLogger("msight_core.pubsub.shm")

#: Take the public path everywhere. Read when a backend is set up, so a test
#: sets it before creating one.
FORCE_PUBLIC = False

_announced: dict[str, bool] = {}
_module: Any = None


def _path(feature: str, private: bool) -> bool:
    """Log at DEBUG, once per path, which path ``feature`` takes; return ``private``."""
    if _announced.get(feature) is not private:
        _announced[feature] = private
        logger.debug("iceoryx2 %s: %s", feature, "binding detail" if private else "public API")
    return private


def load() -> Any:
    """Import iceoryx2 once and quiet its logger (errors only, unless IOX2_LOG_LEVEL says).

    Raises:
        MissingDependencyError: the ``shm`` extra is not installed.
    """
    global _module
    if _module is None:
        try:
            import iceoryx2
        except ImportError as exc:
            raise MissingDependencyError("iceoryx2", "shm") from exc
        try:
            iceoryx2.set_log_level_from_env_or(iceoryx2.LogLevel.Error)
        except Exception:  # logging set-up is cosmetic
            logger.debug("could not set the iceoryx2 log level", exc_info=True)
        _module = iceoryx2
    return _module


def make_config(iox: Any, domain: str) -> tuple[Any, bool]:
    """An iceoryx2 config whose files are named ``<domain>_*``; ``(config, prefixed)``."""
    config = iox.config.default()
    if not FORCE_PUBLIC:
        try:
            config.global_cfg.prefix = iox.FileName.new(f"{domain}_")
            return config, _path("domain", True)
        except Exception:  # an iceoryx2 without the setter
            logger.debug("iceoryx2 config prefix not settable", exc_info=True)
    _path("domain", False)
    return iox.config.global_config(), False


def signals_off(iox: Any, builder: Any) -> Any:
    """``builder`` with iceoryx2's own signal handling off (Python keeps SIGINT)."""
    mode = getattr(getattr(iox, "SignalHandlingMode", None), "Disabled", None)
    if mode is None or not hasattr(builder, "signal_handling_mode"):
        _path("signals", False)
        return builder
    _path("signals", True)
    return builder.signal_handling_mode(mode)


def create_node(iox: Any, config: Any, name: str) -> Any:
    """A node named ``name`` under ``config``, iceoryx2's signal handling off."""
    builder = iox.NodeBuilder.new().config(config)
    try:
        builder = builder.name(iox.NodeName.new(name[:100]))
    except Exception:  # a name is only for humans listing nodes
        logger.debug("node name %r refused", name, exc_info=True)
    return signals_off(iox, builder).create(iox.ServiceType.Ipc)


def loaner(iox: Any, publisher: Any) -> Callable[[int], Any]:
    """``loan(n)`` for ``publisher``: a ``SampleMutUninit`` of ``n`` bytes.

    The extension's ``loan_slice_uninit`` re-checks the payload type on every call;
    the binding under it does the same work without that check.
    """
    raw = None if FORCE_PUBLIC else getattr(iox.Publisher, "__loan_slice_uninit", None)
    if _path("loan", callable(raw)):
        return lambda n: raw(publisher, n)  # type: ignore[misc]
    return publisher.loan_slice_uninit  # type: ignore[no-any-return]


def assume_init(iox: Any) -> Callable[[Any], Any]:
    """``init(sample_uninit) -> SampleMut`` (the payload was written)."""
    raw = None if FORCE_PUBLIC else getattr(iox.SampleMutUninit, "__assume_init", None)
    if _path("init", callable(raw)):
        return raw  # type: ignore[no-any-return]
    return lambda sample: sample.assume_init()


def error_reason(exc: BaseException) -> str:
    """The reason iceoryx2 gives, e.g. ``"ExceedsMaxLoans"``; else the class name."""
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], str) and args[0]:
        return args[0]
    return type(exc).__name__
