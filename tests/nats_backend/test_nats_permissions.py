"""What the server's permissions refuse is reported, not silently dropped.

nats-server answers a refused SUB or PUB with ``-ERR 'Permissions Violation
for Subscription/Publish to "..."'`` and keeps the connection. A refused
subscription raises PermissionDeniedError from ``subscribe()``; a refused
publish is raised by the next ``publish()`` or ``flush()`` as a PublishError
caused by a PermissionDeniedError.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from msight_core.aio.nats import AsyncNATSPubSub
from msight_core.errors import PermissionDeniedError, PublishError
from msight_core.pubsub import NATSPubSub
from msight_core.pubsub.utils import get_nats_config
from msight_core.testing.brokers import NatsServer
from msight_core.testing.conformance import collect

CONF = """
authorization {
  users = [
    { user: reader, password: "reader-pw",
      permissions: { publish: ["_INBOX.>", "_msight.frames.>"],
                     subscribe: ["camera1.>", "_INBOX.>", "_msight.chunks.camera1.>",
                                 "nochunks.>"] } }
    { user: silent, password: "silent-pw",
      permissions: { publish: ["camera1.detections"],
                     subscribe: ["camera1.>", "_INBOX.>", "_msight.chunks.camera1.>"] } }
    { user: writer, password: "writer-pw",
      permissions: { publish: ["camera1.>", "Camera3.>", "_msight.chunks.camera1.>",
                               "_msight.frames.>", "_INBOX.>", "nochunks.>", "secret.>"],
                     subscribe: ["_INBOX.>", "_msight.frames.>"] } }
  ]
}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    conf = tmp_path_factory.mktemp("nats-perms") / "nats.conf"
    conf.write_text(CONF)
    with NatsServer(jetstream=False, extra_args=["-c", str(conf)]) as running:
        yield running


def _env(server: NatsServer, user: str) -> dict[str, str]:
    return {
        "MSIGHT_NATS_SERVERS": f"['{server.url}']",
        "MSIGHT_NATS_USERNAME": user,
        "MSIGHT_NATS_PASSWORD": f"{user}-pw",
    }


@pytest.mark.parametrize("group", [None, "workers"])
def test_a_refused_subscription_raises_and_the_backend_goes_on(
    server: NatsServer, group: str | None
) -> None:
    sub = NATSPubSub(get_nats_config(group, env=_env(server, "reader")))
    pub = NATSPubSub(get_nats_config(env=_env(server, "writer")))
    try:
        with pytest.raises(PermissionDeniedError, match="secret.frames") as info:
            sub.subscribe("secret.frames")
        assert "reader-pw" not in str(info.value)
        sub.subscribe("camera1.frames")  # allowed: works on the same connection
        with pytest.raises(PermissionDeniedError):
            sub.subscribe("secret.frames")  # not recorded as subscribed: refused again
        pub.publish("secret.frames", b"never")
        pub.publish("camera1.frames", b"seen")
        pub.flush()
        assert [m.data for m in collect(sub, 2, 3)] == [b"seen"]
    finally:
        sub.close()
        pub.close()


def test_a_refused_chunk_subject_is_reported_for_a_broadcast_subscriber(
    server: NatsServer,
) -> None:
    """Core broadcast subscribers also read large frames' chunks: a user allowed the
    topic but not its chunk subject would silently miss every large frame."""
    sub = NATSPubSub(get_nats_config(env=_env(server, "reader")))
    try:
        with pytest.raises(PermissionDeniedError, match="_msight.chunks.nochunks.x"):
            sub.subscribe("nochunks.x")
    finally:
        sub.close()
    member = NATSPubSub(get_nats_config("g", env=_env(server, "reader")))
    try:
        member.subscribe("nochunks.x")  # a group member fetches frames point to point
    finally:
        member.close()


def test_the_asyncio_backend_raises_too(server: NatsServer) -> None:
    async def main() -> Any:
        async with AsyncNATSPubSub(get_nats_config(env=_env(server, "reader"))) as sub:
            with pytest.raises(PermissionDeniedError, match="secret.frames"):
                await sub.subscribe("secret.frames")
            await sub.subscribe("camera1.frames")

    asyncio.run(main())


def test_a_refused_publish_is_raised_by_the_next_flush(server: NatsServer) -> None:
    sub = NATSPubSub(get_nats_config(env=_env(server, "reader")))
    pub = NATSPubSub(get_nats_config(env=_env(server, "writer")))
    try:
        sub.subscribe("camera1.frames")
        pub.publish("camera1.frames", b"allowed-1")
        pub.publish("Camera2.Frames", b"refused")  # not in the writer's publish list
        pub.publish("camera1.frames", b"allowed-2")
        with pytest.raises(PublishError, match="'Camera2.Frames'") as info:
            pub.flush()
        assert isinstance(info.value.__cause__, PermissionDeniedError)
        pub.publish("camera1.frames", b"allowed-3")
        pub.flush()  # reported once: nothing new was refused
        got = [m.data for m in collect(sub, 3, 10)]
        assert got == [b"allowed-1", b"allowed-2", b"allowed-3"]
        assert pub.stats()["refused"] == 1
    finally:
        sub.close()
        pub.close()


def test_refused_large_frame_chunks_are_named(server: NatsServer) -> None:
    """Allowed the topic but not its chunk subject: a large frame cannot go out."""
    pub = NATSPubSub(get_nats_config(env=_env(server, "writer")))
    try:
        pub.publish("Camera3.big", bytes(3 * 1024 * 1024))  # above max_payload: chunked
        with pytest.raises(PublishError, match="large-frame chunks of 'camera3.big'"):
            pub.flush()  # (nats-py lowercases the server's text; frames keep no name map)
    finally:
        pub.close()


def test_the_asyncio_backend_reports_a_refused_publish(server: NatsServer) -> None:
    async def main() -> None:
        async with AsyncNATSPubSub(get_nats_config(env=_env(server, "writer"))) as pub:
            await pub.publish("camera2.frames", b"refused")
            with pytest.raises(PublishError) as info:
                await pub.flush()
            assert isinstance(info.value.__cause__, PermissionDeniedError)

    asyncio.run(main())


def test_a_subscriber_refused_its_confirmations_gets_frames_and_publishes_on(
    server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A broadcast subscriber may not publish to ``_msight.frames.>``, where it
    confirms the large frames it read: it gets them all the same, the refusal
    is logged once, and its own publishes are not failed by it."""
    sub = NATSPubSub(get_nats_config(env=_env(server, "silent")))
    pub = NATSPubSub(get_nats_config(env=_env(server, "writer")))
    try:
        sub.subscribe("camera1.frames")
        frames = [bytes([i]) * (2 * 1024 * 1024 + i) for i in range(4)]
        with caplog.at_level(logging.WARNING, logger="msight_core.pubsub.nats"):
            for payload in frames:
                pub.publish("camera1.frames", payload)
            pub.flush(30)
            assert [m.data for m in collect(sub, len(frames), 30)] == frames
            sub.publish("camera1.detections", b"boxes")
            sub.flush()  # no PublishError for the refused confirmations
        assert sub.stats()["refused"] == 0
        refusals = [r for r in caplog.records if "refused a large-frame request" in r.getMessage()]
        assert len(refusals) == 1
    finally:
        sub.close()
        pub.close()
