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
    """A redis-py client for ``MSIGHT_REDIS_MESSAGE_BROKER_*``.

    A ``redis.Redis`` (no connection yet), or, when ``use_cluster`` is set
    (``MSIGHT_REDIS_MESSAGE_BROKER_USE_CLUSTER=true``), a ``redis.RedisCluster``
    seeded with ``MSIGHT_REDIS_MESSAGE_BROKER_CLUSTER_NODES`` ("host:port" entries;
    default: host and port), which contacts a seed at once to learn the slot map.
    Both work with the topic registry and with ``RedisPubSub``.

    Args:
        config: settings to use instead of the environment.
        env: environment mapping to read instead of ``os.environ``.
        **kwargs: extra ``redis.Redis`` keyword arguments.

    Raises:
        MissingDependencyError: the ``redis`` extra is not installed.
        ConfigError: a variable is malformed (or a db other than 0 in cluster mode).
        BrokerUnavailableError: cluster mode and no seed node answered.
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
    if config.use_cluster:
        return _cluster_client(redis, config, options)
    return redis.Redis(**options)


def _cluster_client(redis: Any, config: RedisConfig, options: dict[str, Any]) -> Any:
    """A ``redis.RedisCluster`` seeded with ``cluster_nodes`` (or host:port)."""
    from redis.cluster import ClusterNode
    from redis.exceptions import RedisClusterException, RedisError

    from .config import mask_url, parse_redis_node
    from .errors import BrokerUnavailableError, ConfigError

    if options.pop("db", 0):
        raise ConfigError("Redis Cluster has only database 0; unset MSIGHT_REDIS_MESSAGE_BROKER_DB")
    options.pop("host", None)
    options.pop("port", None)
    entries = config.cluster_nodes or (f"{config.host}:{config.port}",)
    nodes = [ClusterNode(*parse_redis_node(entry)) for entry in entries]
    try:
        return redis.RedisCluster(startup_nodes=nodes, **options)
    except (RedisClusterException, RedisError) as exc:
        # redis-py connects to the seeds at once to learn the slot map.
        raise BrokerUnavailableError(
            f"cannot reach the Redis Cluster at {mask_url(', '.join(entries))}: "
            f"{type(exc).__name__}"
        ) from exc
