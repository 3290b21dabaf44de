"""Few-shot sampling and replay mixing (DESIGN §6).

Few-shot: K rows per label, chosen by a seeded stable hash, so a (data, K, seed) triple always
gives the same rows and a different seed gives a different draw (few-shot results vary with the
draw; `tunesmith compare --shots --seeds` shows how much). Replay (experience replay against
catastrophic forgetting; e.g. de Masson d'Autume et al. 2019): rows of a retention set mixed into
every epoch at a given share of the training rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

from tunesmith.data.split import Keyed, example_key, stable_hash
from tunesmith.errors import DataError

__all__ = ["few_shot", "replay_rows"]

_E = TypeVar("_E", bound=Keyed)


def few_shot(examples: Sequence[_E], k: int, seed: int) -> list[_E]:
    """K examples of each label (all of a label's examples when it has fewer), in input order.

    Unlabelled examples (instruction rows) form one group, so K rows are kept in all.

    Raises:
        DataError: `k` is not positive.
    """
    if k <= 0:
        raise DataError(f"data.few_shot={k}: must be a positive number of rows per label")
    salt = f"few-shot-{seed}"
    groups: dict[Any, list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(example.label, []).append(index)
    chosen: set[int] = set()
    for indices in groups.values():
        ranked = sorted(indices, key=lambda i: (stable_hash(example_key(examples[i]), salt), i))
        chosen.update(ranked[:k])
    return [ex for i, ex in enumerate(examples) if i in chosen]


def replay_rows(replay: Sequence[_E], n_train: int, fraction: float, seed: int) -> list[_E]:
    """Rows of the retention set to add so they make up `fraction` of the mixed training set.

    With n training rows, r = n * fraction / (1 - fraction) replay rows are added (cycling through
    the set in a seeded order when it is smaller); the loop shuffles them in with the rest, so each
    batch holds about `fraction` replay rows.
    """
    if not replay:
        raise DataError("data.replay.path: the replay set has no rows")
    wanted = math.ceil(n_train * fraction / (1.0 - fraction))
    salt = f"replay-{seed}"
    order = sorted(range(len(replay)), key=lambda i: (stable_hash(example_key(replay[i]), salt), i))
    return [replay[order[i % len(order)]] for i in range(wanted)]
