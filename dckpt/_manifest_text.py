"""Writing a manifest: the canonical JSON text that docs/format.md specifies.

Writers emit sorted keys, no insignificant whitespace and a trailing newline; the
per-plan template (``_plan.manifest_template``) renders the same text from pieces, so
its pieces are defined once here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from dckpt._format import (
    CHECKSUM_ALGORITHM,
    FORMAT_NAME,
    LAYOUT_VERSION,
    ChunkRecord,
    Manifest,
    PathPart,
    TensorEntry,
)
from dckpt._layout import Layout, placement_text


def manifest_to_json(m: Manifest) -> dict[str, Any]:
    tensors: dict[str, Any] = {}
    for key, t in m.tensors.items():
        entry: dict[str, Any] = {"path": list(t.path), "dtype": t.dtype, "shape": list(t.shape)}
        if t.layout is not None:
            entry["layout"] = layout_json(t.layout)
        else:
            entry["chunks"] = [_chunk_to_json(c) for c in t.chunks]
        if t.per_rank:
            entry["per_rank"] = True
        tensors[key] = entry
    values: dict[str, Any] = {}
    for key, v in m.values.items():
        if v.per_rank is not None:
            values[key] = {
                "path": list(v.path),
                "per_rank": {str(r): x for r, x in v.per_rank.items()},
            }
        else:
            values[key] = {"path": list(v.path), "value": v.value}
    out: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": m.version,
        "library": m.library,
        "save_id": m.save_id,
        "world_size": m.world_size,
        "created": m.created,
        "checksum": {"algorithm": CHECKSUM_ALGORITHM, "block_bytes": m.block_bytes},
        "files": [{"name": f.name, "size": f.size} for f in m.files],
        "tensors": tensors,
        "values": values,
    }
    if m.version >= LAYOUT_VERSION:
        out["meshes"] = [{"shape": list(x.shape), "ranks": list(x.ranks)} for x in m.meshes]
        out["tables"] = [
            {"rank": t.rank, "name": t.name, "size": t.size, "crc32c": t.crc32c,
             "files": list(t.files)}
            for t in m.tables
        ]  # fmt: skip
    return out


def layout_json(layout: Layout) -> dict[str, Any]:
    return {"mesh": layout.mesh, "placements": [placement_text(p) for p in layout.placements]}


def _chunk_to_json(c: ChunkRecord) -> dict[str, Any]:
    d: dict[str, Any] = {
        "offsets": list(c.offsets),
        "sizes": list(c.sizes),
        "file": c.file,
        "offset": c.offset,
        "nbytes": c.nbytes,
        "crc32c": list(c.crc32c),
    }
    if c.rank is not None:
        d["rank"] = c.rank
    return d


def manifest_to_bytes(m: Manifest) -> bytes:
    """Canonical encoding: sorted keys, no whitespace, ASCII-escaped, trailing newline.

    Equivalent to ``json.dumps(manifest_to_json(m), sort_keys=True, separators=(",", ":"))``
    (a test holds them equal), but written out by hand for tensor entries, which can number
    in the hundreds of thousands.
    """
    names: dict[str, str] = {}
    parts = [f"{json_str(key)}:{_tensor_text(t, names)}" for key, t in sorted(m.tensors.items())]
    return assemble(m, [",".join(parts)])


def assemble(m: Manifest, tensors_texts: Sequence[str | bytes]) -> bytes:
    """The canonical manifest of ``m`` with its tensors given as encoded text: the
    comma-joined entries, in pieces (ASCII text or bytes) joined here. At 100k tensors
    they are tens of MB, on machines that copy ~1 GB/s: bytes are copied once."""
    head = dataclasses.replace(m, tensors={})
    head_text = _dumps(manifest_to_json(head))
    before, marker, after = head_text.partition('"tensors":{}')
    assert marker
    parts = [before, '"tensors":{', *tensors_texts, "}", after, "\n"]
    return b"".join(p if type(p) is bytes else p.encode("ascii") for p in parts)  # type: ignore[union-attr]


def _dumps(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


# json.dumps(str) with ensure_ascii, without the encoder set-up per call
json_str = json.encoder.encode_basestring_ascii


def path_text(path: tuple[PathPart, ...]) -> str:
    try:  # the common case: every part is a string
        return "[" + ",".join(map(json_str, path)) + "]"  # type: ignore[arg-type]
    except TypeError:
        return (
            "[" + ",".join(json_str(p) if isinstance(p, str) else str(int(p)) for p in path) + "]"
        )


def ints_text(xs: tuple[int, ...]) -> str:
    return "[" + ",".join(map(str, xs)) + "]"


class IntsTexts(dict[tuple[int, ...], str]):
    """``ints_text`` of tuples that repeat (the boxes of a plan), each made once."""

    def __missing__(self, xs: tuple[int, ...]) -> str:
        text = self[xs] = ints_text(xs)
        return text


def crcs_text(crcs: tuple[int, ...]) -> str:
    """A chunk's checksums as its ``crc32c`` list holds them, without the brackets."""
    return str(crcs[0]) if len(crcs) == 1 else ",".join(map(str, crcs))


def chunk_tail_text(
    name: str, nbytes: int, offset: int, offsets_text: str, sizes_text: str, rank: int | None
) -> str:
    """A chunk's encoded fields from ``name`` (the encoded file name, or its part after
    the opening quote) to its closing brace (keys in order); the box as ``ints_text``."""
    rank_text = "" if rank is None else f',"rank":{rank}'
    return (
        f'{name},"nbytes":{nbytes},"offset":{offset},"offsets":{offsets_text}{rank_text},'
        f'"sizes":{sizes_text}}}'
    )


def tensor_tail_text(
    dtype: str, path: tuple[PathPart, ...], per_rank: bool, shape: tuple[int, ...]
) -> str:
    """A tensor entry's encoded fields after its chunk list, closing brace included."""
    before, after = TailTexts()[dtype, per_rank, shape]
    return before + path_text(path) + after


class TailTexts(dict[tuple[str, bool, tuple[int, ...]], tuple[str, str]]):
    """``tensor_tail_text`` around the path, by (dtype, per rank, shape): these repeat."""

    def __missing__(self, key: tuple[str, bool, tuple[int, ...]]) -> tuple[str, str]:
        dtype, per_rank, shape = key
        per_rank_text = ',"per_rank":true' if per_rank else ""
        texts = self[key] = (
            f'],"dtype":{json_str(dtype)},"path":',
            f'{per_rank_text},"shape":{ints_text(shape)}}}',
        )
        return texts


def layout_entry_text(
    dtype: str, layout: Layout, path: tuple[PathPart, ...], shape: tuple[int, ...]
) -> str:
    """A layout entry's encoded object (keys in order)."""
    return (
        f'{{"dtype":{json_str(dtype)},"layout":{_dumps(layout_json(layout))},'
        f'"path":{path_text(path)},"shape":{ints_text(shape)}}}'
    )


def _tensor_text(t: TensorEntry, names: dict[str, str]) -> str:
    if t.layout is not None:
        return layout_entry_text(t.dtype, t.layout, t.path, t.shape)
    chunks = []
    for c in t.chunks:
        name = names.get(c.file)
        if name is None:
            name = names[c.file] = json_str(c.file)
        tail = chunk_tail_text(
            name, c.nbytes, c.offset, ints_text(c.offsets), ints_text(c.sizes), c.rank
        )
        chunks.append(f'{{"crc32c":{ints_text(c.crc32c)},"file":{tail}')
    return '{"chunks":[' + ",".join(chunks) + tensor_tail_text(t.dtype, t.path, t.per_rank, t.shape)
