"""A sequence-numbered stream for kill-during-stream tests: what arrived, when."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StreamResult:
    sent: int
    received: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    killed_at: float = 0.0
    publish_errors: int = 0

    @property
    def lost(self) -> int:
        return self.sent - len(set(self.received))

    @property
    def duplicates(self) -> int:
        return len(self.received) - len(set(self.received))

    @property
    def pause(self) -> float:
        """Longest gap between two arrivals (the outage as the subscriber saw it)."""
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]
        return max(gaps, default=0.0)

    def resumed_after_kill(self) -> bool:
        return any(t > self.killed_at for t in self.arrivals)

    def summary(self, what: str) -> str:
        return (
            f"[cluster] {what}: sent={self.sent} received={len(set(self.received))} "
            f"lost={self.lost} duplicates={self.duplicates} publish_errors={self.publish_errors} "
            f"pause={self.pause:.2f}s"
        )


def run_stream(
    pub: Any,
    sub: Any,
    topic: str,
    kill: Any,
    *,
    rate: float = 200.0,
    before: float = 1.0,
    after: float = 6.0,
    drain: float = 5.0,
    publish_errors: tuple[type[BaseException], ...] = (),
) -> StreamResult:
    """Publish ``seq`` numbers at ``rate`` Hz, call ``kill()`` after ``before`` s.

    Publishing goes on for ``after`` seconds past the kill; then the subscriber
    is drained until nothing arrives for ``drain`` seconds (bounded).
    """
    result = StreamResult(sent=0)
    stop = threading.Event()

    def consume() -> None:
        deadline = None
        while True:
            msg = sub.receive(0.2)
            now = time.monotonic()
            if msg is not None:
                result.received.append(int(msg.data.split(b":", 1)[0]))
                result.arrivals.append(now)
                deadline = None
                continue
            if stop.is_set():
                deadline = deadline or now + drain
                if now > deadline or len(set(result.received)) >= result.sent:
                    return

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    start = time.monotonic()
    end = start + before + after
    killed = False
    period = 1.0 / rate
    payload = b":" + b"x" * 100
    seq = 0
    while time.monotonic() < end:
        if not killed and time.monotonic() - start >= before:
            result.killed_at = time.monotonic()
            kill()
            killed = True
        try:
            pub.publish(topic, b"%d%s" % (seq, payload))
        except publish_errors:
            result.publish_errors += 1  # counted as sent: the application lost it
        seq += 1
        next_at = start + seq * period
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    result.sent = seq
    try:
        pub.flush(15)
    except publish_errors:
        pass
    stop.set()
    reader.join(drain + 20)
    return result
