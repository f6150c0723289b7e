"""Sample layout checks, hostile samples from a foreign writer, the public iceoryx2 path."""

from __future__ import annotations

import ctypes
import glob
import os
import struct
from collections.abc import Callable

import pytest

from msight_core.config import ShmConfig
from msight_core.pubsub._shm import frames, internals, memcopy
from msight_core.pubsub._shm.services import Runtime, base_name
from msight_core.pubsub.shm import ShmPubSub

HEAD = struct.Struct("<HBBHHQQQ")


def _head(kind: int = 1, offset: int = 32, value: int = 0, magic: int = 0x4D53, v: int = 1):
    return HEAD.pack(magic, v, kind, offset, 0, 7, 0, value)


@pytest.mark.parametrize(
    ("head", "size"),
    [
        (b"short", 5),
        (_head(magic=0x1234), 64),
        (_head(v=9), 64),
        (_head(kind=3), 64),
        (_head(kind=1, offset=8), 64),  # inside the header
        (_head(kind=1, offset=200, value=1), 400),  # past the alignment pad
        (_head(kind=1, offset=64, value=100), 100),  # message past the end
        (_head(kind=2, offset=32, value=0), 64),  # a batch of nothing
        (_head(kind=2, offset=32, value=9), 64),  # more records than bytes
        (_head(kind=2, offset=40, value=1), 64),
    ],
)
def test_bad_headers_are_refused(head: bytes, size: int) -> None:
    with pytest.raises(frames.FrameError):
        frames.parse(head, size)


def test_headers_and_batches_round_trip() -> None:
    head = frames.parse(frames.pack(frames.SINGLE, 64, 5, 9, 10), 74)
    assert (head.kind, head.offset, head.source, head.first, head.messages) == (1, 64, 5, 9, 1)
    body = frames.batch_body([b"a", b"", b"xyz"])
    assert frames.split(body, 3) == ([b"a", b"", b"xyz"], True)
    assert frames.split(body[:-1], 3) == ([b"a", b""], False)  # truncated last record
    assert frames.split(body + b"!", 3)[1] is False  # trailing bytes
    assert frames.split(struct.pack("<I", 2**31) + b"x", 1) == ([], False)  # huge length
    for address in range(0, 128, 8):
        offset = frames.single_offset(address)
        assert (address + offset) % 64 == 0 and 32 <= offset < 96


def test_foreign_samples_cost_only_themselves(
    config: ShmConfig, make: Callable[..., ShmPubSub]
) -> None:
    sub, pub = make(), make()
    sub.subscribe("hostile.t")
    runtime = Runtime(config)  # a writer that does not follow the layout
    try:
        name = base_name(config.domain, "hostile.t")
        service = runtime.pubsub(name, config.max_subscribers)
        port = service.publisher_builder().initial_max_slice_len(4096).create()
        notifier = runtime.event(name, config.max_subscribers, config.max_publishers)
        notifier = notifier.notifier_builder().create()
        for payload in (b"garbage" * 10, _head(kind=2, value=3) + b"\xff\xff\xff\x7f" + b"x"):
            sample = port.loan_slice_uninit(len(payload))
            ctypes.memmove(sample.payload_ptr, payload, len(payload))
            sample.assume_init().send()
        notifier.notify()
        pub.publish("hostile.t", b"fine")
        message = sub.receive(10)
        assert message is not None and message.data == b"fine"
        assert sub.stats()["invalid"] == 2
        notifier.delete()
        port.delete()
    finally:
        runtime.forget(base_name(config.domain, "hostile.t"))
        runtime.close()


def test_the_public_iceoryx2_path_works(
    make: Callable[..., ShmPubSub], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The public path uses iceoryx2's global config: files named iox2_*.
    before = set(glob.glob("/dev/shm/iox2_*"))
    monkeypatch.setattr(internals, "FORCE_PUBLIC", True)
    try:
        _public_round_trip(make)
    finally:
        for path in set(glob.glob("/dev/shm/iox2_*")) - before:
            os.remove(path)


def _public_round_trip(make: Callable[..., ShmPubSub]) -> None:
    sub, pub = make(), make()
    sub.subscribe("public.t")
    pub.publish("public.t", b"small")
    pub.publish("public.t", b"L" * 500_000)
    with pub.loan("public.t", 3) as buf:
        buf[:] = b"abc"
    got = [sub.receive(10) for _ in range(3)]
    assert [m.data[:5] for m in got if m] == [b"small", b"LLLLL", b"abc"]
    sub.close()
    pub.close()


@pytest.mark.parametrize(
    "size", [0, 1000, memcopy.PARALLEL_BYTES - 1, memcopy.PARALLEL_BYTES + 4097]
)
def test_large_copies_on_two_cores_are_exact(size: int) -> None:
    src = os.urandom(size)
    assert (
        memcopy.to_bytes(ctypes.cast(ctypes.c_char_p(src), ctypes.c_void_p).value or 0, size) == src
    )
    dst = ctypes.create_string_buffer(size + 8)
    memcopy.copy_from_bytes(ctypes.addressof(dst) + 8, src, size)
    assert dst.raw[8:] == src and dst.raw[:8] == bytes(8)  # nothing written outside
    back = ctypes.create_string_buffer(size)
    memcopy.copy(ctypes.addressof(back), ctypes.addressof(dst) + 8, size)
    assert back.raw == src
