"""The shared-memory backend's private rooms; only ``msight_core.pubsub.shm`` imports from here.

Built on iceoryx2 (the ``shm`` extra). Importing this package without it raises
:class:`~msight_core.errors.MissingDependencyError` with the install hint.

* ``services``: the iceoryx2 node of one backend instance, service names and
  settings, ``/dev/shm`` space checks, error translation, dead-process cleanup.
* ``frames``: the 32-byte header of every sample; single messages and batches.
* ``destination``: one publisher port (broadcast or a group member), growing
  its segment on demand and pre-faulting it.
* ``publisher``: ``Publisher`` (one topic: batching, order, groups, loans),
  ``Loan`` and the ``Flusher`` thread.
* ``groups``: how a publisher finds group members and shares messages among them.
* ``subscriber``: ``Subscriber`` (one subscription) and the sample ``Decoder``.
* ``inbox``: waiting on all subscriptions; the ``Reader`` thread (bytes for
  ``listen()``) and the ``Puller`` (views).
* ``views``: ``ShmView`` and the bookkeeping that keeps held memory intact.
* ``memcopy``: copies of large frames (into a sample, out to ``bytes``) on two cores.
* ``internals``: every iceoryx2 detail beyond its examples, with fallbacks.

Design
------
**Segments.** Each topic is an iceoryx2 publish-subscribe service of byte
slices plus an event service of the same name that publishers notify after
each send. Every publisher port owns a data segment in ``/dev/shm`` that starts
with 1.1 MiB samples and doubles when a larger frame comes, up to ``max_frame_bytes``
(the first 16 MB frame after 1 KB ones works; the old segment goes when its
last sample is returned). Only pages written are used, and freed samples are
reused first, so memory follows the frames in flight. Before creating a port
the backend checks that ``/dev/shm`` could hold the worst case,
``ShmConfig.segment_bound()``, and raises ``ConfigError`` otherwise (Docker's
64 MB default is too small for large frames).

**Slow subscribers.** A subscriber port holds ``buffer_depth`` samples; a
publisher never waits: when a subscriber falls behind its oldest sample is
overwritten (iceoryx2's safe overflow). The subscriber counts the gap from the
publisher's message index in each header and reports it in ``stats()``.
``listen()``/``receive()`` are fed by a reader thread that copies each sample
out as it arrives, so only views depend on ``buffer_depth``.

**Small messages** (up to 64 KiB) are packed into one sample per batch: a
batch is sent by ``publish()`` when it holds 1 MiB, or by the flusher thread
as soon as it runs. A batch starts with a table of the message lengths, so a
reader cuts it into ``bytes`` with C loops. Large messages are copied into a
sample in the caller's thread after the pending batch, so one publisher's
order holds; from 4 MiB on, the copy (and a reader's copy out to ``bytes``) is
split over two cores.

**Groups.** A group member owns a service (one subscriber port) named after the
topic, a hash of the group and a random id, and holds a listener on the
topic's group registry. A publisher checks the registry's listener count on
every send and lists the members when it changes (and every second while
members exist); each message goes to one member of each group in turn, as in a
NATS queue group. A member that left is skipped at once (a send that reaches
nobody goes to the next member); a killed member is removed by the
publisher's dead-process cleanup within a few seconds.

**Views.** ``receive_view()`` switches the instance to pulling samples in the
consuming thread: a view holds its sample, so the publisher cannot reuse that
memory while the view is held; its memoryview is read-only (writing raises,
the mapping is read-only anyway); at most ``max_views`` are held, one more is
a ``BackpressureError``. A view released while arrays made from it are alive
keeps its sample until they are gone. Small (batched) messages are handed out
as copies.

**Loans.** ``loan(topic, n)`` lends a sample of the broadcast segment as a
writable memoryview; it is sent when the ``with`` block ends (copied to group
members), and given back unsent if the block raises.

**Access.** iceoryx2 creates its files mode 0600: only processes of the same
OS user attach. ``MSIGHT_SHM_DOMAIN`` prefixes every file and service name, so
separate deployments (or test runs) of one user do not see each other. Files a
killed process left are removed when the next node of the domain is created.
"""

from __future__ import annotations

try:
    import iceoryx2  # noqa: F401 - fail here, with the hint, rather than deep inside
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    from ...errors import MissingDependencyError

    raise MissingDependencyError("iceoryx2", "shm") from exc
