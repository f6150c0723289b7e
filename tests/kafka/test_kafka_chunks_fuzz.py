"""Forged and mutated Kafka chunk streams against the reassembler (issue 15).

Hypothesis feeds the reassembler real frames' chunks interleaved with mutated
headers, truncated or swapped chunks, and forged first chunks. Whatever comes,
``add()`` never raises, the bytes it holds stay within its bound, and a real
frame sent after the garbage still comes out whole.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msight_core.pubsub._kafka.chunks import CHUNK_STRUCT, MAX_OPEN_FRAMES, Reassembler, split

BOUND = 400_000
T = "t.fuzz"

real_chunks = [
    (chunk, headers[0][1]) for chunk, headers in split(os.urandom(50_000), 12_000, os.urandom(16))
]

header_values = st.one_of(
    st.binary(max_size=40),
    st.builds(
        CHUNK_STRUCT.pack,
        st.binary(min_size=16, max_size=16),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**64 - 1),
    ),
    st.sampled_from([h for _, h in real_chunks]),
)
records = st.lists(
    st.tuples(
        st.integers(0, 2),  # partition
        header_values,
        st.one_of(
            st.none(), st.binary(max_size=20_000), st.sampled_from([c for c, _ in real_chunks])
        ),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=records)
def test_mutated_chunk_streams_cost_only_themselves(garbage: list) -> None:
    r = Reassembler(max_bytes=BOUND)
    for offset, (part, header, data) in enumerate(garbage):
        r.add((T, part), offset, header, data)  # never raises
        assert r.nbytes <= BOUND
        assert all(len(frames) <= MAX_OPEN_FRAMES for frames in r.partial.values())
    data = os.urandom(70_000)
    got = None
    for i, (chunk, headers) in enumerate(split(data, 15_000, os.urandom(16))):
        got = r.add((T, 0), 10_000 + i, headers[0][1], chunk)
    assert got is not None and got[0] == data
