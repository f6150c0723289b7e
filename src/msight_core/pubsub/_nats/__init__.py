"""The NATS backend's private package: everything behind :mod:`msight_core.pubsub.nats`.

Nothing outside ``pubsub/nats.py`` (and the tests) may import from here; the
names and signatures change without notice.

* :mod:`.conn` -- the event-loop thread, client options, error translation and
  the :class:`~.conn.Connection` (connect, reconnect bookkeeping, callbacks);
  :mod:`.listeners` -- what it tells the other roles.
* :mod:`.publisher` -- :class:`~.publisher.Publisher`: the outgoing buffer and
  the writer coroutine; :mod:`.acks` -- its JetStream ack tracking and receipts.
* :mod:`.subscriber` -- :class:`~.subscriber.Subscriber`: subscriptions, the
  parser's direct routes and the feed of the receive queue.
* :mod:`.modes` -- core NATS and JetStream mode, the strategy a backend holds.
* :mod:`.commands` -- the protocol commands the publisher formats (no I/O).
* :mod:`.frames` -- the large-frame protocol (payloads above ``max_payload``).
* :mod:`.chunks` -- large frames over core NATS: chunks, reassembly, requests.
* :mod:`.flow` -- their flow control, paced by the subscribers' confirmations.
* :mod:`.streams` -- JetStream stream and consumer helpers.
* :mod:`.parser` -- the fast NATS protocol parser, checking what the server sends.
* :mod:`.receiver` -- the parser's direct socket read (an asyncio buffered protocol).
* :mod:`.routes` -- where parsed messages go: nats-py's handlers, direct routes.
* :mod:`.emit` -- how the writer hands a batch over, pacing large messages.
* :mod:`.internals` -- the only module that touches nats-py's private API.
* :mod:`.parts` -- how a backend's roles are put together (both backends).
* :mod:`.native` -- :class:`~.native.LoopClient`: the roles on the caller's own
  loop, for the asyncio backend (exposed as ``pubsub.nats.NATSLoopClient``).

Imports go one way: ``internals``, ``chunks``, ``flow``, ``listeners``, ``receiver``,
``routes`` and ``streams`` import nothing from here (``frames`` only ``chunks`` and
``flow``, ``commands`` only ``frames``, ``parser`` only ``receiver`` and ``routes``,
``emit`` only ``internals``); the roles build on them, and the facade on the roles. No object here holds a reference to the
backend that owns it: each gets the narrow arguments it uses.
"""

from __future__ import annotations

try:
    import nats  # noqa: F401 - fail here, with the hint, whichever module is imported first
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    from ...errors import MissingDependencyError

    raise MissingDependencyError("nats-py", "nats") from exc
