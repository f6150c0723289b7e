"""The NATS backend's private package: everything behind :mod:`msight_core.pubsub.nats`.

Nothing outside ``pubsub/nats.py`` (and the tests) may import from here; the
names and signatures change without notice.

* :mod:`.conn` -- the event-loop thread, client options, error translation and
  the :class:`~.conn.Connection` (connect, reconnect bookkeeping, callbacks).
* :mod:`.publisher` -- :class:`~.publisher.Publisher`: the outgoing buffer, the
  writer coroutine and JetStream ack tracking.
* :mod:`.subscriber` -- :class:`~.subscriber.Subscriber`: subscriptions, the
  parser's direct routes and the feed of the receive queue.
* :mod:`.modes` -- core NATS and JetStream mode, the strategy a backend holds.
* :mod:`.commands` -- the protocol commands the publisher formats (no I/O).
* :mod:`.frames` -- the large-frame protocol (payloads above ``max_payload``).
* :mod:`.streams` -- JetStream stream and consumer helpers.
* :mod:`.parser` -- the fast NATS protocol parser.
* :mod:`.internals` -- the only module that touches nats-py's private API.

Imports go one way: ``internals``, ``frames``, ``parser`` and ``streams``
import nothing from here (``commands`` only ``frames``); the roles build on
them, and the facade on the roles. No object here holds a reference to the
backend that owns it: each gets the narrow arguments it uses.
"""
