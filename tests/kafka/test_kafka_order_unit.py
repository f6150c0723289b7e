"""The Kafka order restoration and frame reassembly on their own (no broker)."""

from __future__ import annotations

import os
import random
import time
from typing import Any

import pytest

pytest.importorskip("confluent_kafka")

from msight_core.pubsub._kafka.chunks import CHUNK_STRUCT, MAX_OPEN_FRAMES, Reassembler, split
from msight_core.pubsub._kafka.order import FIRST_WAIT, MAX_AHEAD, Sequencer
from msight_core.pubsub._kafka.stamps import stamp

T = "cam"
N = 6


class Recorder:
    def __init__(self, wait: float = 0.5, max_bytes: int = 1 << 30, max_count: int = 100_000):
        self.out: list[Any] = []
        self.seq = Sequencer(wait, max_bytes, max_count, self.emit)
        self.seq.assign(T, range(N))

    def emit(self, item: Any, key: Any, offset: int) -> None:
        self.out.append(item)

    def feed(self, records: list[tuple[bytes, int, int]], batch: int = 1000) -> None:
        """records: (publisher, seq, partition) with base 0."""
        offsets: dict[int, int] = {}
        for start in range(0, len(records), batch):
            for pid, s, part in records[start : start + batch]:
                offset = offsets.get(part, 0)
                offsets[part] = offset + 1
                self.seq.add((pid, s), (T, part), offset, stamp(pid, s, N), 10)
            self.seq.flush_batch()


def _stream(pid: bytes, count: int, base: int = 0) -> list[tuple[bytes, int, int]]:
    return [(pid, s, (base + s) % N) for s in range(count)]


def test_in_order_records_go_straight_through() -> None:
    r = Recorder()
    r.feed(_stream(b"A" * 8, 100), batch=1)
    assert [s for _, s in r.out] == list(range(100))
    assert r.seq.held_count == 0 and r.seq.gaps == 0 and r.seq.late == 0


def test_records_shuffled_across_partitions_come_out_in_order() -> None:
    rng = random.Random(7)
    pids = [b"A" * 8, b"B" * 8]
    by_part: dict[int, list[Any]] = {p: [] for p in range(N)}
    for pid in pids:
        for rec in _stream(pid, 300, base=rng.randrange(N)):
            by_part[rec[2]].append(rec)
    # Interleave partitions randomly but keep each partition's own order (as Kafka does).
    merged = []
    while any(by_part.values()):
        part = rng.choice([p for p, recs in by_part.items() if recs])
        merged.append(by_part[part].pop(0))
    r = Recorder()
    r.feed(merged, batch=7)
    for pid in pids:
        assert [s for p, s in r.out if p == pid] == list(range(300))
    assert r.seq.held_count == 0 and r.seq.gaps == 0


def test_a_lost_record_is_skipped_as_soon_as_its_partition_moves_on() -> None:
    r = Recorder(wait=60)
    records = [rec for rec in _stream(b"A" * 8, 30) if rec[1] != 10]
    r.feed(records, batch=1)
    assert [s for _, s in r.out] == [s for s in range(30) if s != 10]
    assert r.seq.gaps == 1 and r.seq.held_count == 0


def test_a_missing_record_is_waited_for_at_most_the_bound() -> None:
    r = Recorder(wait=0.05)
    r.feed([(b"A" * 8, 0, 0), (b"A" * 8, 2, 2), (b"A" * 8, 3, 3)], batch=1)
    assert [s for _, s in r.out] == [0]
    assert r.seq.expire(time.monotonic()) is not None
    time.sleep(0.06)
    assert r.seq.expire(time.monotonic()) is None
    assert [s for _, s in r.out] == [0, 2, 3] and r.seq.gaps == 1
    r.feed([(b"A" * 8, 1, 1)], batch=1)  # too late: delivered, counted
    assert [s for _, s in r.out][-1] == 1 and r.seq.late == 1


def test_group_member_gets_its_share_in_order_without_waiting() -> None:
    out: list[Any] = []
    seq = Sequencer(60, 1 << 30, 100_000, lambda item, key, off: out.append(item))
    seq.assign(T, [1, 4])
    for s in range(60):
        part = s % N
        if part in (1, 4):
            seq.add(s, (T, part), s, stamp(b"A" * 8, s, N), 1)
        seq.flush_batch()
    assert out == [s for s in range(60) if s % N in (1, 4)]
    assert seq.held_count == 0 and seq.gaps == 0


def test_forged_and_raw_looking_stamps_cost_their_message_only() -> None:
    r = Recorder(wait=60)
    pid = b"A" * 8
    r.feed(_stream(pid, 10), batch=1)
    key = (T, 0)
    bad = [
        b"\x00msq" + b"short",
        stamp(pid, 11, N),  # seq 11 belongs in partition 5: on partition 0 it does not add up
        stamp(pid, 10 + MAX_AHEAD + 7 * N, N),  # far ahead once
        stamp(pid, 12, 0),  # no rotation
        stamp(pid, 12, 10**9),
    ]
    for forged in bad:
        r.seq.add(("forged", forged), key, 99, forged, 5)
        r.seq.flush_batch()
    assert len([x for x in r.out if x[0] == "forged"]) == len(bad)
    assert r.seq.unordered == len(bad) and r.seq.held_count == 0
    r.feed([(pid, s, s % N) for s in range(10, 20)], batch=1)
    assert [s for p, s in r.out if p == pid] == list(range(20))


def test_held_bytes_are_bounded() -> None:
    r = Recorder(wait=60, max_bytes=100)
    pid = b"A" * 8
    r.feed([(pid, 0, 0)], batch=1)
    for s in range(2, 40):  # seq 1 never comes, and its partition (1) stays quiet
        if s % N != 1:
            r.seq.add((pid, s), (T, s % N), s, stamp(pid, s, N), 10)
    r.seq.flush_batch()
    assert r.seq.held_bytes <= 100
    assert r.seq.gaps >= 1


def test_revoked_partitions_release_their_wait_and_drop_their_held_records() -> None:
    r = Recorder(wait=60)
    pid = b"A" * 8
    r.feed([(pid, 0, 0), (pid, 2, 2), (pid, 3, 3)], batch=1)
    assert (T, 2) in r.seq.pins and (T, 3) in r.seq.pins
    r.seq.revoke([(T, 1), (T, 2)])  # seq 1's partition is gone; seq 2 goes to its new owner
    assert [s for _, s in r.out] == [0, 3]
    assert (T, 2) not in r.seq.pins and r.seq.held_count == 0


def test_many_publisher_ids_do_not_grow_without_bound() -> None:
    r = Recorder(wait=0.001)
    for i in range(6000):
        pid = i.to_bytes(8, "big")
        r.seq.add(i, (T, 3), i, stamp(pid, 3, N), 1)  # each claims seq 3: held as first sight
        r.seq.flush_batch()
        if i % 500 == 0:
            time.sleep(0.002)
            r.seq.expire(time.monotonic())
    time.sleep(0.002)
    r.seq.expire(time.monotonic())
    assert len(r.seq.states) <= 4096
    assert len(r.out) + r.seq.held_count == 6000


# -- chunks ---------------------------------------------------------------------------------


def _chunks(data: bytes, limit: int = 5000) -> list[bytes]:
    return [c for c, _ in split(data, limit, os.urandom(16))]


def test_frames_reassemble_and_malformed_headers_are_dropped() -> None:
    r = Reassembler(max_bytes=1 << 20)
    key = (T, 0)
    data = os.urandom(20_000)
    pieces = list(split(data, 5000, os.urandom(16)))
    got = None
    for offset, (chunk, headers) in enumerate(pieces):
        got = r.add(key, offset, headers[0][1], chunk)
    assert got == (data, 0) and r.nbytes == 0 and not r.partial
    fid = os.urandom(16)
    bad = [
        b"x" * 7,
        CHUNK_STRUCT.pack(fid, 0, 1, 10),  # one chunk is no split frame
        CHUNK_STRUCT.pack(fid, 0, 3, 10**9),  # 1 GB claimed by a 100-byte chunk
        CHUNK_STRUCT.pack(fid, 0, 3, 1 << 30),  # over the bound
    ]
    for header in bad:
        assert r.add(key, 9, header, b"y" * 100) is None
    assert r.dropped == len(bad) and r.nbytes == 0 and not r.partial


def test_forged_first_chunks_are_bounded_in_bytes_and_count() -> None:
    r = Reassembler(max_bytes=10 * 100_000)
    for i in range(300):
        fid = os.urandom(16)
        header = CHUNK_STRUCT.pack(fid, 0, 10, 10 * 100_000)
        r.add((T, i % 3), i, header, b"z" * 100_000)
    assert r.nbytes <= 10 * 100_000
    assert sum(len(f) for f in r.partial.values()) <= 3 * MAX_OPEN_FRAMES
    assert r.dropped >= 290
    # A real frame still goes through.
    data = os.urandom(300_000)
    pieces = list(split(data, 100_000 + 200, os.urandom(16)))
    got = None
    for offset, (chunk, headers) in enumerate(pieces):
        got = r.add((T, 0), 1000 + offset, headers[0][1], chunk)
    assert got is not None and got[0] == data


def test_a_chunk_of_the_wrong_size_drops_its_frame() -> None:
    r = Reassembler(max_bytes=1 << 20)
    fid = os.urandom(16)
    assert r.add((T, 0), 0, CHUNK_STRUCT.pack(fid, 0, 3, 250), b"a" * 100) is None
    assert r.add((T, 0), 1, CHUNK_STRUCT.pack(fid, 1, 3, 250), b"b" * 99) is None
    assert r.dropped == 1 and not r.partial


def test_a_publisher_first_seen_mid_stream_waits_briefly_for_what_may_precede() -> None:
    r = Recorder(wait=5.0)
    pid = b"M" * 8
    r.seq.now = time.monotonic()
    r.seq.add((pid, 100), (T, 100 % N), 0, stamp(pid, 100, N), 1)
    r.seq.flush_batch()
    assert r.out == []  # 95..99 may still come from the other partitions
    r.seq.add((pid, 98), (T, 98 % N), 0, stamp(pid, 98, N), 1)
    assert r.out == []
    time.sleep(FIRST_WAIT + 0.05)
    r.seq.expire(time.monotonic())  # not the full 5 s: most likely before where we started
    assert [s for _, s in r.out] == [98, 100]
    assert r.seq.gaps == 0  # what came before the first one seen is no gap
