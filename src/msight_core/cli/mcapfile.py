"""MCAP files for ``msight record``, ``play`` and ``view`` (the ``tools`` extra).

:class:`McapFileWriter` writes a chunked, indexed MCAP file: one channel per
topic, a message index after every chunk, and a summary section (schemas,
channels, statistics, chunk and metadata indexes, summary offsets) on
:meth:`~McapFileWriter.close`. Every record except the chunks is built by the
``mcap`` library's own record classes. Chunk bodies are written here, with
``os.writev`` straight from the received buffers: ``mcap.writer.Writer`` copies
each message four to five times through ``BytesIO`` and tops out at about
180 MB/s of 6 MB frames on one core, below what a recorder has to sustain.

A file that was never closed (the recorder was SIGKILLed, the machine lost
power) has no summary: :func:`read_messages` then reads it record by record and
stops at the first incomplete chunk. A chunk is at most ``chunk_size`` bytes or
:data:`CHUNK_SECONDS` old, so such a file loses at most that much.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import MissingDependencyError

__all__ = [
    "CHUNK_SECONDS",
    "COMPRESSIONS",
    "McapFileWriter",
    "Recorded",
    "RecordingInfo",
    "read_info",
    "read_messages",
]

MiB = 1024 * 1024
#: A chunk is written when it is this old, even if not full (bounds the loss on a crash).
CHUNK_SECONDS = 1.0
COMPRESSIONS = ("none", "lz4", "zstd")
_MAGIC = b"\x89MCAP0\r\n"
_SMALL = 64 * 1024  # messages below this size are copied into one buffer per chunk
_MESSAGE_HEAD = struct.Struct("<BQHIQQ")  # opcode, length, channel, sequence, log, publish
_CHUNK_HEAD = struct.Struct("<BQQQQI")  # opcode, length, start, end, uncompressed size, crc
_IOV_MAX = 512


def _mcap() -> Any:
    try:
        import mcap.records
        import mcap.stream_reader
    except ImportError:
        raise MissingDependencyError("mcap", "tools") from None
    return mcap


def _write_all(fd: int, pieces: list[Any]) -> int:
    """Write every piece to ``fd`` in order (``writev``, resuming partial writes)."""
    total = 0
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    while views:
        batch = views[:_IOV_MAX]
        n = os.writev(fd, batch)
        total += n
        while n and views:
            size = len(views[0])
            if n >= size:
                n -= size
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0
    return total


@dataclass
class _Channel:
    id: int
    topic: str
    count: int = 0
    index: list[tuple[int, int]] = field(default_factory=list)  # (log time, offset) in chunk


class McapFileWriter:
    """A chunked, indexed MCAP file of raw payloads, written as messages arrive.

    Not thread-safe: one writer thread owns it. Blocks on disk writes.

    Args:
        path: file to create (an existing file is replaced).
        compression: ``none``, ``lz4`` or ``zstd`` (per chunk).
        chunk_size: a chunk is written once it holds this many bytes.
        library: the Header record's library string.
        metadata: written as a Metadata record named ``msight``.
        crc: compute each chunk's CRC-32 (readers then detect a damaged chunk);
            costs about 2-10 ms of CPU per 6 MB frame.

    Raises:
        MissingDependencyError: the ``tools`` extra (``mcap``) is not installed.
        OSError: the file cannot be created.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        compression: str = "none",
        chunk_size: int = 4 * MiB,
        library: str = "msight-core",
        metadata: dict[str, str] | None = None,
        crc: bool = True,
    ) -> None:
        mcap = _mcap()
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        self._records = mcap.records
        self._compress = _compressor(compression)
        self._compression = "" if compression == "none" else compression
        self.path = Path(path)
        self.chunk_size = chunk_size
        self.crc = crc
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._offset = 0
        self._schemas: dict[str, Any] = {}
        self._channels: dict[str, _Channel] = {}
        self._channel_records: list[Any] = []
        self._chunk_indexes: list[Any] = []
        self._metadata_indexes: list[Any] = []
        self._pieces: list[Any] = []
        self._small = bytearray()
        self._chunk_bytes = 0
        self._chunk_crc = 0
        self._chunk_start = self._chunk_end = 0
        self._chunk_opened = 0.0
        self.message_count = 0
        self._start_time = self._end_time = 0
        self._closed = False
        self._repeated = 0  # bytes of schema and channel records (repeated in the summary)
        head = self._builder()
        mcap.records.Header(profile="", library=library).write(head)
        self._emit([_MAGIC, head.end()])
        if metadata:
            self._write_metadata("msight", metadata)

    # -- public -------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes in the file so far plus the chunk being built."""
        return self._offset + self._chunk_bytes

    def size_after(self, nbytes: int) -> int:
        """An upper bound of the file's size if a message of ``nbytes`` were added and
        the file closed (for ``--max-size``): data, indexes, summary and footer."""
        channels = len(self._channels) + 1
        chunks = len(self._chunk_indexes) + 1
        pending = sum(len(c.index) for c in self._channels.values()) + 1
        data = self._offset + self._chunk_bytes + 31 + nbytes + 64 + 512  # 512: a new channel
        indexes = 15 * channels + 16 * pending
        summary = self._repeated + 512 + chunks * (80 + 16 * channels) + 60 + 12 * channels
        return data + indexes + summary + 5 * 26 + 13 + 29 + 8 + 40 * len(self._metadata_indexes)

    def add_channel(
        self, topic: str, schema_name: str, message_encoding: str, metadata: dict[str, str]
    ) -> None:
        """Declare ``topic``'s channel (once, before its first message).

        ``schema_name`` (the msight Data type, or ``""``) becomes a Schema record
        without a schema body; the channel is written to the file at once, so a
        file that is never closed still names it.
        """
        schema_id = 0
        if schema_name:
            schema = self._schemas.get(schema_name)
            if schema is None:
                schema = self._records.Schema(
                    id=len(self._schemas) + 1, name=schema_name, encoding="", data=b""
                )
                self._schemas[schema_name] = schema
                b = self._builder()
                schema.write(b)
                self._repeated += b.count
                self._emit([b.end()])
            schema_id = schema.id
        record = self._records.Channel(
            id=len(self._channels) + 1, topic=topic, message_encoding=message_encoding,
            metadata=dict(metadata), schema_id=schema_id,
        )  # fmt: skip
        self._channels[topic] = _Channel(record.id, topic)
        self._channel_records.append(record)
        b = self._builder()
        record.write(b)
        self._repeated += b.count
        self._emit([b.end()])

    def has_channel(self, topic: str) -> bool:
        return topic in self._channels

    def write(self, topic: str, log_time: int, publish_time: int, data: Any) -> None:
        """Add one message (``data`` is kept by reference until its chunk is written)."""
        channel = self._channels[topic]
        if self._chunk_bytes == 0:
            self._chunk_opened = time.monotonic()
            self._chunk_start = log_time
        channel.index.append((log_time, self._chunk_bytes))
        head = _MESSAGE_HEAD.pack(0x05, 22 + len(data), channel.id, channel.count, log_time,
                                  publish_time)  # fmt: skip
        channel.count += 1
        if self.crc:
            self._chunk_crc = zlib.crc32(data, zlib.crc32(head, self._chunk_crc))
        self._small += head
        if len(data) < _SMALL:
            self._small += data
        else:
            self._pieces.append(bytes(self._small))
            self._small = bytearray()
            self._pieces.append(data)
        self._chunk_bytes += len(head) + len(data)
        self._chunk_start = min(self._chunk_start, log_time)
        self._chunk_end = max(self._chunk_end, log_time)
        if self.message_count == 0:
            self._start_time = log_time
        self._start_time = min(self._start_time, log_time)
        self._end_time = max(self._end_time, log_time)
        self.message_count += 1
        if self._chunk_bytes >= self.chunk_size:
            self.flush_chunk()

    def tick(self) -> None:
        """Write the chunk being built if it is :data:`CHUNK_SECONDS` old."""
        if self._chunk_bytes and time.monotonic() - self._chunk_opened >= CHUNK_SECONDS:
            self.flush_chunk()

    def flush_chunk(self) -> None:
        """Write the chunk being built, and its message indexes, to the file."""
        if not self._chunk_bytes:
            return
        if self._small:
            self._pieces.append(bytes(self._small))
            self._small = bytearray()
        records = self._pieces
        size = self._chunk_bytes
        if self._compress is not None:
            records = [self._compress(b"".join(records))]
        body = sum(len(p) for p in records)
        compression = self._compression.encode()
        length = 8 + 8 + 8 + 4 + 4 + len(compression) + 8 + body
        head = _CHUNK_HEAD.pack(0x06, length, self._chunk_start, self._chunk_end, size,
                                self._chunk_crc)  # fmt: skip
        head += struct.pack("<I", len(compression)) + compression + struct.pack("<Q", body)
        chunk_offset = self._offset
        b = self._builder()
        index_offsets = {}
        for channel in self._channels.values():
            if channel.index:
                index_offsets[channel.id] = chunk_offset + 9 + length + b.count
                self._records.MessageIndex(channel_id=channel.id, records=channel.index).write(b)
                channel.index = []
        indexes = b.end()
        self._emit([head, *records, indexes])
        self._chunk_indexes.append(
            self._records.ChunkIndex(
                message_start_time=self._chunk_start, message_end_time=self._chunk_end,
                chunk_start_offset=chunk_offset, chunk_length=9 + length,
                message_index_offsets=index_offsets, message_index_length=len(indexes),
                compression=self._compression, compressed_size=body, uncompressed_size=size,
            )
        )  # fmt: skip
        self._pieces = []
        self._chunk_bytes = 0
        self._chunk_crc = 0
        self._chunk_start = self._chunk_end = 0

    def close(self) -> None:
        """Write the last chunk, the summary section and the footer; close the file.

        Idempotent. Blocks on the disk.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.flush_chunk()
            self._finish()
        finally:
            os.close(self._fd)

    # -- internals ------------------------------------------------------------------

    def _builder(self) -> Any:
        from mcap.data_stream import RecordBuilder

        return RecordBuilder()

    def _emit(self, pieces: list[Any]) -> None:
        self._offset += _write_all(self._fd, pieces)

    def _write_metadata(self, name: str, metadata: dict[str, str]) -> None:
        b = self._builder()
        self._records.Metadata(name=name, metadata=metadata).write(b)
        data = b.end()
        self._metadata_indexes.append(
            self._records.MetadataIndex(offset=self._offset, length=len(data), name=name)
        )
        self._emit([data])

    def _finish(self) -> None:
        r = self._records
        b = self._builder()
        r.DataEnd(data_section_crc=0).write(b)
        self._emit([b.end()])
        summary_start = self._offset
        b = self._builder()
        offsets = []
        stats = r.Statistics(
            message_count=self.message_count, schema_count=len(self._schemas),
            channel_count=len(self._channels), attachment_count=0,
            metadata_count=len(self._metadata_indexes), chunk_count=len(self._chunk_indexes),
            message_start_time=self._start_time, message_end_time=self._end_time,
            channel_message_counts={c.id: c.count for c in self._channels.values()},
        )  # fmt: skip
        groups: list[tuple[int, Iterable[Any]]] = [
            (0x03, self._schemas.values()),
            (0x04, self._channel_records),
            (0x0B, [stats]),
            (0x08, self._chunk_indexes),
            (0x0D, self._metadata_indexes),
        ]
        for opcode, records in groups:
            start = b.count
            for record in records:
                record.write(b)
            if b.count > start:
                offsets.append(r.SummaryOffset(opcode, summary_start + start, b.count - start))
        offset_start = summary_start + b.count
        for offset in offsets:
            offset.write(b)
        summary = b.end()
        crc = zlib.crc32(summary)
        crc = zlib.crc32(struct.pack("<BQQQ", 0x02, 20, summary_start, offset_start), crc)
        b = self._builder()
        r.Footer(summary_start=summary_start, summary_offset_start=offset_start,
                 summary_crc=crc).write(b)  # fmt: skip
        self._emit([summary, b.end(), _MAGIC])


def _compressor(name: str) -> Any:
    if name == "none":
        return None
    if name == "zstd":
        try:
            import zstandard
        except ImportError:
            raise MissingDependencyError("zstandard", "tools") from None
        return zstandard.ZstdCompressor(level=1).compress
    try:
        import lz4.frame
    except ImportError:
        raise MissingDependencyError("lz4", "tools") from None
    return lz4.frame.compress


# --------------------------------------------------------------------------- reading


class Recorded(NamedTuple):
    """One recorded message."""

    topic: str
    log_time: int
    publish_time: int
    data: bytes
    data_type: str  # the msight Data type of the topic's channel, "" if none


@dataclass(frozen=True)
class RecordingInfo:
    """What the summary of a file says (``complete`` is False for an unclosed file)."""

    path: Path
    complete: bool
    message_count: int | None
    start_time: int | None
    end_time: int | None
    topics: dict[str, str]  # topic -> Data type ("" when not msight Data)


def read_info(path: str | os.PathLike[str]) -> RecordingInfo:
    """The summary of a recording, or ``complete=False`` when it has none.

    Raises:
        MissingDependencyError: the ``tools`` extra is not installed.
        OSError: the file cannot be read.
        ValueError: not an MCAP file.
    """
    _mcap()
    from mcap.exceptions import McapError
    from mcap.reader import make_reader

    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(len(_MAGIC))
        if head != _MAGIC:
            raise ValueError(f"{path} is not an MCAP file")
        f.seek(0)
        try:
            summary = make_reader(f).get_summary()
        except (McapError, struct.error, ValueError, OSError, EOFError):
            summary = None
    if summary is None or summary.statistics is None:
        return RecordingInfo(path, False, None, None, None, {})
    schemas = {s.id: s.name for s in summary.schemas.values()}
    topics = {c.topic: schemas.get(c.schema_id, "") for c in summary.channels.values()}
    st = summary.statistics
    return RecordingInfo(path, True, st.message_count, st.message_start_time,
                         st.message_end_time, topics)  # fmt: skip


def read_messages(
    path: str | os.PathLike[str], topics: Iterable[str] | None = None
) -> Iterator[Recorded]:
    """The messages of a recording, in log time order (file order if unclosed).

    A file without a summary (never closed) is read record by record up to its
    last complete chunk; what follows is ignored.

    Raises:
        MissingDependencyError: the ``tools`` extra is not installed.
        OSError: the file cannot be read.
        ValueError: not an MCAP file.
    """
    wanted = None if topics is None else set(topics)
    info = read_info(path)
    if info.complete:
        yield from _indexed(info.path, wanted)
    else:
        yield from _recover(info.path, wanted)


def _indexed(path: Path, wanted: set[str] | None) -> Iterator[Recorded]:
    from mcap.reader import make_reader

    with open(path, "rb") as f:
        reader = make_reader(f)
        for schema, channel, message in reader.iter_messages(topics=wanted, log_time_order=True):
            yield Recorded(channel.topic, message.log_time, message.publish_time, message.data,
                           schema.name if schema is not None else "")  # fmt: skip


def _recover(path: Path, wanted: set[str] | None) -> Iterator[Recorded]:
    mcap = _mcap()
    rec = mcap.records
    schemas: dict[int, str] = {}
    channels: dict[int, tuple[str, int]] = {}
    with open(path, "rb") as f:
        reader = mcap.stream_reader.StreamReader(f, emit_chunks=True)
        try:
            for record in reader.records:
                if isinstance(record, rec.Chunk):
                    if not record.compression and len(record.data) != record.uncompressed_size:
                        return  # cut short: the last chunk was being written
                    inner = mcap.stream_reader.breakup_chunk(record, validate_crc=True)
                else:
                    inner = [record]
                for r in inner:
                    if isinstance(r, rec.Schema):
                        schemas[r.id] = r.name
                    elif isinstance(r, rec.Channel):
                        channels[r.id] = (r.topic, r.schema_id)
                    elif isinstance(r, rec.Message) and r.channel_id in channels:
                        topic, schema_id = channels[r.channel_id]
                        if wanted is None or topic in wanted:
                            yield Recorded(topic, r.log_time, r.publish_time, r.data,
                                           schemas.get(schema_id, ""))  # fmt: skip
                if isinstance(record, (rec.DataEnd, rec.Footer)):
                    return
        except OSError:
            raise
        except Exception:  # noqa: BLE001 - anything at the torn end of an unclosed file
            return  # (mcap, struct, zstandard and lz4 each raise their own errors there)
