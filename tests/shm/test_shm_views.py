"""Zero-copy reads (views) and writes (loans)."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from msight_core.data import Data, ImageData, PointCloudData
from msight_core.errors import BackpressureError, ClosedError, PayloadTooLargeError
from msight_core.pubsub.shm import ShmPubSub, ShmView

MiB = 1024 * 1024


def _address(view: ShmView) -> int:
    return int(np.frombuffer(view.data, np.uint8).ctypes.data)


def test_a_view_is_read_only_and_points_into_shared_memory(
    make: Callable[..., ShmPubSub],
) -> None:
    sub, pub = make(), make()
    sub.subscribe("cam.v")
    assert sub.receive_view(0.01) is None  # views from now on: nothing copied ahead
    image = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    pub.publish("cam.v", ImageData(image=image, sensor_name="cam").serialize())
    with sub.receive_view(10) as view:
        assert view.zero_copy and view.topic == "cam.v"
        assert view.data.readonly and view.data.format == "B" and view.data.ndim == 1
        with pytest.raises(TypeError):
            view.data[0] = 1  # raises instead of crashing the process
        frame = Data.deserialize(view.data)
        assert isinstance(frame, ImageData)
        np.testing.assert_array_equal(frame.image, image)
        start = _address(view)
        assert start <= frame.image.ctypes.data < start + len(view), "no copy: a view of shm"
        assert not frame.image.flags.writeable
        with pytest.raises(ValueError):
            frame.image[0, 0, 0] = 1
        del frame
    with pytest.raises(ValueError):
        view.data  # noqa: B018 - released on exit


def test_a_held_view_is_never_overwritten(make: Callable[..., ShmPubSub]) -> None:
    sub, pub = make(), make()
    sub.subscribe("cam.h")
    assert sub.receive_view(0.01) is None
    pub.publish("cam.h", b"A" * (2 * MiB))
    held = sub.receive_view(10)
    assert held is not None
    copy = held.data.tobytes()
    for i in range(60):  # far more frames than the subscriber buffers and pre-faults
        pub.publish("cam.h", bytes([66 + i % 20]) * (2 * MiB))
        with sub.receive_view(10) as other:
            assert other is not None and other.data[0] != 65
    assert held.data.tobytes() == copy
    held.release()
    held.release()  # idempotent


def test_view_limit_is_a_clear_error_and_arrays_keep_their_sample(
    make: Callable[..., ShmPubSub],
) -> None:
    sub, pub = make(max_views=2), make()
    sub.subscribe("cam.l")
    assert sub.receive_view(0.01) is None
    for i in range(4):
        pub.publish("cam.l", bytes([i]) * 200_000)
    first, second = sub.receive_view(10), sub.receive_view(10)
    assert first is not None and second is not None
    with pytest.raises(BackpressureError, match="MSIGHT_SHM_MAX_VIEWS"):
        sub.receive_view(1)
    array = np.frombuffer(first.data, np.uint8)
    first.release()  # the array still points into it: the sample stays held
    assert sub.stats()["views_held"] == 2
    with pytest.raises(BackpressureError, match="still referenced"):
        sub.receive_view(1)
    assert array[0] == 0
    del array
    gc.collect()
    assert sub.stats()["views_held"] == 1
    third = sub.receive_view(10)
    assert third is not None and third.data[0] == 2
    second.release()
    third.release()


def test_views_and_bytes_on_one_instance(make: Callable[..., ShmPubSub]) -> None:
    sub, pub = make(), make()
    sub.subscribe("mix.a")
    sub.subscribe("mix.b")
    pub.publish("mix.a", b"early")  # copied by the reader before views were asked for
    pub.flush()
    time.sleep(0.3)
    with sub.receive_view(5) as view:
        assert view.tobytes() == b"early" and not view.zero_copy
    pub.publish("mix.b", b"x" * 300_000)
    pub.publish("mix.a", b"small")
    got = {sub.receive(5).topic: None, sub.receive(5).topic: None}  # bytes in view mode
    assert set(got) == {"mix.a", "mix.b"}
    assert sub.stats()["mode"] == "views"
    other = make()
    other.subscribe("mix.a")
    pub.publish("mix.a", b"z")
    assert other.receive(5) is not None
    with pytest.raises(RuntimeError, match="receive_view"):
        other.receive_view(0.1)


def test_close_releases_views_and_wakes_a_blocked_receive_view(
    make: Callable[..., ShmPubSub],
) -> None:
    sub, pub = make(), make()
    sub.subscribe("cam.c")
    pub.publish("cam.c", b"early")
    pub.flush()
    time.sleep(0.2)  # taken by the reader thread: handed out as a copy
    early = sub.receive_view(10)
    pub.publish("cam.c", b"q" * 300_000)
    view = sub.receive_view(10)
    assert early is not None and not early.zero_copy
    assert view is not None and view.zero_copy
    ended = threading.Event()

    def consume() -> None:
        try:
            sub.receive_view(None)
        except ClosedError:
            pass
        ended.set()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    sub.close()
    assert ended.wait(5) and time.monotonic() - started < 5
    for released in (early, view):
        with pytest.raises(ValueError):
            released.data  # noqa: B018 - released by close()
    with pytest.raises(ClosedError):
        sub.receive_view(0.1)


def test_loan_sends_on_exit_and_not_on_exception(make: Callable[..., ShmPubSub]) -> None:
    sub, member, pub = make(), make(group_id="g"), make()
    sub.subscribe("cam.w")
    member.subscribe("cam.w")
    with pub.loan("cam.w", 3 * MiB) as buf:
        assert len(buf) == 3 * MiB and not buf.readonly
        np.frombuffer(buf, np.uint8)[:] = 7  # produced in place
    with pytest.raises(RuntimeError), pub.loan("cam.w", 100) as buf:
        buf[:3] = b"bad"
        raise RuntimeError("the producer failed")
    with pub.loan("cam.w", 5) as buf:
        buf[:] = b"after"
    with pytest.raises(ValueError):
        buf[0] = 1  # the buffer ends with the block
    for backend in (sub, member):  # group members get a copy
        first = backend.receive(10)
        assert first is not None and len(first.data) == 3 * MiB and first.data[:2] == b"\x07\x07"
        second = backend.receive(10)
        assert second is not None and second.data == b"after"
        assert backend.receive(0.3) is None
    with pytest.raises(PayloadTooLargeError):
        pub.loan("cam.w", pub.config.max_frame_bytes + 1)
    with pytest.raises(ValueError):
        pub.loan("cam.w", -1)


def test_data_serializes_straight_into_a_loan(make: Callable[..., ShmPubSub]) -> None:
    """ImageData / PointCloudData built in shared memory: no intermediate bytes."""
    sub, pub = make(), make()
    sub.subscribe("cam.d")
    rng = np.random.default_rng(5)
    image = ImageData(image=rng.integers(0, 255, (480, 640, 3), np.uint8), sensor_name="c1")
    cloud = PointCloudData(points=rng.random((50_000, 4), np.float32), sensor_name="l1")
    strided = ImageData(image=rng.integers(0, 255, (64, 64, 3), np.uint8)[:, ::2])
    for value in (image, cloud, strided):
        size = value.serialized_size()
        assert size == len(value.serialize())
        with pub.loan("cam.d", size) as buf:
            assert value.serialize_into(buf) == size
    for value in (image, cloud, strided):
        with sub.receive_view(10) as view:
            got = Data.deserialize(view.data)
            assert got == value
            arrays = [a for a in vars(got).values() if isinstance(a, np.ndarray) and a.size > 1000]
            assert all(not a.flags.writeable for a in arrays)  # views of shared memory
            del got, arrays  # the arrays hold the view: let it go before the next one
    with pub.loan("cam.d", 10) as buf, pytest.raises(ValueError, match="too small"):
        image.serialize_into(buf)
    with pytest.raises(TypeError, match="writable"):
        image.serialize_into(bytes(image.serialized_size()))


def test_switching_to_views_hands_out_everything_copied_before(
    make: Callable[..., ShmPubSub],
) -> None:
    # Messages the reader thread copied before the first receive_view() come first,
    # all of them: more than the ~1 MB the receive queue hands out per call.
    sub, pub = make(), make()
    sub.subscribe("cam.s")
    for i in range(4):
        pub.publish("cam.s", bytes([i]) * (700 * 1024))
    deadline = time.monotonic() + 20
    while sub.stats()["queued"] < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sub.stats()["queued"] == 4
    for i in range(4):
        view = sub.receive_view(5)
        assert view is not None, f"message {i} lost in the switch"
        with view:
            assert view.data[0] == i and not view.zero_copy
