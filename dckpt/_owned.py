"""Tensors that one rank alone holds: that rank lays them out, writes and renders them.

Rank 0 plans who writes each chunk because ranks may hold the same tensor (replicas,
DDP) or the same chunks (replicated DTensor shards). A key that exactly one rank holds
needs no decision: that rank writes it. When ranks hold many keys of their own (per-rank
buffers, small per-rank optimizer states), planning, laying out and rendering those
chunks on rank 0 made its work grow with the total number of chunks of all ranks.

So, on a multi-rank save, rank 0 only counts keys: from the offers it finds the keys
held by one rank, and answers each rank with the ranges of its offer's tensors that are
its own (:func:`split`). The rank lays them out in files of its own (``r<rank>-o<i>.bin``),
writes them in the same pass as its planned files, renders their manifest entries (the
same canonical text rank 0 would have made) and reports the text with where each entry
starts (:class:`OwnReport`). Rank 0 merges those texts into the manifest by key
(:func:`owned_part`). The manifest is the one rank 0 would have rendered: only the
writer's file names differ.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from dckpt._format import DTYPE_ITEMSIZE, FileRecord
from dckpt._plan import (
    FileResult,
    ManifestTemplate,
    OwnedPart,
    OwnReport,
    RankOffer,
    RankPlan,
    SavePlan,
    TensorMeta,
    layout_rank,
    manifest_template,
    renamed,
    render_entries,
)
from dckpt.storage import FileLayout

#: A rank's own tensors as flat (start, stop) pairs of indices into its offer's tensors.
OwnRanges = tuple[int, ...]
OWN_STEM = "o"  # own files are r<rank>-o<i>.bin, apart from rank 0's r<rank>-<i>.bin


def ranges_of(indices: Iterable[int]) -> OwnRanges:
    """Increasing indices as flat (start, stop) pairs: one pair in the common cases."""
    out: list[int] = []
    for i in indices:
        if out and out[-1] == i:
            out[-1] = i + 1
        else:
            out += (i, i + 1)
    return tuple(out)


def indices_of(ranges: OwnRanges) -> Iterator[int]:
    return itertools.chain.from_iterable(
        range(ranges[i], ranges[i + 1]) for i in range(0, len(ranges), 2)
    )


def check_ranges(ranges: OwnRanges, count: int) -> None:
    """Raises ValueError unless ``ranges`` are increasing pairs within ``count`` tensors."""
    if len(ranges) % 2 or any(b <= a for a, b in itertools.pairwise(ranges)):
        raise ValueError("own ranges are not increasing (start, stop) pairs")
    if ranges and (ranges[0] < 0 or ranges[-1] > count):
        raise ValueError(f"own ranges reach past the rank's {count} tensors")


@dataclass(frozen=True, slots=True)
class Split:
    """Rank 0's view of which tensors each rank holds alone."""

    own: tuple[OwnRanges, ...]  # per rank
    own_keys: tuple[tuple[str, ...], ...]  # per rank, sorted: the entries it will report
    keys: Counter[str]  # every tensor key of the save, with how many offers hold it


def split(key_lists: Sequence[Sequence[str]], sources: Sequence[int]) -> Split:
    """Per rank, its own tensors: keys no other rank holds.

    ``key_lists[s]`` are the tensor keys of distinct offer ``s``, in offer order, and
    ``sources[r]`` is rank ``r``'s offer; an offer shared by several ranks (equal
    structure) has no key of its own."""
    holders = Counter(sources)
    keys: Counter[str] = Counter()
    for s, names in enumerate(key_lists):
        if holders[s] == 1:
            keys.update(names)
        else:
            keys.update(dict.fromkeys(names, holders[s]))
    per_offer: list[tuple[OwnRanges, tuple[str, ...]]] = []
    for s, names in enumerate(key_lists):
        if holders[s] != 1:
            per_offer.append(((), ()))
            continue
        mine = [i for i, k in enumerate(names) if keys[k] == 1]
        own = (0, len(names)) if len(mine) == len(names) and mine else ranges_of(mine)
        per_offer.append((own, tuple(sorted(names[i] for i in mine))))
    return Split(
        tuple(per_offer[s][0] for s in sources), tuple(per_offer[s][1] for s in sources), keys
    )


# ----------------------------------------------------------------------------- the rank


@dataclass(frozen=True, slots=True)
class OwnPlan:
    """A rank's own tensors laid out in its own files, with their entries' template."""

    plan: RankPlan
    template: ManifestTemplate

    def renamed(self, save_id: str) -> OwnPlan:
        return OwnPlan(renamed(self.plan, save_id), self.template)


def plan_own(
    offer: RankOffer, own: OwnRanges, save_id: str, layout: FileLayout, world_size: int
) -> OwnPlan | None:
    """The layout and entry template of ``offer``'s own tensors; None when it has none."""
    tensors = [offer.tensors[i] for i in indices_of(own)]
    if not tensors:
        return None
    items = [
        (t.key, c.box, c.box.numel * DTYPE_ITEMSIZE[t.dtype], False)
        for t in tensors
        for c in t.chunks
    ]
    plan = layout_rank(save_id, offer.rank, items, layout, stem=OWN_STEM)
    metas = {t.key: TensorMeta(t.path, t.dtype, t.shape, False) for t in tensors}
    template = manifest_template(SavePlan(save_id, world_size, (plan,), metas, {}))
    return OwnPlan(plan, template)


def own_report(own: OwnPlan, results: Sequence[FileResult]) -> OwnReport:
    text, starts = render_entries(own.template, own.plan, results)
    return OwnReport(text, starts, tuple((r.name, r.size) for r in results))


# ----------------------------------------------------------------------------- rank 0


def _checked_runs(
    reports: Sequence[OwnReport | None], own_keys: Sequence[Sequence[str]]
) -> list[tuple[Sequence[str], OwnReport]]:
    """Each reporting rank's keys with its report, checked against the keys rank 0 told
    that rank were its own."""
    out = []
    for rank, (report, keys) in enumerate(zip(reports, own_keys, strict=True)):
        if report is None:
            if keys:
                raise RuntimeError(f"rank {rank} did not report its {len(keys)} own tensors")
            continue
        starts = report.starts
        if len(starts) != len(keys) or (starts and starts[0] != 0):
            raise RuntimeError(
                f"rank {rank} reported {len(starts)} own tensor entries, expected {len(keys)}"
            )
        if keys:
            out.append((keys, report))
    return out


def _entries(runs: list[tuple[Sequence[str], OwnReport]]) -> list[tuple[str, str]]:
    """Every entry of ``runs`` as (key, text), sorted by key."""
    out: list[tuple[str, str]] = []
    for keys, report in runs:
        text, starts = report.text, report.starts
        if isinstance(text, bytes):  # interleaved keys: entries are merged one by one
            text = text.decode("ascii")
        ends = [s - 1 for s in starts[1:]]  # each entry but the last ends before a comma
        ends.append(len(text))
        out += zip(keys, map(text.__getitem__, map(slice, starts, ends)), strict=True)
    return out if len(runs) == 1 else sorted(out)


def owned_part(
    reports: Sequence[OwnReport | None], own_keys: Sequence[Sequence[str]]
) -> OwnedPart | None:
    """The entries and files of the tensors ranks rendered themselves; None when none did.
    Ranks whose key ranges do not interleave (keys named per rank) keep their text whole."""
    runs = _checked_runs(reports, own_keys)
    if not runs and not any(reports):
        return None
    files = tuple(FileRecord(n, s) for r in reports if r is not None for n, s in r.files)
    runs.sort(key=lambda run: run[0][0])
    whole = all(a[0][-1] < b[0][0] for a, b in itertools.pairwise(runs))
    texts = tuple(report.text for _, report in runs) if whole else ()
    bounds = (runs[0][0][0], runs[-1][0][-1]) if whole and runs else None
    return OwnedPart(functools.partial(_entries, runs), files, texts, bounds)
