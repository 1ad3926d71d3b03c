"""Which backend opens a checkpoint path: the storage registry.

:func:`open_storage` resolves a path in this order:

1. a :class:`Storage` instance is used as it is;
2. a plain path (no ``scheme://``) is a local directory (:class:`LocalStorage`);
3. a scheme registered with :func:`register_backend` (built in: ``file://``, local);
4. a scheme an installed package declares in the ``dckpt.storage`` entry point group
   (the group is read once, when the first scheme not registered is opened, so
   ``import dckpt`` reads no package metadata);
5. any other scheme goes to fsspec (``s3://``, ``gs://``, ``memory://``, chained URLs),
   which refuses a scheme it does not know either with a :class:`CheckpointError`.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

from dckpt._errors import ArgumentError, ArgumentTypeError, CheckpointError, StorageError
from dckpt.storage._base import Storage
from dckpt.storage._fsspec import FsspecStorage
from dckpt.storage._local import LocalStorage
from dckpt.storage._retry import scrub, secret_values

StorageFactory = Callable[[str, dict[str, Any]], Storage]
"""What a backend provides: ``factory(url, storage_options)`` returns the :class:`Storage`
for ``url`` (the whole URL, scheme included). A :class:`Storage` subclass whose
constructor takes those two arguments is one."""

ENTRY_POINT_GROUP = "dckpt.storage"
"""The entry point group installed packages declare backends in: one entry per scheme,
named after it, whose object is a :data:`StorageFactory`."""

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*\Z")


def _open_file_url(url: str, storage_options: dict[str, Any]) -> Storage:
    return LocalStorage(url[len("file://") :])


_BUILTIN: dict[str, StorageFactory] = {"file": _open_file_url}
_lock = threading.Lock()
_factories: dict[str, StorageFactory] = dict(_BUILTIN)
_entry_points: dict[str, importlib.metadata.EntryPoint] | None = None  # read on first miss


def register_backend(scheme: str, factory: StorageFactory) -> None:
    """Make :func:`open_storage` (and so ``dckpt.save``, ``dckpt.load``, the
    ``CheckpointManager`` and the CLI) open ``scheme://`` paths with ``factory``.

    A registration replaces an earlier one for the scheme, built-in ones included, and
    takes precedence over entry points and fsspec. It holds in this process only:
    register in every process that opens such paths (each rank), for instance when your
    package is imported, or declare the backend in the ``dckpt.storage`` entry point group
    so every process finds it without an import.

    Args:
        scheme: The URL scheme, without ``://`` (letters, digits, ``+``, ``-``, ``.``;
            matched case-insensitively).
        factory: Called as ``factory(url, storage_options)`` with the whole URL and the
            caller's ``storage_options`` (a new dict, ``{}`` when none were given); returns
            the :class:`Storage` for that URL. A :class:`Storage` subclass with that
            constructor will do.

    Raises:
        ArgumentError: ``scheme`` is not a URL scheme.
        ArgumentTypeError: ``scheme`` is not a str, or ``factory`` is not callable.

    Example:
        >>> class MyStorage(dckpt.storage.Storage):
        ...     def __init__(self, url: str, storage_options: dict) -> None: ...
        >>> dckpt.storage.register_backend("myfs", MyStorage)  # doctest: +SKIP
        >>> dckpt.save(state, "myfs://bucket/run1/step-100")  # doctest: +SKIP
    """
    key = _checked_scheme(scheme)
    if not callable(factory):
        raise ArgumentTypeError(
            f"register_backend: factory for {scheme}:// must be callable as "
            f"factory(url, storage_options) -> Storage, got {type(factory).__name__}"
        )
    with _lock:
        _factories[key] = factory


def unregister_backend(scheme: str) -> None:
    """Undo :func:`register_backend` for ``scheme``.

    A built-in scheme (``file``) goes back to its built-in backend; any other is resolved
    again through the entry points and fsspec. Unregistering an unknown scheme is fine.

    Args:
        scheme: The URL scheme, without ``://``.

    Raises:
        ArgumentError: ``scheme`` is not a URL scheme.
        ArgumentTypeError: ``scheme`` is not a str.

    Example:
        >>> dckpt.storage.unregister_backend("myfs")
    """
    key = _checked_scheme(scheme)
    with _lock:
        if key in _BUILTIN:
            _factories[key] = _BUILTIN[key]
        else:
            _factories.pop(key, None)


def _checked_scheme(scheme: object) -> str:
    if not isinstance(scheme, str):
        raise ArgumentTypeError(
            f"a storage scheme must be a str such as 'myfs', got {type(scheme).__name__}"
        )
    if not _SCHEME.match(scheme):
        raise ArgumentError(
            f"{scheme!r} is not a URL scheme: use letters, digits, '+', '-' and '.', starting "
            "with a letter, and no '://' (for myfs://... register 'myfs')"
        )
    return scheme.lower()


def open_storage(
    path: str | os.PathLike[str] | Storage, storage_options: Mapping[str, Any] | None = None
) -> Storage:
    """The :class:`Storage` for a checkpoint path or URL.

    Plain paths and ``file://`` URLs open a local directory; a scheme registered with
    :func:`register_backend` or declared in the ``dckpt.storage`` entry point group opens
    with that backend; any other ``scheme://`` URL goes to fsspec (``s3://``, ``gs://``,
    ``memory://``...). Opening does not create anything.

    Args:
        path: A local path, a URL, or a :class:`Storage` (returned as it is).
        storage_options: Passed to the backend: for fsspec URLs the filesystem's options,
            with dckpt's own under ``"dckpt"``; ignored for local paths.

    Returns:
        The storage rooted at ``path``.

    Raises:
        CheckpointError: ``path`` is empty or not a path; the scheme's backend could not
            be loaded, or fsspec does not know the scheme (or needs a package to be
            installed: the message says which).
        StorageError: The backend failed to open ``path``.

    Example:
        >>> st = open_storage("/tmp/dckpt-example")
        >>> st.location
        '/tmp/dckpt-example'
    """
    if isinstance(path, Storage):
        return path
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise CheckpointError(
            f"a checkpoint path must be a non-empty str or PathLike, got {path!r}"
        )
    options = dict(storage_options or {})
    if "://" not in path:
        return LocalStorage(path)
    scheme = path.split("://", 1)[0]
    factory = _factory_for(scheme.lower()) if _SCHEME.match(scheme) else None
    if factory is None:
        return FsspecStorage(path, options)
    return _opened(scheme, factory, path, options)


def _factory_for(scheme: str) -> StorageFactory | None:
    """The registered factory for ``scheme``, else its entry point's (loaded, then kept)."""
    global _entry_points
    with _lock:
        factory = _factories.get(scheme)
        if factory is not None:
            return factory
        if _entry_points is None:
            found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
            _entry_points = {ep.name.lower(): ep for ep in found}
        ep = _entry_points.get(scheme)
    if ep is None:
        return None
    try:
        loaded = ep.load()
    except Exception as exc:
        raise CheckpointError(
            f"the storage backend for {scheme}:// ({ep.value}, entry point group "
            f"{ENTRY_POINT_GROUP!r}) could not be imported: {type(exc).__name__}: {exc}; "
            "reinstall or uninstall the package that provides it"
        ) from exc
    if not callable(loaded):
        raise CheckpointError(
            f"the storage backend for {scheme}:// ({ep.value}, entry point group "
            f"{ENTRY_POINT_GROUP!r}) is a {type(loaded).__name__}, not a factory "
            "factory(url, storage_options) -> Storage; fix the package that provides it"
        )
    with _lock:
        return _factories.setdefault(scheme, loaded)


def _opened(scheme: str, factory: StorageFactory, url: str, options: dict[str, Any]) -> Storage:
    """``factory(url, options)``, its failures as dckpt errors without credentials."""
    try:
        storage = factory(url, options)
    except CheckpointError:
        raise
    except Exception as exc:
        what = scrub(f"{type(exc).__name__}: {exc}", secret_values(options))
        raise StorageError(
            f"opening {scrub(url, secret_values(options))} failed: the {scheme}:// backend "
            f"raised {what}"
        ) from exc
    if not isinstance(storage, Storage):
        raise CheckpointError(
            f"the {scheme}:// backend returned a {type(storage).__name__}, not a "
            "dckpt.storage.Storage; fix its factory"
        )
    return storage
