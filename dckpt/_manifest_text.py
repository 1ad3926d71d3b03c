"""Writing a manifest: the canonical JSON text that docs/format.md specifies.

Writers emit sorted keys, no insignificant whitespace and a trailing newline; the
per-plan template (``_plan.manifest_template``) renders the same text from pieces, so
its pieces are defined once here.
"""

from __future__ import annotations

import dataclasses
import json
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
    return assemble(m, ",".join(parts))


def assemble(m: Manifest, tensors_text: str) -> bytes:
    """The canonical manifest of ``m`` with its tensors given as encoded text."""
    head = dataclasses.replace(m, tensors={})
    head_text = _dumps(manifest_to_json(head))
    marker = '"tensors":{}'
    assert marker in head_text
    text = head_text.replace(marker, '"tensors":{' + tensors_text + "}", 1)
    return text.encode("ascii") + b"\n"


def _dumps(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


# json.dumps(str) with ensure_ascii, without the encoder set-up per call
json_str = json.encoder.encode_basestring_ascii


def path_text(path: tuple[PathPart, ...]) -> str:
    return "[" + ",".join(json_str(p) if isinstance(p, str) else str(int(p)) for p in path) + "]"


def ints_text(xs: tuple[int, ...]) -> str:
    return "[" + ",".join(map(str, xs)) + "]"


def chunk_tail_text(
    nbytes: int, offset: int, offsets: tuple[int, ...], sizes: tuple[int, ...], rank: int | None
) -> str:
    """A chunk's encoded fields after ``file``, closing brace included (keys in order)."""
    rank_text = "" if rank is None else f',"rank":{rank}'
    return (
        f',"nbytes":{nbytes},"offset":{offset},"offsets":{ints_text(offsets)}{rank_text},'
        f'"sizes":{ints_text(sizes)}}}'
    )


def tensor_tail_text(
    dtype: str, path: tuple[PathPart, ...], per_rank: bool, shape: tuple[int, ...]
) -> str:
    """A tensor entry's encoded fields after its chunk list, closing brace included."""
    per_rank_text = ',"per_rank":true' if per_rank else ""
    return (
        f'],"dtype":{json_str(dtype)},"path":{path_text(path)}{per_rank_text},'
        f'"shape":{ints_text(shape)}}}'
    )


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
        tail = chunk_tail_text(c.nbytes, c.offset, c.offsets, c.sizes, c.rank)
        chunks.append(f'{{"crc32c":{ints_text(c.crc32c)},"file":{name}{tail}')
    return '{"chunks":[' + ",".join(chunks) + tensor_tail_text(t.dtype, t.path, t.per_rank, t.shape)
