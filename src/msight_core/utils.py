"""Seed entry point ``get_redis_client()``: a redis-py client from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import RedisConfig, load_redis_config
from .errors import MissingDependencyError

__all__ = ["get_redis_client"]


def get_redis_client(
    config: RedisConfig | None = None, env: Mapping[str, str] | None = None, **kwargs: Any
) -> Any:
    """A ``redis.Redis`` client for ``MSIGHT_REDIS_MESSAGE_BROKER_*`` (no connection yet).

    Args:
        config: settings to use instead of the environment.
        env: environment mapping to read instead of ``os.environ``.
        **kwargs: extra ``redis.Redis`` keyword arguments.

    Raises:
        MissingDependencyError: the ``redis`` extra is not installed.
        ConfigError: a variable is malformed.
    """
    try:
        import redis
    except ImportError as exc:
        raise MissingDependencyError("redis", "redis") from exc
    config = config or load_redis_config(env)
    options: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "db": config.db,
        "username": config.username,
        "password": config.password.reveal() if config.password else None,
        "socket_connect_timeout": config.connect_timeout,
    }
    if config.use_tls:
        options.update(
            ssl=True,
            ssl_ca_certs=config.tls_ca_cert_file,
            ssl_certfile=config.tls_cert_file,
            ssl_keyfile=config.tls_key_file,
            ssl_cert_reqs="required" if config.tls_verify else "none",
            ssl_check_hostname=config.tls_verify,
        )
    options.update(kwargs)
    return redis.Redis(**options)
