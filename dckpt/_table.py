"""A writer's binary table (format version 2): where its layout shards are, and their CRCs.

Byte layout (all integers little endian; docs/format.md section 6 is the specification)::

    header   32 bytes   magic b"DCKPTTAB", u32 version (1), u32 rank, u64 rows, u64 crcs
    rows     40 bytes each, sorted by (key id, piece), no two equal:
             u64 key id, u32 piece, u32 file, u64 offset, u64 nbytes, u64 first crc
    crcs     u32 each: the block CRC-32Cs of every row, row after row
    trailer  u32 CRC-32C of every byte before it

A table is untrusted input like the manifest: :func:`check_table` validates all of it
before anything is read through it, and only the tables of the writers a load needs are
read at all (:class:`Tables`).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import crc32c
import numpy as np

from dckpt._errors import CorruptCheckpointError
from dckpt._faults import fault_point
from dckpt._format import ChunkRecord, Manifest, TableRecord, TensorEntry, block_count
from dckpt._layout import is_writer, key_id, overlapping_shards, shard_pieces, writer_coordinate
from dckpt._reshard import Box
from dckpt.storage import Storage

MAGIC = b"DCKPTTAB"
TABLE_VERSION = 1
HEADER = struct.Struct("<8sIIQQ")
ROW = np.dtype(
    [("key", "<u8"), ("piece", "<u4"), ("file", "<u4"),
     ("offset", "<u8"), ("nbytes", "<u8"), ("crc", "<u8")]
)  # fmt: skip
assert HEADER.size == 32 and ROW.itemsize == 40


@dataclass(frozen=True, slots=True)
class Row:
    """One piece of a shard as its writer stored it."""

    key: str
    piece: int
    file: int
    offset: int
    nbytes: int
    crcs: tuple[int, ...]


def table_name(data_dir: str, rank: int) -> str:
    return f"{data_dir}/r{rank}.tab"


def encode_table(rank: int, rows: Sequence[Row]) -> bytes:
    """A table's bytes, rows sorted into the order the format requires."""
    ordered = sorted(rows, key=lambda r: (key_id(r.key), r.piece))
    arr = np.zeros(len(ordered), dtype=ROW)
    crcs: list[int] = []
    for i, r in enumerate(ordered):
        arr[i] = (key_id(r.key), r.piece, r.file, r.offset, r.nbytes, len(crcs))
        crcs.extend(r.crcs)
    body = (
        HEADER.pack(MAGIC, TABLE_VERSION, rank, len(ordered), len(crcs))
        + arr.tobytes()
        + np.asarray(crcs, dtype="<u4").tobytes()
    )
    return body + struct.pack("<I", crc32c.crc32c(body))


def table_crc(data: bytes) -> int:
    """The CRC-32C the manifest lists for a table: its trailer's value."""
    return int(struct.unpack_from("<I", data, len(data) - 4)[0])


def expected_rows(manifest: Manifest, rank: int) -> dict[tuple[int, int], tuple[str, Box]]:
    """(key id, piece) -> (key, box) of every piece ``rank`` must hold in its table: the
    pieces of the shard it writes of each layout tensor whose mesh it is in."""
    out: dict[tuple[int, int], tuple[str, Box]] = {}
    coordinates = [m.coordinate(rank) for m in manifest.meshes]
    for key, t in manifest.tensors.items():
        if t.layout is None:
            continue
        mesh = manifest.meshes[t.layout.mesh]
        coordinate = coordinates[t.layout.mesh]
        if coordinate is None or not is_writer(key, mesh.shape, t.layout.placements, coordinate):
            continue
        kid = key_id(key)
        for piece, box in enumerate(
            shard_pieces(t.shape, mesh.shape, coordinate, t.layout.placements)
        ):
            out[(kid, piece)] = (key, box)
    return out


def check_table(
    manifest: Manifest, record: TableRecord, data: bytes
) -> dict[tuple[str, int], ChunkRecord]:
    """Validate a table completely; (key, piece) -> the chunk it describes."""
    where = f"table {record.name!r} (rank {record.rank})"
    # The manifest holds the CRC of the bytes before the trailer (the trailer's value):
    # the CRC of a whole table, trailer included, is the same constant for every table.
    if len(data) != record.size or crc32c.crc32c(data[:-4]) != record.crc32c:
        raise CorruptCheckpointError(
            f"{where} has {len(data)} bytes or another CRC-32C than the manifest lists; "
            "the table is damaged or was replaced: restore the checkpoint from a copy"
        )
    try:
        return _rows(manifest, record, data)
    except (ValueError, IndexError, struct.error) as exc:
        raise CorruptCheckpointError(f"{where} is invalid: {exc}") from None


def _rows(
    manifest: Manifest, record: TableRecord, data: bytes
) -> dict[tuple[str, int], ChunkRecord]:
    magic, version, rank, nrows, ncrcs = HEADER.unpack_from(data)
    if magic != MAGIC or version != TABLE_VERSION or rank != record.rank:
        raise ValueError(f"bad header (magic {magic!r}, version {version}, rank {rank})")
    if len(data) != HEADER.size + nrows * ROW.itemsize + 4 * ncrcs + 4:
        raise ValueError(f"{nrows} rows and {ncrcs} checksums do not fill {len(data)} bytes")
    if struct.unpack_from("<I", data, len(data) - 4)[0] != crc32c.crc32c(data[:-4]):
        raise ValueError("its trailing CRC-32C does not match")
    rows = np.frombuffer(data, ROW, nrows, HEADER.size).tolist()
    crcs = np.frombuffer(data, "<u4", ncrcs, HEADER.size + nrows * ROW.itemsize).tolist()
    expected = expected_rows(manifest, record.rank)
    if len(rows) != len(expected):
        raise ValueError(f"{len(rows)} rows, the layouts give rank {record.rank} {len(expected)}")
    sizes = [manifest.file_sizes[f] for f in record.files]
    out: dict[tuple[str, int], ChunkRecord] = {}
    spans: list[tuple[int, int, int]] = []
    prior, next_crc = None, 0
    for kid, piece, file, offset, nbytes, first in rows:
        if prior is not None and (kid, piece) <= prior:
            raise ValueError("rows are not sorted by (key id, piece) or repeat one")
        prior = (kid, piece)
        key, box = expected.get((kid, piece), (None, None))
        if key is None or box is None:
            raise ValueError(f"a row names piece {piece} of key id {kid:#x}, not one it writes")
        itemsize = manifest.tensors[key].itemsize
        n = block_count(nbytes, manifest.block_bytes)
        if nbytes != box.numel * itemsize or first != next_crc or file >= len(sizes):
            raise ValueError(f"key {key!r} piece {piece}: wrong nbytes, checksum index or file")
        if offset + nbytes > sizes[file]:
            raise ValueError(f"key {key!r} piece {piece}: bytes run past the end of its file")
        next_crc += n
        spans.append((file, offset, offset + nbytes))
        name = record.files[file]
        out[(key, piece)] = ChunkRecord(
            box.offsets, box.sizes, name, offset, nbytes, tuple(crcs[first : first + n])
        )
    if next_crc != ncrcs:
        raise ValueError(f"rows use {next_crc} checksums, the table holds {ncrcs}")
    _check_unshared(spans, record)
    return out


def _check_unshared(spans: list[tuple[int, int, int]], record: TableRecord) -> None:
    spans = sorted(s for s in spans if s[2] > s[1])
    for (f0, _, end), (f1, start, _) in itertools.pairwise(spans):
        if f0 == f1 and start < end:
            raise ValueError(f"two rows claim byte {start} of {record.files[f0]!r}")


class Tables:
    """The tables of one checkpoint, each read and checked the first time a load needs it."""

    def __init__(self, storage: Storage, manifest: Manifest) -> None:
        self.storage = storage
        self.manifest = manifest
        self._records = {t.rank: t for t in manifest.tables}
        self._read: dict[int, dict[tuple[str, int], ChunkRecord]] = {}

    def chunk(self, rank: int, key: str, piece: int) -> ChunkRecord:
        """Where piece ``piece`` of the shard of ``key`` that ``rank`` wrote is."""
        rows = self.rows(rank)
        found = rows.get((key, piece))
        if found is None:  # check_table proved every expected row is there
            raise CorruptCheckpointError(f"rank {rank}'s table has no piece {piece} of {key!r}")
        return found

    def chunks_for(self, key: str, entry: TensorEntry, want: Box) -> list[ChunkRecord]:
        """The stored pieces of layout tensor ``key`` that hold elements of ``want``: only
        the shards that overlap it are computed, and only their writers' tables read."""
        assert entry.layout is not None
        mesh = self.manifest.meshes[entry.layout.mesh]
        placements = entry.layout.placements
        out = []
        for coordinate, pieces in overlapping_shards(entry.shape, mesh.shape, placements, want):
            writer = mesh.rank_at(writer_coordinate(key, mesh.shape, placements, coordinate))
            for piece, box in enumerate(pieces):
                if box.intersect(want) is not None:
                    out.append(self.chunk(writer, key, piece))
        return out

    def rows(self, rank: int) -> dict[tuple[str, int], ChunkRecord]:
        rows = self._read.get(rank)
        if rows is None:
            rows = self._read[rank] = self._load(rank)
        return rows

    def _load(self, rank: int) -> dict[tuple[str, int], ChunkRecord]:
        record = self._records.get(rank)
        location = self.storage.location
        if record is None:
            if expected_rows(self.manifest, rank):
                raise CorruptCheckpointError(
                    f"{location}: rank {rank} writes layout shards but the manifest lists no "
                    "table for it; the checkpoint is damaged"
                )
            return {}
        fault_point("load.table.read")
        data = self.storage.read_file(record.name, max_bytes=record.size + 1)
        if data is None:
            raise CorruptCheckpointError(
                f"{location}/{record.name} is missing; the checkpoint is damaged"
            )
        return check_table(self.manifest, record, data)
