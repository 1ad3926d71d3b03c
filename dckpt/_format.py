"""The on-disk manifest: data model, canonical JSON encoding, and strict validation.

``docs/format.md`` is the specification; this module is its reference implementation.
Validation is strict because a manifest is untrusted input: every field is type- and
range-checked and every file name must stay inside the checkpoint before anything
else touches the storage. Version 2's layout entries are checked here arithmetically
(O(manifest)); the tables that hold their pieces are checked when read (``_table``).
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dckpt import _manifest_checks as rules
from dckpt._errors import CorruptCheckpointError, UnsafeCheckpointError
from dckpt._layout import Layout, MeshRecord, check_layout, parse_placement
from dckpt._values import JSON

FORMAT_NAME = "dckpt"
FORMAT_VERSION = 2  # the newest this reader understands; writers emit 1 without layouts
LAYOUT_VERSION = 2  # the first version with layout entries, meshes and tables
MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
CHECKSUM_ALGORITHM = "crc32c"
DEFAULT_BLOCK_BYTES = 1 << 20
ALIGNMENT = 64
MAX_MANIFEST_BYTES = 1 << 30

# dtype name -> bytes per element. Names are torch's without the "torch." prefix.
DTYPE_ITEMSIZE: Mapping[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
}  # fmt: skip

PathPart = str | int
# Used with fullmatch: "$" would also match before a trailing newline.
_SAVE_ID = re.compile(r"[0-9a-z]{1,64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
# _FILE_NAME without "." and ".." components: names it takes pass every rule below.
_SAFE_NAME = re.compile(r"(?!\.\.?(?:/|\Z))[A-Za-z0-9._-]+(?:/(?!\.\.?(?:/|\Z))[A-Za-z0-9._-]+)*")
_RANK_KEY = re.compile(r"0|[1-9][0-9]*")  # int() would also take " 1", "01" and "\u0661"


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """One stored piece of a tensor: a box of the global tensor as C-order bytes in a file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    nbytes: int
    crc32c: tuple[int, ...]
    rank: int | None = None  # set only for per-rank tensors


@dataclass(frozen=True, slots=True)
class TensorEntry:
    path: tuple[PathPart, ...]
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[ChunkRecord, ...]
    per_rank: bool = False
    layout: Layout | None = None  # a layout entry (version 2): its chunks are in tables

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


@dataclass(frozen=True, slots=True)
class ValueEntry:
    path: tuple[PathPart, ...]
    value: JSON = None
    per_rank: Mapping[int, JSON] | None = None  # rank -> value, when ranks disagreed


@dataclass(frozen=True, slots=True)
class FileRecord:
    name: str
    size: int


@dataclass(frozen=True, slots=True)
class TableRecord:
    """A writer's binary table (version 2): where its layout shards are, and their checksums."""

    rank: int
    name: str
    size: int
    crc32c: int
    files: tuple[str, ...]  # the data files its rows index


@dataclass(frozen=True, slots=True)
class Manifest:
    save_id: str
    world_size: int
    created: float
    files: tuple[FileRecord, ...]
    tensors: Mapping[str, TensorEntry]
    values: Mapping[str, ValueEntry]
    block_bytes: int = DEFAULT_BLOCK_BYTES
    library: str = ""
    version: int = 1
    meshes: tuple[MeshRecord, ...] = ()
    tables: tuple[TableRecord, ...] = ()
    file_sizes: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "file_sizes", {f.name: f.size for f in self.files})

    def keys(self) -> list[str]:
        return sorted([*self.tensors, *self.values])

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def data_dir(save_id: str) -> str:
    return f"{DATA_DIR}/{save_id}"


def block_count(nbytes: int, block_bytes: int) -> int:
    return max(1, -(-nbytes // block_bytes))


def align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


# --------------------------------------------------------------------------- decoding


class _Bad(Exception):
    pass


def manifest_from_bytes(data: bytes, *, source: str) -> Manifest:
    """Parse and validate a manifest; every problem is a CheckpointError naming ``source``."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(f"{source}: manifest is {len(data)} bytes, over the limit")
    try:
        raw = rules.strict_json(data.decode("utf-8"))
    except rules.StrictJSONError as exc:
        raise CorruptCheckpointError(f"{source}: invalid manifest: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{source}: manifest is not valid JSON ({exc})") from None
    try:
        return _manifest_from_json(raw)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{source}: {exc}") from None
    except CorruptCheckpointError as exc:  # a malformed value, named by the value decoder
        raise CorruptCheckpointError(f"{source}: invalid manifest: {exc}") from None
    except (_Bad, KeyError, TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{source}: invalid manifest: {_describe(exc)}") from None


def _describe(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    return str(exc)


def _obj(x: object, what: str) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise _Bad(f"{what} must be an object")
    return x


def _int(x: object, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or not lo <= x <= hi:
        raise _Bad(f"{what} must be an integer in [{lo}, {hi}], got {x!r}")
    return x


def _ints(x: object, what: str, lo: int = 0, max_len: int = 64) -> tuple[int, ...]:
    if not isinstance(x, list) or len(x) > max_len:
        raise _Bad(f"{what} must be a list of at most {max_len} integers")
    # Manifests hold hundreds of thousands of these: a plain loop, 2-3x faster than all().
    for v in x:
        if type(v) is not int or not lo <= v <= 1 << 62:
            return tuple(_int(v, what, lo) for v in x)
    return tuple(x)


def _path(x: object, key: str) -> tuple[PathPart, ...]:
    if not isinstance(x, list) or not x:
        raise _Bad(f"key {key!r}: path must be a non-empty list")
    for p in x:
        if isinstance(p, bool) or not isinstance(p, (str, int)):
            raise _Bad(f"key {key!r}: path parts must be strings or integers")
    if ".".join(map(str, x)) != key:
        raise _Bad(f"key {key!r}: path {x!r} does not spell the key")
    return tuple(x)


def check_file_name(name: object) -> str:
    """A data file name MUST be relative, normalised and inside the checkpoint."""
    if isinstance(name, str) and _SAFE_NAME.fullmatch(name) and name != MANIFEST_NAME:
        return name  # the common case in one match: a manifest lists a file or two per rank
    if (
        not isinstance(name, str)
        or not _FILE_NAME.fullmatch(name)
        or posixpath.normpath(name) != name
        or any(part in (".", "..") for part in name.split("/"))
        or name == MANIFEST_NAME
    ):
        raise UnsafeCheckpointError(
            f"data file name {name!r} is not a plain relative path inside the checkpoint; "
            "refusing to open it"
        )
    return name


def _manifest_from_json(raw: object) -> Manifest:
    d = _obj(raw, "manifest")
    if d.get("format") != FORMAT_NAME:
        raise _Bad(f"format is {d.get('format')!r}, expected {FORMAT_NAME!r}")
    version = _int(d["version"], "version", 1)
    if version > FORMAT_VERSION:
        raise _Bad(
            f"format version {version} is newer than this dckpt understands "
            f"({FORMAT_VERSION}); upgrade dckpt"
        )
    save_id = d["save_id"]
    if not isinstance(save_id, str) or not _SAVE_ID.fullmatch(save_id):
        raise _Bad(f"save_id {save_id!r} is malformed")
    world_size = _int(d["world_size"], "world_size", 1, 1 << 24)
    created = d.get("created", 0.0)
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        raise _Bad("created must be a number")
    library = d.get("library", "")
    if not isinstance(library, str):
        raise _Bad("library must be a string")
    ck = _obj(d["checksum"], "checksum")
    if ck.get("algorithm") != CHECKSUM_ALGORITHM:
        raise _Bad(f"checksum algorithm {ck.get('algorithm')!r} is not supported")
    block_bytes = _int(ck["block_bytes"], "checksum.block_bytes", 4096, 1 << 30)
    files_raw = d["files"]
    if not isinstance(files_raw, list):
        raise _Bad("files must be a list")
    files: list[FileRecord] = []
    sizes: dict[str, int] = {}
    for f in files_raw:
        fo = _obj(f, "file record")
        name = check_file_name(fo["name"])
        if name in sizes:
            raise _Bad(f"file {name!r} listed twice")
        sizes[name] = _int(fo["size"], f"size of {name!r}")
        files.append(FileRecord(name, sizes[name]))
    meshes: tuple[MeshRecord, ...] = ()
    tables: tuple[TableRecord, ...] = ()
    if version >= LAYOUT_VERSION:
        meshes = tuple(_mesh_from_json(m, world_size) for m in _list(d["meshes"], "meshes"))
        tables = _tables_from_json(d["tables"], sizes, world_size)
    tensors = {
        k: _layout_from_json(k, v, meshes)
        if version >= LAYOUT_VERSION and "layout" in _obj(v, f"tensor {k!r}")
        else _tensor_from_json(k, v, sizes, block_bytes, world_size)
        for k, v in _obj(d["tensors"], "tensors").items()
    }
    layout_problem = rules.layout_files_problem(tensors, tables)
    if layout_problem is not None:
        raise _Bad(layout_problem)
    shared = rules.shared_bytes_problem({k: t.chunks for k, t in tensors.items()})
    if shared is not None:
        raise _Bad(f"{shared}; chunks must not share bytes")
    values: dict[str, ValueEntry] = {}
    for k, v in _obj(d["values"], "values").items():
        if k in tensors:
            raise _Bad(f"key {k!r} is both a tensor and a value")
        vo = _obj(v, f"value {k!r}")
        path = _path(vo["path"], k)
        if "per_rank" in vo:
            pr = _obj(vo["per_rank"], f"value {k!r} per_rank")
            values[k] = ValueEntry(
                path, per_rank={_rank(r, k, world_size): x for r, x in pr.items()}
            )
            for x in pr.values():
                rules.check_value(x, k)
        else:
            values[k] = ValueEntry(path, value=vo["value"])
            rules.check_value(vo["value"], k)
    return Manifest(
        save_id=save_id,
        world_size=world_size,
        created=float(created),
        files=tuple(files),
        tensors=tensors,
        values=values,
        block_bytes=block_bytes,
        library=library,
        version=version,
        meshes=meshes,
        tables=tables,
    )


def _list(x: object, what: str) -> list[Any]:
    if not isinstance(x, list):
        raise _Bad(f"{what} must be a list")
    return x


def _mesh_from_json(raw: object, world_size: int) -> MeshRecord:
    m = _obj(raw, "mesh")
    shape = _ints(m["shape"], "mesh shape", 1, max_len=16)
    ranks = _ints(m["ranks"], "mesh ranks", max_len=world_size)
    if not shape or len(ranks) != math.prod(shape):
        raise _Bad(f"a mesh of shape {list(shape)} lists {len(ranks)} ranks")
    if len(set(ranks)) != len(ranks) or max(ranks) >= world_size:
        raise _Bad(f"mesh ranks must be distinct ranks below world_size {world_size}")
    return MeshRecord(shape, ranks)


def _tables_from_json(
    raw: object, sizes: Mapping[str, int], world_size: int
) -> tuple[TableRecord, ...]:
    tables: list[TableRecord] = []
    owned: set[str] = set()
    for t in _list(raw, "tables"):
        to = _obj(t, "table record")
        rank = _int(to["rank"], "table rank", 0, world_size - 1)
        if tables and rank <= tables[-1].rank:
            raise _Bad(f"table of rank {rank}: tables must be listed once each, by rank")
        name = check_file_name(to["name"])
        if name in sizes:
            raise _Bad(f"table {name!r} is also listed as a data file")
        files = tuple(_list(to["files"], f"files of {name!r}"))
        for f in files:  # listed names were checked: check only the others
            if not isinstance(f, str) or f not in sizes:
                check_file_name(f)
                raise _Bad(f"table {name!r} indexes {f!r}, which files does not list")
            if f in owned:
                raise _Bad(f"table {name!r} indexes {f!r}, which a table lists already")
            owned.add(f)
        size = _int(to["size"], f"size of {name!r}")
        crc = _int(to["crc32c"], f"crc32c of {name!r}", 0, 0xFFFFFFFF)
        tables.append(TableRecord(rank, name, size, crc, files))
    return tuple(tables)


def _layout_from_json(key: str, raw: dict[str, Any], meshes: tuple[MeshRecord, ...]) -> TensorEntry:
    """A layout entry: checked arithmetically here, its rows when a table is read."""
    path = _path(raw["path"], key)
    dtype = raw["dtype"]
    if dtype not in DTYPE_ITEMSIZE:
        raise _Bad(f"key {key!r}: unknown dtype {dtype!r}")
    shape = _ints(raw["shape"], f"key {key!r}: shape")
    if "chunks" in raw or "per_rank" in raw:
        raise _Bad(f"key {key!r}: a layout entry has no chunks and is not per rank")
    lo = _obj(raw["layout"], f"key {key!r}: layout")
    mesh = _int(lo["mesh"], f"key {key!r}: layout mesh", 0, len(meshes) - 1)
    placements = tuple(parse_placement(p) for p in _list(lo["placements"], "placements"))
    try:
        check_layout(shape, meshes[mesh], placements)
    except ValueError as exc:
        raise _Bad(f"key {key!r}: {exc}") from None
    return TensorEntry(path, dtype, shape, (), layout=Layout(mesh, placements))


def _rank(text: str, key: str, world_size: int) -> int:
    if not _RANK_KEY.fullmatch(text):
        raise _Bad(f"value {key!r}: rank {text!r} is not a canonical decimal number")
    return _int(int(text), f"rank of {key!r}", 0, world_size - 1)


def _tensor_from_json(
    key: str, raw: object, sizes: Mapping[str, int], block_bytes: int, world_size: int
) -> TensorEntry:
    t = _obj(raw, f"tensor {key!r}")
    path = _path(t["path"], key)
    dtype = t["dtype"]
    if dtype not in DTYPE_ITEMSIZE:
        raise _Bad(f"key {key!r}: unknown dtype {dtype!r}")
    itemsize = DTYPE_ITEMSIZE[dtype]
    shape = _ints(t["shape"], f"key {key!r}: shape")
    per_rank = t.get("per_rank", False)
    if not isinstance(per_rank, bool):
        raise _Bad(f"key {key!r}: per_rank must be a boolean")
    chunks_raw = t["chunks"]
    if not isinstance(chunks_raw, list):
        raise _Bad(f"key {key!r}: chunks must be a list")
    chunks: list[ChunkRecord] = []
    k = f"key {key!r}: "  # once per tensor, not per chunk: only errors use it
    for c in chunks_raw:
        co = _obj(c, k + "chunk")
        offsets = _ints(co["offsets"], k + "offsets")
        csizes = _ints(co["sizes"], k + "sizes")
        if len(offsets) != len(shape) or len(csizes) != len(shape):
            raise _Bad(f"key {key!r}: chunk rank does not match shape {list(shape)}")
        for o, s, n in zip(offsets, csizes, shape, strict=True):
            if o + s > n:
                raise _Bad(f"key {key!r}: chunk {list(offsets)}+{list(csizes)} exceeds shape")
        name = co["file"]
        if not isinstance(name, str) or name not in sizes:  # listed names were checked
            check_file_name(name)
            raise _Bad(f"key {key!r}: chunk refers to unlisted file {name!r}")
        offset = _int(co["offset"], k + "offset")
        nbytes = _int(co["nbytes"], k + "nbytes")
        if nbytes != math.prod(csizes) * itemsize:
            raise _Bad(f"key {key!r}: nbytes {nbytes} does not match sizes and dtype")
        if offset + nbytes > sizes[name]:
            raise _Bad(f"key {key!r}: chunk bytes run past the end of {name!r}")
        crc_raw = co["crc32c"]
        if not isinstance(crc_raw, list) or len(crc_raw) != block_count(nbytes, block_bytes):
            raise _Bad(f"key {key!r}: expected {block_count(nbytes, block_bytes)} checksums")
        crcs = _ints(crc_raw, k + "crc32c", max_len=len(crc_raw))
        if max(crcs) > 0xFFFFFFFF:
            raise _Bad(f"key {key!r}: crc32c values must fit in 32 bits")
        rank = co.get("rank")
        if per_rank:
            rank = _int(rank, k + "rank", 0, world_size - 1)
        elif rank is not None:
            raise _Bad(f"key {key!r}: only per-rank tensors have a rank field")
        chunks.append(ChunkRecord(offsets, csizes, name, offset, nbytes, crcs, rank))
    # Chunks must tile the tensor exactly: a load then finds every region it asks for, and
    # with unshared bytes (checked across entries) a claimed shape is backed by file bytes.
    problem = rules.tiling_problem(shape, chunks)
    if problem is not None:
        raise _Bad(f"key {key!r}: the chunks{problem}")
    return TensorEntry(path, dtype, shape, tuple(chunks), per_rank)
