"""Shared memory between real processes: delivery, groups, killed processes, cleanup."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from _shm_support import Child, domain_files

from msight_core.pubsub.shm import ShmPubSub
from msight_core.testing.conformance import collect

MiB = 1024 * 1024


def _numbers(child: Child, timeout: float = 60.0) -> list[int]:
    return [int(x) for x in json.loads(child.line(timeout))["got"]]


def test_broadcast_to_three_subscriber_processes_in_order(
    domain: str, make: Callable[..., ShmPubSub], spawn: Callable[..., Child]
) -> None:
    subs = [spawn("sub", domain, "cam.frames", 300).ready() for _ in range(3)]
    pub = make()
    for i in range(300):
        # Small and large messages interleaved: batches and single samples keep one order.
        size = 300_000 if i % 50 == 0 else 64
        pub.publish("cam.frames", b"%d:" % i + bytes(size))
        if i % 10 == 0:
            # Subscribers that keep up lose nothing; flat out on a starved 2-core
            # machine they fall more than MSIGHT_SHM_BUFFER_DEPTH samples behind and
            # lose the oldest by design (test_shm_limits.py tests that).
            time.sleep(0.01)
    pub.flush()
    for sub in subs:
        assert _numbers(sub) == list(range(300))


def test_frames_from_another_process_first_16mb_after_1kb(
    make: Callable[..., ShmPubSub], spawn: Callable[..., Child], domain: str
) -> None:
    sub = make()
    sub.subscribe("cam.big")
    # 1 KB frames first: the publisher's segment starts small and must grow for 16 MB.
    small = spawn("pub", domain, "cam.big", 20, 1024).ready()
    got = [sub.receive(30) for _ in range(20)]
    assert [m.data.split(b":")[0] for m in got if m] == [b"%d" % i for i in range(20)]
    assert all(len(m.data) == 1024 for m in got if m)
    small.proc.wait(30)
    big = spawn("pub", domain, "cam.big", 3, 16 * MiB + 3).ready()
    frames = [sub.receive(30) for _ in range(3)]
    assert [len(m.data) for m in frames if m] == [16 * MiB + 3] * 3
    assert [m.data.split(b":")[0] for m in frames if m] == [b"0", b"1", b"2"]
    big.proc.wait(30)
    assert sub.stats()["dropped"] == {}


def test_a_group_shares_messages_across_processes(
    make: Callable[..., ShmPubSub], spawn: Callable[..., Child], domain: str
) -> None:
    members = [spawn("collect", domain, "det.jobs", 2.0, "workers").ready() for _ in range(2)]
    watcher = make()  # a broadcast subscriber still gets everything
    watcher.subscribe("det.jobs")
    pub = make()
    for i in range(400):
        pub.publish("det.jobs", b"%d:job" % i)
        if i % 100 == 99:
            time.sleep(0.02)
    pub.flush()
    shares = [_numbers(m) for m in members]
    assert sorted(shares[0] + shares[1]) == list(range(400)), "each message to one member"
    assert len(shares[0]) > 50 and len(shares[1]) > 50, [len(s) for s in shares]
    for share in shares:
        assert share == sorted(share), "each member sees its share in order"
    seen = [watcher.receive(10) for _ in range(400)]
    assert [int(m.data.split(b":")[0]) for m in seen if m] == list(range(400))
    assert pub.stats()["group_members"] == 2


def test_a_member_that_leaves_or_is_killed_stops_getting_messages(
    make: Callable[..., ShmPubSub], spawn: Callable[..., Child], domain: str
) -> None:
    local = make(group_id="workers")
    local.subscribe("det.jobs")
    doomed = spawn("collect", domain, "det.jobs", 60, "workers").ready()
    pub = make()
    for i in range(40):
        pub.publish("det.jobs", b"%d:a" % i)
    pub.flush()
    first = [local.receive(10) for _ in range(20)]
    assert all(first) and local.receive(0.3) is None  # the other half went to the child
    doomed.kill()
    # Until the dead process is cleaned up (publisher housekeeping), its share is lost;
    # afterwards every message reaches the live member.
    deadline = time.monotonic() + 20
    streak = 0
    i = 1000
    while time.monotonic() < deadline and streak < 20:
        pub.publish("det.jobs", b"%d:b" % i)
        pub.flush()
        i += 1
        streak = streak + 1 if local.receive(0.2) is not None else 0
    assert streak >= 20, "the killed member kept getting messages"


def test_killed_publisher_and_subscriber_leave_nothing_in_the_way(
    make: Callable[..., ShmPubSub], spawn: Callable[..., Child], domain: str
) -> None:
    sub = make()
    sub.subscribe("cam.k")
    for _ in range(2):  # a killed publisher, then a new one on the same topic
        pub = spawn("pubforever", domain, "cam.k", 2 * MiB).ready()
        assert all(sub.receive(10) is not None for _ in range(10))
        pub.kill()
    holder = spawn("view", domain, "cam.k").ready()
    pub = spawn("pubforever", domain, "cam.k", 2 * MiB).ready()
    assert holder.line() == "held"
    holder.kill()  # killed while holding a sample: the publisher goes on
    assert all(sub.receive(10) is not None for _ in range(20))
    # Every subscriber slot can be taken again (the dead one is cleaned up on the way).
    others = [make() for _ in range(sub.config.max_subscribers - 1)]
    for other in others:
        other.subscribe("cam.k")
    assert all(other.receive(10) is not None for other in others)
    pub.kill()
    for backend in [sub, *others]:
        backend.close()
    fresh = make()
    fresh.subscribe("cam.k")  # a new node removes what the dead ones left
    fresh.close()
    assert domain_files(domain) == []


def test_closing_everything_removes_the_files(domain: str, make: Callable[..., ShmPubSub]) -> None:
    sub, member, pub = make(), make(group_id="g"), make()
    sub.subscribe("a.b")
    member.subscribe("a.b")
    pub.publish("a.b", b"x" * 100)
    pub.publish("a.b", b"y" * (4 * MiB))
    pub.flush()
    assert sub.receive(10) is not None and member.receive(10) is not None
    assert domain_files(domain)
    for backend in (sub, member, pub):
        backend.close()
    assert domain_files(domain) == []


def test_a_member_that_closes_is_skipped_at_once(make: Callable[..., ShmPubSub]) -> None:
    # Room in shared memory for each member's share of the first burst: the member
    # readers share this process's GIL with the publisher, and past buffer_depth
    # the newest samples win (counted; test_shm_limits.py).
    stay, leave = make(group_id="g", buffer_depth=16), make(group_id="g", buffer_depth=16)
    pub = make(buffer_depth=16)
    stay.subscribe("det.q")
    leave.subscribe("det.q")
    for i in range(10):
        pub.publish("det.q", b"%d:big" % i + bytes(100_000))  # single samples, round robin
    # Round robin: 5 each. Waits long for what must come (a loaded machine),
    # briefly for what must not.
    assert len(collect(stay, 5, 20)) == 5 and stay.receive(0.3) is None
    leave.close()
    for i in range(10, 30):
        pub.publish("det.q", b"%d:big" % i + bytes(100_000))
        pub.publish("det.q", b"%d:small" % i)
        time.sleep(0.002)  # paced: the reader thread shares this process's GIL
    pub.flush()
    got = [m.data.split(b":")[0] for m in collect(stay, 40, 20)]
    assert stay.receive(0.3) is None
    assert sorted(set(got), key=int) == [b"%d" % i for i in range(10, 30)] and len(got) == 40
    assert stay.stats()["dropped"] == {}
