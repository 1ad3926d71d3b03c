"""The manager's listing, tier-aware: which steps each tier holds (each rank alone)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from dckpt._args import check_choice
from dckpt._steps import StepEntry, StepListing, list_steps

if TYPE_CHECKING:
    from dckpt.tiers._tiered import TieredCheckpoints

Tier = Literal["local", "durable"]


class TierListing(StepListing):
    """[`StepListing`][dckpt._steps.StepListing] with a ``tier`` to ask one tier only."""

    _tiers: TieredCheckpoints | None

    def entries(self) -> list[StepEntry]:
        """Every step directory under the root (the durable tier), committed or not,
        ascending by step, as without tiers.

        Raises:
            StorageError: Listing the root or reading a manifest failed.

        Example:
            ```python
            for e in manager.entries():
                print(e.name, e.status, e.size)
            ```
        """
        if self._tiers is None:
            return super().entries()
        # The tiers open the root in the background; this waits for it if need be.
        return list_steps(self._tiers.durable.storage)

    def steps(self, tier: Tier | None = None) -> list[int]:
        """The committed steps, ascending: those [`load`][dckpt.CheckpointManager.load] takes.

        Args:
            tier: ``"durable"``: the steps committed under the root; ``"local"``: the
                steps whose manifest this rank's node holds in ``local_dir`` (always
                empty without one); None: both, merged. Local to this rank: a step
                another node holds, or that only replicas can restore, is recovered by
                ``load`` but not listed here.

        Raises:
            ArgumentError: ``tier`` is not one of those.
            StorageError: Listing the root or reading a manifest failed.

        Example:
            ```python
            manager.steps()  # [1000, 1500, 2000]; a crashed save of 2500 is not listed
            manager.steps(tier="durable")  # [1000, 2000] with persist_every=1000
            ```
        """
        check_choice("tier", tier, ("local", "durable"), optional=True)
        if self._tiers is None:
            return [] if tier == "local" else super().steps()
        return self._tiers.steps(tier)

    def latest_step(self, tier: Tier | None = None) -> int | None:
        """The newest committed step (in ``tier``, as for ``steps``), or None if none.

        Args:
            tier: ``"local"``, ``"durable"``, or None for both (see ``steps``).

        Raises:
            ArgumentError: ``tier`` is not one of those.
            StorageError: Listing the root or reading a manifest failed.

        Example:
            ```python
            fresh_start = manager.latest_step() is None
            ```
        """
        steps = self.steps(tier)
        return steps[-1] if steps else None
