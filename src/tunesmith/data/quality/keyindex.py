"""Compact per-row state for checks that stream millions of rows: growable numpy arrays, and an
index from integer keys to the rows that had them.

The index is a log-structured merge of sorted runs (O'Neil et al. 1996, "The LSM-tree"): each batch
of keys becomes a sorted run, runs of similar size are merged, so there are O(log n) runs and a lookup
is one binary search per run. Memory is the keys and the row numbers, nothing per key beyond that.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["GrowingArray", "KeyIndex"]


class GrowingArray:
    """A numpy array indexed by row number that grows as rows arrive (geometrically, like a list).

    Rows never set hold `fill`.
    """

    def __init__(self, dtype: Any, width: int | None = None, fill: int = 0) -> None:
        self._shape_tail: tuple[int, ...] = () if width is None else (width,)
        self._fill = fill
        self._data = np.full((1024, *self._shape_tail), fill, dtype=dtype)

    @property
    def data(self) -> np.ndarray:
        """The whole backing array (valid up to the highest row set so far)."""
        return self._data

    def reserve(self, size: int) -> None:
        """Make rows `0 .. size - 1` addressable."""
        if size <= len(self._data):
            return
        capacity = max(size, len(self._data) * 3 // 2)  # x1.5: less slack than doubling at a million rows
        grown = np.full((capacity, *self._shape_tail), self._fill, dtype=self._data.dtype)
        grown[: len(self._data)] = self._data
        self._data = grown

    def set(self, rows: np.ndarray, values: Any) -> None:
        """`array[rows] = values`, growing first where needed."""
        if len(rows):
            self.reserve(int(rows.max()) + 1)
            self._data[rows] = values

    def get(self, rows: np.ndarray) -> np.ndarray:
        return self._data[rows]


class KeyIndex:
    """Which rows had a key: integer keys mapped to row numbers, added in increasing row order.

    Each `add` makes a sorted run; equal keys keep their row order, so the first match in the
    oldest run that has the key is the earliest row with it.
    """

    def __init__(self, key_dtype: Any) -> None:
        self._dtype = np.dtype(key_dtype)
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted keys, their rows), oldest first

    def __len__(self) -> int:
        return sum(len(keys) for keys, _ in self._runs)

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Index `keys[i]` as seen at row `rows[i]`; rows must exceed every row added before."""
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        self._runs.append((keys.astype(self._dtype)[order], rows.astype(np.int32)[order]))
        # Merge while the previous run is no more than twice as long: O(log n) runs, like a binary counter.
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            newer = self._runs.pop()
            self._runs[-1] = _merge(self._runs[-1], newer)

    def first(self, keys: np.ndarray) -> np.ndarray:
        """The earliest row that had each key, or -1."""
        found = np.full(len(keys), -1, dtype=np.int64)
        for run_keys, run_rows, left in self._searches(keys):
            at, hit = _at(run_keys, keys, left)
            new = hit & (found < 0)
            found[new] = run_rows[at[new]]
        return found

    def matches(self, keys: np.ndarray, cap: int) -> np.ndarray:
        """Up to `cap` earliest rows per run that had each key: shape (len(keys), runs * cap), -1 padded."""
        columns = []
        for run_keys, run_rows, left in self._searches(keys):
            for offset in range(cap):
                at, hit = _at(run_keys, keys, left + offset)
                columns.append(np.where(hit, run_rows[at], -1))
        if not columns:
            return np.full((len(keys), 0), -1, dtype=np.int64)
        return np.stack(columns, axis=1).astype(np.int64)

    def _searches(self, keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Each run with the position of the first entry >= each key (searched in key order,
        which numpy's binary search does faster than random order)."""
        keys = keys.astype(self._dtype)
        order = np.argsort(keys)
        for run_keys, run_rows in self._runs:
            left = np.empty(len(keys), dtype=np.int64)
            left[order] = np.searchsorted(run_keys, keys[order], side="left")
            yield run_keys, run_rows, left


def _at(run_keys: np.ndarray, keys: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions `at` clipped into the run, and whether the entry there equals the key."""
    inside = at < len(run_keys)
    at = np.where(inside, at, 0)
    return at, inside & (run_keys[at] == keys.astype(run_keys.dtype))


def _merge(older: tuple[np.ndarray, np.ndarray], newer: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Merge two sorted runs in linear time; equal keys put the older rows first."""
    old_keys, old_rows = older
    new_keys, new_rows = newer
    positions = np.searchsorted(old_keys, new_keys, side="right") + np.arange(len(new_keys))
    keys = np.empty(len(old_keys) + len(new_keys), dtype=old_keys.dtype)
    rows = np.empty(len(keys), dtype=np.int32)
    is_old = np.ones(len(keys), dtype=bool)
    is_old[positions] = False
    keys[positions], rows[positions] = new_keys, new_rows
    keys[is_old], rows[is_old] = old_keys, old_rows
    return keys, rows
