"""Nodes on shm receive views: arrays in shared memory during the callback, safe after it.

The publisher is a separate process (``_shm_child.py images``); the node spins
in a thread of the test process on its own ``ShmPubSub``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from msight_core.data import Data, ImageData
from msight_core.nodes import NodeConfig, SinkNode
from msight_core.pubsub.shm import ShmPubSub

FRAMES = 8
SHAPE = (480, 640, 3)


class Keeper(SinkNode):
    """Checks each frame inside the callback; keeps what ``keep`` says."""

    def __init__(self, *args: Any, keep: str, expect: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep = keep
        self.expect = expect
        self.ready = threading.Event()
        self.kept: list[Any] = []
        self.inside: list[dict[str, Any]] = []

    def on_before_spin(self) -> None:
        self.ready.set()

    def on_message(self, data: Data) -> None:
        assert isinstance(data, ImageData)
        image = data.image
        info = {
            "frame": data.frame_id,
            "owndata": image.flags.owndata,
            "writeable": image.flags.writeable,
            "mode": self.pubsub.stats()["mode"],
            "held": self.pubsub.stats()["views_held"],
            "correct": bool((image == data.frame_id % 256).all()),
        }
        try:
            image[0, 0, 0] = 1
            info["write"] = "allowed"
        except ValueError:
            info["write"] = "raised"
        self.inside.append(info)
        if self.keep == "message":
            self.kept.append(data)
        elif self.keep == "array":
            self.kept.append(image)
        if len(self.inside) >= self.expect:
            self.stop()


def _run(node: Keeper, spawn: Callable[..., Any], domain: str, topic: str) -> None:
    thread = threading.Thread(target=node.spin, kwargs={"handle_signals": False}, daemon=True)
    thread.start()
    assert node.ready.wait(20)
    spawn("images", domain, topic, FRAMES).ready()
    thread.join(60)
    assert not thread.is_alive(), f"node saw {len(node.inside)} of {FRAMES}"


def _node(make: Callable[..., ShmPubSub], keep: str, **overrides: Any) -> Keeper:
    config = NodeConfig(
        name=f"keeper-{keep}",
        subscribe_topic_name="cam.nodes",
        subscribe_topic_data_type=ImageData,
        stats_interval=0,
        receive_timeout=0.05,
    )
    return Keeper(config, make(**overrides), keep=keep, expect=FRAMES)


@pytest.mark.parametrize("keep", ["nothing", "message"])
def test_a_node_reads_frames_in_shared_memory_and_kept_messages_are_copied_out(
    make: Callable[..., ShmPubSub], spawn: Callable[..., Any], domain: str, keep: str
) -> None:
    node = _node(make, keep)
    _run(node, spawn, domain, "cam.nodes")
    assert [i["frame"] for i in node.inside] == list(range(FRAMES))
    for info in node.inside:
        # Inside the callback: a read-only view of shared memory, intact.
        assert info["mode"] == "views" and info["correct"]
        assert not info["owndata"] and not info["writeable"] and info["write"] == "raised"
    if keep == "message":
        # Kept beyond the callback: copied out, still read-only, never overwritten.
        for i, data in enumerate(node.kept):
            assert data.frame_id == i
            assert data.image.flags.owndata and not data.image.flags.writeable
            assert (data.image == i % 256).all()
        # Earlier messages pin nothing: only the one in hand is held.
        assert info["held"] == 1, node.inside


def test_kept_arrays_pin_their_samples_and_the_node_goes_on_with_copies(
    make: Callable[..., ShmPubSub], spawn: Callable[..., Any], domain: str
) -> None:
    node = _node(make, "array", max_views=2)
    _run(node, spawn, domain, "cam.nodes")
    # Every frame handled: two by views (then pinned by the kept arrays), the rest as copies.
    assert [i["frame"] for i in node.inside] == list(range(FRAMES))
    assert all(i["correct"] and i["write"] == "raised" for i in node.inside)
    for i, image in enumerate(node.kept):
        assert (image == i % 256).all(), f"kept array {i} was overwritten"
    # The first two pinned by kept arrays, then copies (held stays at the limit).
    assert [i["held"] for i in node.inside[:2]] == [1, 2]
    assert all(i["held"] == 2 for i in node.inside[2:])


def test_zero_copy_off_receives_bytes(
    make: Callable[..., ShmPubSub], spawn: Callable[..., Any], domain: str
) -> None:
    node = _node(make, "nothing")
    node.configs.zero_copy = False
    _run(node, spawn, domain, "cam.nodes")
    assert [i["mode"] for i in node.inside] == ["bytes"] * FRAMES
    assert all(i["correct"] for i in node.inside)
    assert all(i["write"] == "raised" for i in node.inside)  # arrays over bytes: read-only
