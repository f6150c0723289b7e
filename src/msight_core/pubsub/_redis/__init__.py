"""The Redis backend's private rooms; only ``msight_core.pubsub.redis`` imports from here.

* ``wire``: endpoints (from a ``RedisConfig`` or a redis-py client, through its
  public API only), connection set-up (TLS, AUTH), RESP encoding, bulk reply parsing.
* ``outbox``: the bounded publish buffer both publishers share, and every tuning
  constant of the Redis readers and writers.
* ``publisher`` / ``subscriber``: ``Publisher`` and ``Subscriber`` for one server
  (``PUBLISH``/``SUBSCRIBE``); ``reader``: the subscriber's reply parsing (hiredis
  for small replies, large frames received directly).
* ``slots``: Redis Cluster hash slots and the slot-to-master map.
* ``cluster_publisher`` / ``cluster_subscriber``: ``Publisher`` and ``Subscriber``
  for a cluster (sharded ``SPUBLISH``/``SSUBSCRIBE``).

Nothing here touches redis-py's private attributes; the hot path speaks RESP on
raw sockets and parses with hiredis. Application code imports
:class:`msight_core.pubsub.RedisPubSub`, never these modules.
"""
