"""The ``dckpt`` command line: inspect, verify, ls, convert and diff checkpoints.

A thin shell over the library. Output is a readable table, or JSON with ``--json``.
Progress bars appear only when stderr is a terminal (never with ``--json``). Errors are
one ``dckpt: error: ...`` line and exit status 1 (2 for usage errors, as click does);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import click

from dckpt._api import open_checkpoint
from dckpt._errors import CheckpointError, CheckpointNotFoundError
from dckpt._manager import scan_root
from dckpt._version import __version__
from dckpt.cli._diff import diff_sources, shape_text
from dckpt.cli._output import bar, emit_json, human, table, want_progress, when
from dckpt.interop._convert import FORMATS, convert, parse_size
from dckpt.interop._sources import open_source
from dckpt.storage import open_storage


class _Failed(click.ClickException):
    """Any error from the library, shown as one line (exit status 1)."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"dckpt: error: {self.format_message()}", err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            message = str(exc) or type(exc).__name__
            if not isinstance(exc, (CheckpointError, OSError, ValueError)):
                message = f"{type(exc).__name__}: {message} (run with --debug for the traceback)"
            raise _Failed(message) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.version_option(__version__, prog_name="dckpt")
def cli(debug: bool) -> None:
    """Inspect, verify, list, convert and compare PyTorch checkpoints (dckpt and DCP)."""


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``dckpt = dckpt.cli._commands:main``)."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="dckpt")


# --------------------------------------------------------------------------- helpers


def _open(path: str) -> Any:
    return open_checkpoint(path)


def _preview(reader: Any, key: str) -> str:
    try:
        text = repr(reader.read_value(key))
    except Exception as exc:  # pickled or unreadable: say so, never unpickle
        return f"<not shown: {type(exc).__name__}>"
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------- inspect


def _totals(infos: Sequence[Any], manifest: Any) -> dict[str, int | None]:
    tensors = [i for i in infos if i.kind == "tensor"]
    return {
        "keys": len(infos),
        "tensors": len(tensors),
        "values": len(infos) - len(tensors),
        "tensor_bytes": sum(i.nbytes for i in tensors),
        "files": len(manifest.files) if manifest is not None else None,
        "file_bytes": manifest.total_bytes if manifest is not None else None,
    }


@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: str, as_json: bool) -> None:
    """Show keys, dtypes, shapes, sizes and chunks.

    Works on dckpt and torch DCP checkpoints; shapes are global (as saved, all ranks).
    """
    reader = _open(path)
    infos = reader.infos()
    manifest = getattr(reader, "manifest", None)
    totals = _totals(infos, manifest)
    meta = {
        "path": reader.location,
        "format": reader.format,
        "world_size": reader.world_size,
        "created": manifest.created if manifest is not None else None,
        "library": manifest.library if manifest is not None else None,
    }
    if as_json:
        keys = [
            {**asdict(i), "path": list(i.path), "shape": None if i.shape is None else list(i.shape)}
            for i in infos
        ]
        for k in keys:
            if k["kind"] == "value":
                k["value"] = _preview(reader, k["key"])
        emit_json({**meta, "keys": keys, "totals": totals})
        return
    click.echo(
        f"{reader.location}: {reader.format} checkpoint saved by {reader.world_size} rank(s)"
    )
    if manifest is not None:
        click.echo(f"created {when(manifest.created)} by {manifest.library or 'unknown'}")
    rows = [
        [
            i.key + (" (per rank)" if i.per_rank else ""),
            i.kind,
            i.dtype or "-",
            shape_text(i.shape),
            human(i.nbytes) if i.kind == "tensor" else _preview(reader, i.key),
            str(i.chunks) if i.kind == "tensor" else "-",
        ]
        for i in infos
    ]
    table(rows, ["KEY", "KIND", "DTYPE", "SHAPE", "SIZE/VALUE", "CHUNKS"])
    files = "" if totals["files"] is None else f" in {totals['files']} file(s)"
    click.echo(
        f"{totals['keys']} keys: {totals['tensors']} tensors ({human(totals['tensor_bytes'])})"
        f"{files}, {totals['values']} values"
    )


# --------------------------------------------------------------------------- verify

_DCP_NOTE = (
    "DCP checkpoints carry no checksums: checked that every data file is present and long "
    "enough and that every tensor and value decodes with the dtype and shape the metadata "
    "gives; flipped bits inside tensor data cannot be detected"
)


def _damage(reader: Any, problems: list[str]) -> tuple[list[str], list[str]]:
    """The keys and files the problem messages name. A problem naming a key (a checksum
    mismatch) damages that key; one naming only a file (missing, truncated) damages every
    key stored in it."""
    all_keys = [i.key for i in reader.infos()]
    manifest = getattr(reader, "manifest", None)
    names = [f.name for f in manifest.files] if manifest is not None else []
    # Format 2: a table or shard file of rank r damages the layout tensors r's mesh holds.
    owner = {t.name: t.rank for t in getattr(manifest, "tables", ())}
    owner |= {f: t.rank for t in getattr(manifest, "tables", ()) for f in t.files}
    names += list(owner.keys() - set(names))
    keys: set[str] = set()
    files: set[str] = set()
    for p in problems:
        named_files = {n for n in names if n in p}
        files |= named_files
        named_keys = {k for k in all_keys if repr(k) in p}
        if not named_keys and manifest is not None:
            ranks = {owner[f] for f in named_files if f in owner}
            named_keys = {
                k
                for k, t in manifest.tensors.items()
                if any(c.file in named_files for c in t.chunks)
                or (
                    t.layout is not None
                    and any(manifest.meshes[t.layout.mesh].coordinate(r) is not None for r in ranks)
                )
            }
        keys |= named_keys
    return sorted(keys), sorted(files)


@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify(path: str, as_json: bool) -> None:
    """Re-read every byte, check every checksum.

    Exit status 0 when intact, 1 with the damaged keys and files listed otherwise.
    """
    reader = _open(path)
    infos = reader.infos()
    total = sum(i.nbytes for i in infos)
    manifest = getattr(reader, "manifest", None)
    if manifest is not None:  # per-rank tensors are stored once per rank
        total = sum(c.nbytes for t in manifest.tensors.values() for c in t.chunks) + sum(
            t.nbytes for t in manifest.tensors.values() if t.layout is not None
        )  # layout tensors (format 2) are stored once, their pieces in tables
    with bar(want_progress(as_json), total, "verify") as progress:
        problems = reader.verify(progress)
    keys, files = _damage(reader, problems)
    checked = {
        "tensors": sum(1 for i in infos if i.kind == "tensor"),
        "values": sum(1 for i in infos if i.kind == "value"),
        "bytes": total,
        "checksums": reader.format == "dckpt",
    }
    note = _DCP_NOTE if reader.format == "dcp" else ""
    if as_json:
        emit_json(
            {
                "path": reader.location,
                "format": reader.format,
                "ok": not problems,
                "checked": checked,
                "problems": problems,
                "damaged_keys": keys,
                "damaged_files": files,
                "note": note,
            }
        )
    elif not problems:
        what = note or "every byte re-read, every crc32c matched"
        click.echo(
            f"OK: {reader.location}: {checked['tensors']} tensors ({human(total)}), "
            f"{checked['values']} value(s); {what}"
        )
    else:
        _report_damage(reader.location, problems, keys, files, note)
    if problems:
        raise click.exceptions.Exit(1)


def _report_damage(
    location: str, problems: list[str], keys: list[str], files: list[str], note: str
) -> None:
    click.echo(f"DAMAGED: {location}: {len(problems)} problem(s)")
    for p in problems:
        click.echo(f"  - {p}")
    if files:
        click.echo("damaged files: " + ", ".join(files))
    if keys:
        click.echo("damaged keys: " + ", ".join(keys))
    if note:
        click.echo(f"note: {note}")


# --------------------------------------------------------------------------- ls


@cli.command(name="ls")
@click.argument("root")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ls(root: str, as_json: bool) -> None:
    """List the steps under a CheckpointManager root.

    Shows size, creation time and whether each step committed; leftovers of saves
    that never finished are listed too, marked uncommitted.
    """
    if not open_storage(root).exists():
        raise CheckpointNotFoundError(f"{root} does not exist")
    entries = scan_root(root, sizes=True)
    if as_json:
        emit_json(
            [
                {
                    "step": e.step,
                    "name": e.name,
                    "status": e.status,
                    "committed": e.committed,
                    "size": e.size,
                    "created": e.created,
                    "error": e.error or None,
                }
                for e in entries
            ]
        )
        return
    if not entries:
        click.echo(f"no step-<n> checkpoints under {root}")
        return
    rows = [
        [
            str(e.step),
            "yes" if e.committed else f"no ({e.status})",
            human(e.size),
            when(e.created),
            e.name,
        ]
        for e in entries
    ]
    table(rows, ["STEP", "COMMITTED", "SIZE", "CREATED", "DIR"])
    leftovers = [e for e in entries if not e.committed]
    if leftovers:
        click.echo(
            f"{len(leftovers)} uncommitted dir(s): leftovers of saves that did not finish "
            "(removed by the manager's next save) or damaged manifests"
        )


# --------------------------------------------------------------------------- convert


def _size_param(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command(name="convert")
@click.argument("src")
@click.argument("dst")
@click.option("--to", "to", type=click.Choice(FORMATS), help="Output format (default: by suffix).")
@click.option("--prefix", help="Keep only keys under this prefix, and strip it (e.g. model.).")
@click.option(
    "--shard-size", default="5GB", callback=_size_param, help="hf shard size, e.g. 5GB, 500MB."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def convert_cmd(
    src: str, dst: str, to: str | None, prefix: str | None, shard_size: int, as_json: bool
) -> None:
    """Convert between checkpoint formats, streaming.

    Sources: dckpt, DCP, .safetensors, hf directories, .pt/.bin. Formats to write:
    dckpt (a directory), safetensors, hf (sharded safetensors + index) and pt.
    """
    with bar(want_progress(as_json), None, "convert") as progress:
        report = convert(src, dst, to=to, prefix=prefix, shard_size=shard_size, progress=progress)
    if as_json:
        emit_json(asdict(report))
        return
    click.echo(
        f"converted {report.tensors} tensors ({human(report.nbytes)}) and {report.values} "
        f"values: {report.src} ({report.src_format}) -> {report.dst} ({report.dst_format})"
    )
    if report.skipped:
        click.echo(
            f"skipped {len(report.skipped)} non-tensor value(s) ({report.dst_format} holds "
            "tensors only): " + ", ".join(report.skipped)
        )
    for note in report.notes:
        click.echo(f"note: {note}")


# --------------------------------------------------------------------------- diff


@cli.command()
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def diff(a: str, b: str, as_json: bool) -> None:
    """Compare two checkpoints key by key.

    Lists keys only in one side and keys whose kind, dtype, shape or values differ
    (with the max absolute difference). Exit status 0 when identical, 1 when they
    differ, as diff(1).
    """
    sa = open_source(a)
    try:
        sb = open_source(b)
        try:
            total = sum(e.nbytes for e in sa.entries())
            with bar(want_progress(as_json), total, "diff") as progress:
                report = diff_sources(sa, sb, progress)
        finally:
            sb.close()
    finally:
        sa.close()
    if as_json:
        emit_json(
            {
                "a": a,
                "b": b,
                "identical": report.identical,
                "compared": report.compared,
                "only_in_a": report.only_a,
                "only_in_b": report.only_b,
                "different": [asdict(d) for d in report.different],
            }
        )
    else:
        for k in report.only_a:
            click.echo(f"only in A: {k}")
        for k in report.only_b:
            click.echo(f"only in B: {k}")
        for d in report.different:
            if d.what == "values":
                click.echo(
                    f"values differ: {d.key}: max abs diff {d.max_abs_diff:.6g} "
                    f"({d.elements} element(s))"
                )
            else:
                click.echo(f"{d.what} differs: {d.key}: {d.a} vs {d.b}")
        verdict = "identical" if report.identical else "different"
        click.echo(
            f"{verdict}: {report.compared} common key(s) compared, {len(report.different)} "
            f"differ, {len(report.only_a)} only in A, {len(report.only_b)} only in B"
        )
    if not report.identical:
        raise click.exceptions.Exit(1)
