"""What ``save`` and ``async_save`` are asked to do: the arguments, checked once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from dckpt._args import check_save
from dckpt._coord import Coordinator, LocalCoordinator, coordinator_for
from dckpt._describe import Description, Skeletons, describe
from dckpt.storage import Storage, open_storage


@dataclass(frozen=True)
class SaveOptions:
    overwrite: bool = False
    durable: bool = True


@dataclass(frozen=True)
class SaveRequest:
    """The arguments ``save`` and ``async_save`` share, checked when it is made."""

    state: Mapping[str, Any]
    path: str | os.PathLike[str]
    process_group: dist.ProcessGroup | None
    overwrite: bool
    durable: bool
    timeout: float
    allow_pickle: bool
    storage_options: dict[str, Any] | None

    def __post_init__(self) -> None:
        check_save(
            state=self.state,
            path=self.path,
            process_group=self.process_group,
            timeout=self.timeout,
            storage_options=self.storage_options,
            allow_pickle=self.allow_pickle,
            overwrite=self.overwrite,
            durable=self.durable,
        )

    @property
    def options(self) -> SaveOptions:
        return SaveOptions(overwrite=self.overwrite, durable=self.durable)

    def coordinator(self, namespace: str) -> Coordinator | LocalCoordinator:
        return coordinator_for(self.process_group, timeout=self.timeout, namespace=namespace)

    def storage(self) -> Storage:
        return open_storage(self.path, self.storage_options)

    def describe(
        self, rank: int, *, checksums: bool = False, memo: Skeletons | None = None
    ) -> Description:
        """This rank's state described (see :func:`dckpt._describe.describe`)."""
        return describe(
            self.state,
            rank,
            allow_pickle=self.allow_pickle,
            layouts=True,
            checksums=checksums,
            memo=memo,
        )
