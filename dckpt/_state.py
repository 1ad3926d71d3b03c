"""Turning a user's ``state`` into flat leaves, and putting loaded values back.

Modules and optimizers go through torch's public state-dict helpers
(``torch.distributed.checkpoint.state_dict``), which know FSDP2, DDP and tensor
parallelism and give FQN keys; the layout therefore lines up with torch DCP's for the
same objects. Anything with ``state_dict``/``load_state_dict`` is Stateful.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from dckpt._errors import UnsupportedStateError
from dckpt._format import PathPart
from dckpt._optimpair import Partners
from dckpt._stateful import ModuleState, OptimizerState
from dckpt._values import MAX_DEPTH


@dataclass(frozen=True, slots=True)
class TensorLeaf:
    key: str
    path: tuple[PathPart, ...]
    tensor: torch.Tensor


@dataclass(frozen=True, slots=True)
class ValueLeaf:
    key: str
    path: tuple[PathPart, ...]
    value: object
    set: Callable[[object], None]


@dataclass
class Resolved:
    """The flat view of one rank's state plus what to call once loading has filled it."""

    tensors: list[TensorLeaf] = field(default_factory=list)
    values: list[ValueLeaf] = field(default_factory=list)
    finish: list[Callable[[], None]] = field(default_factory=list)
    # Saved keys a load would have grown a container with but this rank cannot take.
    skipped: list[str] = field(default_factory=list)

    def keys(self) -> set[str]:
        return {t.key for t in self.tensors} | {v.key for v in self.values}


def flat_key(path: tuple[PathPart, ...]) -> str:
    return ".".join(str(p) for p in path)


class Grower(Protocol):
    """What a load knows of the checkpoint, to give the destination's dicts and lists the
    entries they lack (``dckpt._load.Saved``)."""

    def value_at(self, path: tuple[PathPart, ...]) -> bool: ...

    def grow(
        self, node: dict[Any, Any] | list[Any], path: tuple[PathPart, ...], out: Resolved
    ) -> None: ...


def resolve(
    state: Mapping[str, Any],
    *,
    strict: bool = True,
    fresh_optimizers: bool = True,
    saved: Grower | None = None,
) -> Resolved:
    """Flatten ``state`` into leaves; Stateful objects are asked for their state now.

    ``fresh_optimizers=False`` leaves out optimizers that have no state yet: torch's
    helpers would create it with a zero-gradient ``step()``, which a caller that only
    wants to look (without saving) must not cause.

    ``saved`` (loads only) grows destination containers to what the checkpoint holds:
    every dict and list inside a Stateful's state dict (other than a module's or an
    optimizer's, whose keys torch's helpers own), and the empty dicts and lists elsewhere
    below the top level (a non-empty plain dict may be a deliberate subset)."""
    if not isinstance(state, Mapping):
        raise UnsupportedStateError(
            f"state must be a dict mapping names to modules, optimizers, tensors or values, "
            f"got {type(state).__name__}"
        )
    out = Resolved()
    found = list(_stateful_in(state, 0, set()))
    modules = [m for m in found if isinstance(m, torch.nn.Module)]
    optims = [o for o in found if isinstance(o, torch.optim.Optimizer)]
    partners = Partners(modules, optims, lambda o: _left_out(o, fresh_optimizers))
    ctx = _Walk(modules, partners, {}, strict, fresh_optimizers, saved, {})
    ctx.active[id(state)] = ()
    _walk_mapping(state, (), out, ctx, "empty")
    return out


# Which containers a load grows: all of them, only empty ones, or none.
_Grow = Literal["all", "empty", "none"]


@dataclass(frozen=True, slots=True)
class _Walk:
    modules: list[torch.nn.Module]
    partners: Partners
    seen: dict[str, tuple[PathPart, ...]]  # flat key -> the path that claimed it
    strict: bool
    fresh_optimizers: bool
    saved: Grower | None
    active: dict[int, tuple[PathPart, ...]]  # containers being walked (by id) -> their path


def _no_set(_value: object) -> None:
    return None


def _is_container(node: object) -> bool:
    return isinstance(node, (Mapping, list, tuple))


def _children(node: object) -> Iterable[object]:
    if isinstance(node, Mapping):
        return node.values()
    return node if isinstance(node, (list, tuple)) else ()


def _stateful_in(
    node: object, depth: int, active: set[int]
) -> Iterator[torch.nn.Module | torch.optim.Optimizer]:
    if isinstance(node, (torch.nn.Module, torch.optim.Optimizer)):
        yield node
        return
    # Cycles and runaway depth are left for the walk, which names the key.
    if not _is_container(node) or depth >= MAX_DEPTH or id(node) in active:
        return
    active.add(id(node))
    for v in _children(node):
        if type(v) is not torch.Tensor:  # a generator per tensor leaf costs, at 20k
            yield from _stateful_in(v, depth + 1, active)
    active.discard(id(node))


def _finisher(obj: Any, sd: dict[str, Any]) -> Callable[[], None]:
    def finish() -> None:
        obj.load_state_dict(sd)

    return finish


def _has_leaf_tensor(node: object, depth: int = 0, active: set[int] | None = None) -> bool:
    if isinstance(node, torch.Tensor) or _is_stateful(node):
        return True
    if not _is_container(node):
        return False
    # Too deep or cyclic to tell: answer yes, so that the walk descends and names the key.
    if depth >= MAX_DEPTH:
        return True
    active = set() if active is None else active
    if id(node) in active:
        return True
    active.add(id(node))
    try:
        # A loop, not any(generator): one frame a level instead of two.
        for v in _children(node):  # noqa: SIM110
            if _has_leaf_tensor(v, depth + 1, active):
                return True
        return False
    finally:
        active.discard(id(node))


def _is_stateful(node: object) -> bool:
    return (
        isinstance(node, (torch.nn.Module, torch.optim.Optimizer, OptimizerState))
        or (
            callable(getattr(node, "state_dict", None))
            and callable(getattr(node, "load_state_dict", None))
        )
    ) and not isinstance(node, (type, torch.Tensor))


def _shown(path: tuple[PathPart, ...]) -> str:
    key = flat_key(path)
    return repr(key if len(key) <= 120 else f"{key[:100]}...{key[-16:]}")


def _walk(
    node: object,
    path: tuple[PathPart, ...],
    out: Resolved,
    ctx: _Walk,
    setter: Callable[[object], None],
    grow: _Grow,
) -> None:
    if isinstance(node, torch.Tensor):
        if node.is_nested:
            raise UnsupportedStateError(
                f"key {flat_key(path)!r}: a nested tensor (torch.nested) cannot be saved or "
                "loaded; store its components (t.unbind()) instead"
            )
        out.tensors.append(TensorLeaf(_claim(path, ctx.seen), path, node))
        return
    if not (_is_container(node) or _is_stateful(node)):
        out.values.append(ValueLeaf(_claim(path, ctx.seen), path, node, setter))
        return
    if len(path) > MAX_DEPTH:
        raise UnsupportedStateError(
            f"the state nests more than {MAX_DEPTH} levels deep, at key {_shown(path)}; "
            "flatten it, or store the deep part as bytes or a string"
        )
    prior = ctx.active.get(id(node))
    if prior is not None:
        where = f"its enclosing key {_shown(prior)}" if prior else "the state itself"
        raise UnsupportedStateError(
            f"the state refers back to itself: key {_shown(path)} holds the same object as "
            f"{where}; a state must be a tree, so store that object once"
        )
    ctx.active[id(node)] = path
    try:
        _walk_node(node, path, out, ctx, setter, grow)
    finally:
        del ctx.active[id(node)]


def _walk_node(
    node: object,
    path: tuple[PathPart, ...],
    out: Resolved,
    ctx: _Walk,
    setter: Callable[[object], None],
    grow: _Grow,
) -> None:
    if _is_stateful(node):
        _walk_stateful(node, path, out, ctx)
        return
    if ctx.saved is not None and grow != "none":
        if ctx.saved.value_at(path) and (grow == "all" or not _has_leaf_tensor(node)):
            # Saved whole (an empty dict, say): take it whole, whatever it holds now
            # (tensors too, inside a Stateful, which gets back what it saved).
            out.values.append(ValueLeaf(_claim(path, ctx.seen), path, node, setter))
            return
        if isinstance(node, (dict, list)) and (grow == "all" or not node):
            ctx.saved.grow(node, path, out)
    if isinstance(node, Mapping) and _has_leaf_tensor(node):
        _walk_mapping(node, path, out, ctx, grow)
        return
    if isinstance(node, list) and _has_leaf_tensor(node):
        for i, v in enumerate(node):
            _walk(v, (*path, i), out, ctx, _list_setter(node, i), grow)
        return
    if isinstance(node, tuple) and _has_leaf_tensor(node):
        # Tuples cannot be updated in place: their tensors still load in place.
        for i, v in enumerate(node):
            _walk(v, (*path, i), out, ctx, _no_set, grow)
        return
    if isinstance(node, Mapping) and node and all(isinstance(k, str) for k in node):
        # A dict of plain values: one leaf per entry, so keys line up with DCP's flattening.
        _walk_mapping(node, path, out, ctx, grow)
        return
    out.values.append(ValueLeaf(_claim(path, ctx.seen), path, node, setter))


def _left_out(optim: torch.optim.Optimizer, fresh_optimizers: bool) -> bool:
    """An optimizer without state on a walk that must not create it (see :func:`resolve`)."""
    return not optim.state and not fresh_optimizers


def _walk_stateful(node: Any, path: tuple[PathPart, ...], out: Resolved, ctx: _Walk) -> None:
    optim = node.optimizer if isinstance(node, OptimizerState) else node
    if isinstance(optim, torch.optim.Optimizer) and _left_out(optim, ctx.fresh_optimizers):
        return
    obj: Any
    if isinstance(node, torch.nn.Module):
        obj = ModuleState(node, ctx.strict)
    elif isinstance(node, torch.optim.Optimizer):
        obj = OptimizerState(ctx.partners.owner(node, ctx.modules, flat_key(path)), node)
    else:
        obj = node
    sd = ctx.partners.state_dict(node, obj.state_dict)
    if not isinstance(sd, Mapping):
        raise UnsupportedStateError(
            f"state_dict() of {type(node).__name__} at key {flat_key(path)!r} returned "
            f"{type(sd).__name__}, expected a dict"
        )
    sd = dict(sd)
    # Torch's helpers own a module's or optimizer's keys (and check them); any other
    # Stateful gets back everything it saved, whatever its fresh state dict holds.
    grow: _Grow = "none" if isinstance(obj, (ModuleState, OptimizerState)) else "all"
    if ctx.saved is not None and grow == "all":
        ctx.saved.grow(sd, path, out)
    _walk_mapping(sd, path, out, ctx, grow)
    out.finish.append(_finisher(obj, sd))


def _walk_mapping(
    node: Mapping[Any, Any], path: tuple[PathPart, ...], out: Resolved, ctx: _Walk, grow: _Grow
) -> None:
    # Dicts of many tensors are the common case: their leaves skip _walk (a save of 20k
    # small tensors spends much of its describe here), with the same key and checks.
    prefix = flat_key(path) + "." if path else ""
    seen, tensors = ctx.seen, out.tensors
    for k, v in node.items():
        if type(k) is not str and (not isinstance(k, (str, int)) or isinstance(k, bool)):
            raise UnsupportedStateError(
                f"key {k!r} under {flat_key(path) or 'the state'!r} is a {type(k).__name__}; "
                "state dict keys must be strings (or integers)"
            )
        if type(v) is torch.Tensor and not v.is_nested:
            name = str(k)
            leaf, key = (*path, name), prefix + name
            if seen.setdefault(key, leaf) is not leaf:
                _claim(leaf, seen)  # raises, naming both
            tensors.append(TensorLeaf(key, leaf, v))
            continue
        _walk(v, (*path, str(k)), out, ctx, _dict_setter(node, k), grow)


def _dict_setter(node: Mapping[Any, Any], k: object) -> Callable[[object], None]:
    if isinstance(node, dict):

        def set_item(value: object) -> None:
            node[k] = value

        return set_item
    return _no_set


def _list_setter(node: list[Any], i: int) -> Callable[[object], None]:
    def set_item(value: object) -> None:
        node[i] = value

    return set_item


def _claim(path: tuple[PathPart, ...], seen: dict[str, tuple[PathPart, ...]]) -> str:
    key = flat_key(path)
    prior = seen.setdefault(key, path)
    if prior is not path:
        raise UnsupportedStateError(
            f"two entries flatten to the same key {key!r} ({list(prior)} and {list(path)}); "
            "rename one of them"
        )
    return key
