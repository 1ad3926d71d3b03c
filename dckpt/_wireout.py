"""Compact encodings of rank 0's answers in a save's plan exchange and of each rank's
write results; see :mod:`dckpt._wire` for the encoding and its checks."""

from __future__ import annotations

import itertools
import operator
import sys
from collections.abc import Sequence

from dckpt._layout import LayoutReport, MeshReport
from dckpt._owned import check_ranges
from dckpt._plan import FilePlan, FileResult, OwnReport, RankPlan, RankWritten, WriteItem
from dckpt._plancache import RESEND as RESEND_NOTE
from dckpt._plancache import Answer, Reuse
from dckpt._reshard import Box
from dckpt._wire import (
    PLAN,
    RESEND,
    RESULTS,
    REUSE,
    WRITTEN,
    check_fields,
    dump,
    entries_in,
    entries_out,
    ints,
    load,
    malformed,
    strs,
    unints,
)

# ---------------------------------------------------------------------------- answers

_PLAN_FIELDS = ("save_id", "rank", "files")
_FILE_FIELDS = ("name", "items", "size")
_ITEM_FIELDS = ("key", "box", "offset", "nbytes", "per_rank")
_RESULT_FIELDS = ("name", "size", "crcs")


def encode_answer(answer: Answer | str) -> bytes:
    """Rank 0's answer to one rank: its plan, a reuse note, or :data:`RESEND`."""
    if isinstance(answer, str):
        return dump(RESEND, [])
    if isinstance(answer, Reuse):
        return dump(REUSE, [answer.serial, answer.save_id])
    serial, plan, own = answer
    check_fields(plan, _PLAN_FIELDS)
    files: list[object] = []
    columns: list[bytes] = []
    for fp in plan.files:
        check_fields(fp, _FILE_FIELDS)
        meta: list[int] = []  # per item: ndim, offset, nbytes, per_rank
        boxes: list[int] = []
        for i in fp.items:
            meta += (len(i.box.sizes), i.offset, i.nbytes, i.per_rank)
            boxes += i.box.offsets
            boxes += i.box.sizes
        files.append([fp.name, fp.size, [i.key for i in fp.items]])
        columns += (ints(meta), ints(boxes))
    if plan.files:
        check_fields(plan.files[0].items[0] if plan.files[0].items else None, _ITEM_FIELDS)
    return dump(PLAN, [serial, plan.save_id, files], *columns, ints(own))


def encode_answers(answers: Sequence[Answer]) -> list[bytes]:
    """Every rank's answer; the reuse note that most ranks get is encoded once."""
    notes: dict[Reuse, bytes] = {}
    out = []
    for a in answers:
        if isinstance(a, Reuse):
            out.append(notes.get(a) or notes.setdefault(a, encode_answer(a)))
        else:
            out.append(encode_answer(a))
    return out


def decode_answer(blob: bytes, rank: int) -> Answer | str:
    """Inverse of :func:`encode_answer`, on the rank it was meant for."""
    tag, header, columns = load(blob, 0, "plan answer")
    try:
        if tag == RESEND and not header and not columns:
            return RESEND_NOTE
        if tag == REUSE and len(header) == 2 and not columns:
            if type(header[0]) is not int or type(header[1]) is not str:
                raise ValueError("a reuse note is not [serial, save id]")
            return Reuse(header[0], header[1])
        if tag != PLAN or len(header) != 3 or type(header[0]) is not int:
            raise ValueError("not a plan answer")
        serial, save_id, files = header
        if (
            type(save_id) is not str
            or type(files) is not list
            or len(columns) != 2 * len(files) + 1
        ):
            raise ValueError("the files do not match their columns")
        plans = tuple(_file_in(f, columns[2 * i], columns[2 * i + 1]) for i, f in enumerate(files))
        own = tuple(unints(columns[-1]))
        check_ranges(own, sys.maxsize)  # the rank checks them against its offer
        return serial, RankPlan(save_id, rank, plans), own
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise malformed(0, "plan answer", exc) from None


def _file_in(raw: object, meta_raw: bytes, boxes_raw: bytes) -> FilePlan:
    if type(raw) is not list or len(raw) != 3 or type(raw[0]) is not str:
        raise ValueError("a file plan is not [name, size, keys]")
    name, size, keys = raw
    keys = strs(keys)
    meta, boxes = unints(meta_raw), unints(boxes_raw)
    if type(size) is not int or len(meta) != 4 * len(keys):
        raise ValueError(f"file plan {name!r} has mismatched columns")
    items = []
    b = 0
    boxed: dict[tuple[int, ...], Box] = {}  # boxes repeat (equal shapes): made once
    for key, nd, offset, nbytes, per_rank in zip(
        keys, meta[0::4], meta[1::4], meta[2::4], meta[3::4], strict=True
    ):
        if nd < 0 or offset < 0 or nbytes < 0 or per_rank not in (0, 1):
            raise ValueError(f"file plan {name!r} item {key!r} is out of range")
        flat = tuple(boxes[b : b + 2 * nd])
        b += 2 * nd
        box = boxed.get(flat) or boxed.setdefault(flat, Box(flat[:nd], flat[nd:]))
        items.append(WriteItem(key, box, offset, nbytes, per_rank == 1))
    if b != len(boxes):
        raise ValueError(f"file plan {name!r} has mismatched columns")
    return FilePlan(name, tuple(items), size)


# ---------------------------------------------------------------------------- results


def encode_results(results: Sequence[FileResult]) -> bytes:
    """What a rank reports after writing its files."""
    header, columns = _results_out(results)
    return dump(RESULTS, header, *columns)


def _results_out(results: Sequence[FileResult]) -> tuple[list[object], list[bytes]]:
    header: list[object] = []
    columns: list[bytes] = []
    for r in results:
        check_fields(r, _RESULT_FIELDS)
        header.append([r.name, r.size])
        columns += (ints(map(len, r.crcs)), ints(itertools.chain.from_iterable(r.crcs)))
    return header, columns


def decode_results(blob: bytes, rank: int) -> list[FileResult]:
    """Inverse of :func:`encode_results`, for rank ``rank``'s report."""
    tag, header, columns = load(blob, rank, "write results")
    try:
        if tag != RESULTS or len(columns) != 2 * len(header):
            raise ValueError("not a write report")
        return _results_in(header, columns)
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise malformed(rank, "write results", exc) from None


def _results_in(header: list[object], columns: list[bytes]) -> list[FileResult]:
    return [_result_in(h, columns[2 * i], columns[2 * i + 1]) for i, h in enumerate(header)]


_WRITTEN_FIELDS = ("files", "layouts", "own")
_OWN_FIELDS = ("text", "starts", "files")
_REPORT_FIELDS = ("rank", "meshes", "entries", "files", "table")


def encode_written(written: RankWritten) -> bytes:
    """A rank's report after writing: its files' results and its layouts' report."""
    check_fields(written, _WRITTEN_FIELDS)
    header, columns = _results_out(written.files)
    report = written.layouts
    check_fields(report, _REPORT_FIELDS)
    layouts = None
    if report is not None:
        meshes = [[m.ident.hex(), m.shape, m.position, m.entries.hex()] for m in report.meshes]
        files = [list(f) for f in report.files]
        table = None if report.table is None else list(report.table)
        layouts = [report.rank, meshes, entries_out(report.entries), files, table]
    own = written.own
    check_fields(own, _OWN_FIELDS)
    if own is None:
        return dump(WRITTEN, [header, layouts, None], *columns)
    # The entries' text travels as bytes: as a JSON string every quote in it is escaped.
    own_files = [list(f) for f in own.files]
    return dump(WRITTEN, [header, layouts, own_files], *columns, _ascii(own.text), ints(own.starts))


def decode_written(blob: bytes, rank: int) -> RankWritten:
    """Inverse of :func:`encode_written`, for rank ``rank``'s report."""
    tag, header, columns = load(blob, rank, "write report")
    try:
        if tag != WRITTEN or len(header) != 3 or type(header[0]) is not list:
            raise ValueError("not a write report")
        extra = 0 if header[2] is None else 2
        if len(columns) != 2 * len(header[0]) + extra:
            raise ValueError("the file results do not match their columns")
        files = tuple(_results_in(header[0], columns[: 2 * len(header[0])]))
        layouts = None if header[1] is None else _report_in(header[1])
        own = None if header[2] is None else _own_in(header[2], *columns[-2:])
        return RankWritten(files, layouts, own)
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise malformed(rank, "write report", exc) from None


def _own_in(raw: object, text: bytes, starts_raw: bytes) -> OwnReport:
    if type(raw) is not list or any(type(f) is not list or len(f) != 2 for f in raw):
        raise ValueError("the own files are not a list of [name, size]")
    starts = tuple(unints(starts_raw))
    # At C speed: one start per tensor, 20k per rank at 20k tensors.
    rising = all(map(operator.lt, starts, starts[1:]))
    if not rising or (starts and starts[-1] >= len(text)):
        raise ValueError("the own entries' starts are not increasing positions in their text")
    files = tuple((_name(n), _size(s)) for n, s in raw)
    if not text.isascii():
        raise ValueError("the own entries' text is not ASCII")
    return OwnReport(text, starts, files)


def _report_in(raw: object) -> LayoutReport:
    if type(raw) is not list or len(raw) != 5 or type(raw[0]) is not int:
        raise ValueError("a layout report is not [rank, meshes, entries, files, table]")
    rank, meshes, entries, files, table = raw
    if type(meshes) is not list or type(files) is not list:
        raise ValueError("a layout report's meshes or files are not lists")
    mesh_reports = tuple(
        MeshReport(bytes.fromhex(ident), _ints(shape), position, bytes.fromhex(digest))
        for ident, shape, position, digest in meshes
        if type(position) is int
    )
    if len(mesh_reports) != len(meshes):
        raise ValueError("a mesh position is not an integer")
    named = tuple((_name(n), _size(s)) for n, s in files)
    if table is not None:
        name, size, crc = table
        table = (_name(name), _size(size), _size(crc))
    return LayoutReport(rank, mesh_reports, entries_in(entries, len(meshes)), named, table)


def _ints(raw: object) -> tuple[int, ...]:
    if type(raw) is not list or any(type(n) is not int or n < 0 for n in raw):
        raise ValueError("a shape is not a list of sizes")
    return tuple(raw)


def _name(raw: object) -> str:
    if type(raw) is not str:
        raise ValueError("a file name is not a string")
    return raw


def _size(raw: object) -> int:
    if type(raw) is not int or raw < 0:
        raise ValueError("a size is not a non-negative integer")
    return raw


def _result_in(raw: object, counts_raw: bytes, flat_raw: bytes) -> FileResult:
    if type(raw) is not list or len(raw) != 2 or type(raw[0]) is not str:
        raise ValueError("a file result is not [name, size]")
    if type(raw[1]) is not int or raw[1] < 0:
        raise ValueError(f"file {raw[0]!r} has a bad size")
    counts, flat = unints(counts_raw), unints(flat_raw)
    crcs = []
    pos = 0
    for n in counts:
        if n < 0:
            raise ValueError(f"file {raw[0]!r} has a negative checksum count")
        crcs.append(tuple(flat[pos : pos + n]))
        pos += n
    if pos != len(flat):
        raise ValueError(f"file {raw[0]!r} has mismatched checksum columns")
    return FileResult(raw[0], raw[1], tuple(crcs))


def _ascii(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("ascii")
