"""Bounded memory, slow subscribers, settings, access rights."""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from msight_core.config import QueueConfig, ShmConfig, load_shm_config
from msight_core.errors import ConfigError, PayloadTooLargeError
from msight_core.pubsub import get_pubsub
from msight_core.pubsub._shm import services
from msight_core.pubsub.shm import ShmPubSub

MiB = 1024 * 1024


def test_settings_from_the_environment() -> None:
    config = load_shm_config(
        {"MSIGHT_SHM_DOMAIN": "edge-1", "MSIGHT_SHM_MAX_FRAME_BYTES": "64_000_000",
         "MSIGHT_SHM_BUFFER_DEPTH": "8", "MSIGHT_SHM_MAX_VIEWS": "3"}
    )  # fmt: skip
    assert (config.domain, config.max_frame_bytes, config.buffer_depth, config.max_views) == (
        "edge-1", 64_000_000, 8, 3,
    )  # fmt: skip
    assert config.segment_bound() == config.samples_per_publisher() * (64_000_000 + 4096)
    for var, value in [
        ("MSIGHT_SHM_DOMAIN", "a/b"),
        ("MSIGHT_SHM_MAX_VIEWS", "0"),
        ("MSIGHT_SHM_BUFFER_DEPTH", "many"),
        ("MSIGHT_SHM_MAX_FRAME_BYTES", "12"),
    ]:
        with pytest.raises(ConfigError, match=var if var != "MSIGHT_SHM_DOMAIN" else "domain"):
            load_shm_config({var: value})
    backend = get_pubsub("grp", env={"MSIGHT_PUBSUB_BACKEND": "shm", "MSIGHT_SHM_DOMAIN": "x"})
    assert isinstance(backend, ShmPubSub) and backend.group_id == "grp"
    assert backend.capabilities.groups and not backend.capabilities.persistent
    backend.close()


def test_dev_shm_too_small_is_a_config_error(
    make: Callable[..., ShmPubSub], monkeypatch: pytest.MonkeyPatch
) -> None:
    huge = make(max_frame_bytes=1 << 40)  # no machine has 60 TiB of /dev/shm
    with pytest.raises(ConfigError, match="MSIGHT_SHM_MAX_FRAME_BYTES"):
        huge.publish("a.b", b"x")

    class Docker:  # Docker's default /dev/shm: 64 MB
        f_bavail, f_frsize = 64 * MiB // 4096, 4096

    monkeypatch.setattr(services.os, "statvfs", lambda path: Docker)
    with pytest.raises(ConfigError, match="shm-size"):
        make().publish("a.b", b"x")
    small = make(max_frame_bytes=512 * 1024, max_subscribers=2)  # fits in 64 MB
    small.publish("a.b", b"x")


def test_frame_size_bound(make: Callable[..., ShmPubSub]) -> None:
    sub, pub = make(max_frame_bytes=MiB), make(max_frame_bytes=MiB)
    sub.subscribe("a.big")
    pub.publish("a.big", bytes(MiB))
    with pytest.raises(PayloadTooLargeError, match="MSIGHT_SHM_MAX_FRAME_BYTES"):
        pub.publish("a.big", bytes(MiB + 1))
    message = sub.receive(10)
    assert message is not None and len(message.data) == MiB


def test_a_slow_view_subscriber_never_blocks_the_publisher(
    make: Callable[..., ShmPubSub],
) -> None:
    sub, pub = make(), make()
    sub.subscribe("cam.slow")
    assert sub.receive_view(0.01) is None  # views: samples wait in shared memory
    pub.publish("cam.slow", bytes([255]) * 300_000)
    with sub.receive_view(10) as view:  # the subscriber knows this publisher from now on
        assert view.data[0] == 255
    started = time.monotonic()
    for i in range(40):
        pub.publish("cam.slow", bytes([i]) * 300_000)
    assert time.monotonic() - started < 5
    got = []
    while (view := sub.receive_view(0.5)) is not None:
        with view:
            got.append(view.data[0])
    depth = sub.config.buffer_depth
    assert got == list(range(40 - depth, 40)), "the newest frames win"
    assert sub.stats()["dropped"] == {"cam.slow": 40 - depth}


def test_a_slow_group_member_counts_every_frame_overwritten(
    make: Callable[..., ShmPubSub],
) -> None:
    """A member's service is its own: frames overwritten before it first took one
    were sent to it, and are counted (a broadcast subscriber cannot tell those
    from frames sent before it joined)."""
    member, pub = make(group_id="g"), make()
    member.subscribe("cam.member")
    assert member.receive_view(0.01) is None  # views: samples wait in shared memory
    for i in range(10):
        pub.publish("cam.member", bytes([i]) * 300_000)
    got = []
    while (view := member.receive_view(0.5)) is not None:
        with view:
            got.append(view.data[0])
    depth = member.config.buffer_depth
    assert got == list(range(10 - depth, 10)), "the newest frames win"
    assert member.stats()["dropped"] == {"cam.member": 10 - depth}


def test_a_slow_application_loses_the_oldest_from_its_queue(
    config: ShmConfig, make: Callable[..., ShmPubSub]
) -> None:
    sub = make(queue=QueueConfig(max_messages=5))
    pub = make()
    sub.subscribe("cam.q")
    for i in range(30):
        pub.publish("cam.q", bytes([i]) * 200_000)
        time.sleep(0.002)
    time.sleep(0.5)
    got = [m.data[0] for m in iter(lambda: sub.receive(0.3), None)]
    assert got == list(range(25, 30))
    assert sum(sub.stats()["dropped"].values()) == 25


def test_other_settings_in_the_same_domain_are_refused(make: Callable[..., ShmPubSub]) -> None:
    make().subscribe("a.c")
    with pytest.raises(ConfigError, match="MSIGHT_SHM_"):
        make(max_subscribers=16).subscribe("a.c")


def test_files_are_for_the_same_user_only(domain: str, make: Callable[..., ShmPubSub]) -> None:
    sub, pub = make(), make()
    sub.subscribe("a.m")
    pub.publish("a.m", bytes(200_000))
    assert sub.receive(10) is not None
    files = [f for f in glob.glob(f"/dev/shm/{domain}_*") if not f.endswith(".global_mgmt")]
    assert any(f.endswith(".data") for f in files)
    for path in files:
        assert os.stat(path).st_mode & 0o777 == 0o600, path


def test_stats_count_publishing(make: Callable[..., ShmPubSub]) -> None:
    lonely = make()
    lonely.publish("nobody.listens", b"x")
    lonely.flush()
    stats: dict[str, Any] = lonely.stats()
    assert stats["published"] == 1 and stats["unrouted"] == 1
    assert repr(lonely).startswith("<ShmPubSub domain=")
