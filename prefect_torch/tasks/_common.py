"""Settings every card shares, stated once.

Per-batch cards pass live handles in-process: nothing to cache or persist per
call. Coarse cards (load, split, define, train, evaluate) persist their results
as verified prefect-torch records and are cached by lineage, so a re-run with
the same inputs completes from storage, in this process or another.
"""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE

from prefect_torch.blocks.serializer import TorchSerializer
from prefect_torch.tasks.lineage import Lineage

STEP_CARD: dict[str, Any] = dict(cache_policy=NO_CACHE, persist_result=False)


def coarse_card(code_version: str, cache_policy: Lineage | None = None, **options: Any) -> dict[str, Any]:
    """Task options of a coarse card; bump ``code_version`` when its results change."""
    return dict(
        cache_policy=cache_policy or Lineage(code_version=code_version),
        persist_result=True,
        result_serializer=TorchSerializer(),
        **options,
    )


def persisted_in(storage=None, *cards):
    """The cards, writing their results to ``storage`` (default: the default Torch
    Storage) through a result storage that verifies every record it reads back and
    refuses any record another serializer (pickle) wrote.

    Cached cards also run at ``SERIALIZABLE`` isolation under leased locks kept
    next to those results: identical cards started at once (in other threads,
    processes or flow runs sharing the storage) compute once, the others wait and
    read the result; a crashed holder's lock expires within the lease
    (``prefect_torch.blocks.locks``)."""
    from prefect_torch.blocks.locks import lock_manager
    from prefect_torch.blocks.results import result_options
    from prefect_torch.blocks.storage import default_storage

    storage = storage if storage is not None else default_storage()
    options = result_options(storage)
    locks = lock_manager(storage)
    return tuple(card.with_options(**options, **_serialized(card, locks)) for card in cards)


def _serialized(card, locks) -> dict[str, Any]:
    policy = card.cache_policy
    if not isinstance(policy, Lineage):
        return {}  # uncached cards have nothing to compute once
    return {"cache_policy": policy.configure(isolation_level="SERIALIZABLE", lock_manager=locks)}


def default_checkpoints_root() -> str:
    """Where training checkpoints are filed by lineage when no folder is given."""
    from pathlib import Path

    from prefect.settings import PREFECT_HOME

    return str(Path(PREFECT_HOME.value()).expanduser() / "prefect-torch" / "checkpoints")
