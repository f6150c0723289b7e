"""A plain application loop stopped by SIGTERM: ``python _sigterm_child.py ROLE TOPIC OUT``.

The backend comes from the environment (``MSIGHT_PUBSUB_BACKEND`` and its
settings), as in a deployment. On SIGTERM the loop ends, the backend is closed
(which must deliver what was accepted, and commit what was processed) and the
process exits with code 0.

Roles:
    publisher: publish ``p-<n>`` as fast as possible; on exit write how many
        ``publish()`` accepted to OUT.
    subscriber: join group ``GROUP`` (4th argument) and append each processed
        payload to OUT (one per line, flushed), then come back for the next.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from msight_core.pubsub import get_pubsub


def main(role: str, topic: str, out: Path, group: str | None = None) -> int:
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    backend = get_pubsub(group_id=group)
    try:
        if role == "publisher":
            accepted = 0
            (out.parent / (out.name + ".ready")).write_text("ready")
            while not stop:
                backend.publish(topic, b"p-%d" % accepted)
                accepted += 1
                if accepted % 200 == 0:
                    time.sleep(0.001)  # a real source has a rate; keep the box responsive
            backend.close()  # no flush(): close() must deliver what was accepted
            out.write_text(str(accepted))
            return 0
        backend.subscribe(topic)
        (out.parent / (out.name + ".ready")).write_text("ready")
        with out.open("a") as sink:
            while not stop:
                message = backend.receive(0.1)  # type: ignore[attr-defined]
                if message is not None:
                    sink.write(message.data.decode() + "\n")
                    sink.flush()
        backend.close()  # acknowledges/commits the message in hand
        return 0
    finally:
        backend.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args[0], args[1], Path(args[2]), args[3] if len(args) > 3 else None))
