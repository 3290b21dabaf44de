"""Reproducible splits and samples by a stable hash of each example's text.

A hash (not a random generator) decides where an example goes, so a split is the same on every
run, machine and Python version, adding rows barely moves existing ones, and exact duplicates
always land on the same side (no train/validation leakage).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol, TypeVar

from tunesmith.errors import DataError

__all__ = ["Keyed", "example_key", "sample", "split_by_hash", "stable_hash"]


class Keyed(Protocol):
    """An example as splits and samples see it: a label (None for unlabelled kinds) and a key that is
    equal for exact copies (every example class in tunesmith.data has both)."""

    @property
    def label(self) -> str | None: ...

    def key(self) -> str: ...


_E = TypeVar("_E", bound=Keyed)


def stable_hash(text: str, salt: str = "") -> float:
    """A number in [0, 1) from `sha1(salt + text)`: stable across runs, machines and Python versions."""
    digest = hashlib.sha1((salt + text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_hash(examples: Sequence[_E], fraction: float, salt: str = "split") -> tuple[list[_E], list[_E]]:
    """Split off about `fraction` of each label's examples, chosen by hash.

    Within each label (unlabelled examples form one group) the `round(fraction * n)` examples with the
    lowest hash go to the second list: at least one when the group has two or more examples, never the
    whole group. Copies of one text (text and text pair) move together; copies that carry different
    labels and were split apart all go to the first list.

    Args:
        examples: the examples to split.
        fraction: the share for the second list, in [0, 1).
        salt: changes the split; keep it fixed for a reproducible one.

    Returns:
        (first, second), each in input order; together they hold every example exactly once.

    Raises:
        DataError: `fraction` is outside [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"split fraction {fraction} must be at least 0 and below 1 (data.validation)")
    keys = [example_key(ex) for ex in examples]
    groups: dict[str | None, list[int]] = {}
    for index, ex in enumerate(examples):
        groups.setdefault(ex.label, []).append(index)
    picked: set[str] = set()
    kept: set[str] = set()
    for indices in groups.values():
        group_keys = {keys[i] for i in indices}
        group_picked = _pick_keys([keys[i] for i in indices], fraction, salt)
        picked |= group_picked
        kept |= group_keys - group_picked
    # A text picked under one label but kept under another would leak: all its copies stay first.
    held_out = picked - kept
    first_list = [ex for ex, key in zip(examples, keys, strict=True) if key not in held_out]
    second_list = [ex for ex, key in zip(examples, keys, strict=True) if key in held_out]
    return first_list, second_list


def sample(examples: Sequence[_E], n: int, seed: int) -> list[_E]:
    """A reproducible sample of `n` examples (all of them when `n >= len(examples)`).

    The `n` examples with the lowest `stable_hash(text, salt=f"sample-{seed}")`, in input order.

    Raises:
        DataError: `n` is negative.
    """
    if n < 0:
        raise DataError(f"sample size {n} must not be negative (data.limit)")
    if n >= len(examples):
        return list(examples)
    salt = f"sample-{seed}"
    ranked = sorted(range(len(examples)), key=lambda i: (stable_hash(example_key(examples[i]), salt), i))
    chosen = set(ranked[:n])
    return [ex for i, ex in enumerate(examples) if i in chosen]


def _pick_keys(keys: list[str], fraction: float, salt: str) -> set[str]:
    """The keys of one label group that go to the second list, lowest hash first."""
    n = len(keys)
    target = round(fraction * n)
    if fraction > 0 and n >= 2:
        target = max(target, 1)
    target = min(target, n - 1)
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    picked: set[str] = set()
    taken = 0
    for key in sorted(counts, key=lambda k: (stable_hash(k, salt), k)):
        if taken >= target:
            break
        if taken + counts[key] < n:  # never the whole group
            picked.add(key)
            taken += counts[key]
    return picked


def example_key(example: Keyed) -> str:
    """What the hash sees: the example's own key, so exact duplicates share a side."""
    return example.key()
