"""What the NATS connection tells the rest of the backend (not public API)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["Listeners"]


@dataclass(frozen=True)
class Listeners:
    """What a :class:`Connection` tells the rest of the backend; called on the loop."""

    created: Callable[[Any], None]
    """A client was made and is about to connect (install the parser now)."""
    connected: Callable[[Any], None]
    """The client connected for the first time."""
    lost: Callable[[], int]
    """The connection was lost: how many sent messages may be lost with it."""
    restored: Callable[[], int]
    """The client reconnected: how many buffered messages go out now."""
    dropped: Callable[[int], None]
    """nats-py dropped a message of the subscription with this id (slow consumer)."""
    closed: Callable[[BaseException], None]
    """The connection closed for good, not by us."""
    topics: Callable[[], Iterable[str]]
    """The subscribed topics (for the reconnect log)."""
    refused: Callable[[str], None]
    """The server refused a command (``-ERR 'Permissions Violation ...'``): its text."""
