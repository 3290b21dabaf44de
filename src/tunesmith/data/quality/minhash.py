"""MinHash signatures and LSH banding: near-duplicate texts found in one streamed pass.

MinHash (Broder 1997): two texts have the same minimum hash over their shingles with probability
equal to their Jaccard similarity, so NUM_PERM minimum hashes estimate it. LSH banding (Leskovec,
Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3) hashes bands of a signature so that similar
texts share a band key and become candidates without comparing every pair. Stored signatures keep
the lowest 8 bits of each minimum (b-bit minwise hashing, Li & König 2010): 128 bytes a text,
whatever its length.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

from tunesmith.data.quality.keyindex import KeyIndex

__all__ = [
    "NUM_PERM",
    "NearDuplicateIndex",
    "estimate_jaccard",
    "lsh_params",
    "shingle_size",
    "signatures",
]

NUM_PERM = 128
_MAX_BANDS = 16  # each band costs 8 bytes a row in the index
_CANDIDATES_PER_BAND = 4  # the earliest rows sharing a band key that are compared with a text
_CHUNK = 1 << 14  # shingles hashed at once: bounds the (chunk, NUM_PERM) temporary to 16 MiB
_BITS = 8  # bits of each minimum kept for verification
_WORD = re.compile(r"\w+")

# Fixed seeds: the same data gives the same report on every run and machine.
_RNG = np.random.default_rng(0x5EED)
_A = _RNG.integers(1, 2**63, NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd multipliers
_B = _RNG.integers(0, 2**63, NUM_PERM, dtype=np.uint64)
_MIX = _RNG.integers(1, 2**63, NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def shingle_size(words: int) -> int:
    """Words per shingle: 1 under 20 words, 2 under 30, then 3.

    A one-word edit changes `n` shingles, so a text of `w` words keeps Jaccard (w - 2n + 1) / (w + 1)
    with itself edited: at least 0.8 from 10 words on. Fixed 3-word shingles would put one edit in a
    12-word review at 0.54, far below any useful threshold.
    """
    return min(3, max(1, words // 10))


def signatures(texts: Sequence[str]) -> np.ndarray:
    """MinHash signatures of texts over their lower-cased word shingles: shape (len(texts), NUM_PERM), uint32.

    A text without word characters is one shingle: its whitespace-normalised self.
    """
    shingles, owner = _shingles(texts)
    out = np.full((len(texts), NUM_PERM), np.iinfo(np.uint32).max, dtype=np.uint32)
    for start in range(0, len(shingles), _CHUNK):
        x, rows = shingles[start : start + _CHUNK], owner[start : start + _CHUNK]
        # Multiply-add-shift hashing (Dietzfelbinger 1996): (a x + b) mod 2^64, top 32 bits.
        hashed = np.multiply.outer(x, _A)  # (S, P) uint64, wraps mod 2^64
        hashed += _B
        hashed >>= np.uint64(32)
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        mins = np.minimum.reduceat(hashed, starts, axis=0).astype(np.uint32)
        out[rows[starts]] = np.minimum(out[rows[starts]], mins)
    return out


def _shingles(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every text's word shingles (uint64) and the text each belongs to (sorted)."""
    words = [_WORD.findall(text.lower()) or [" ".join(text.lower().split())] for text in texts]
    counts = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    hashes = np.fromiter(
        (zlib.crc32(word.encode()) for text_words in words for word in text_words),
        dtype=np.uint64,
        count=int(counts.sum()),
    )
    owner = np.repeat(np.arange(len(texts)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    size = np.minimum(3, np.maximum(1, counts // 10))[owner]  # shingle_size, per word
    # A shingle starts at every word that has size - 1 more words of its text after it.
    starts = np.flatnonzero(np.arange(len(hashes)) - first + size <= counts[owner])
    combined = hashes[starts] * _MIX[0]
    for k in (1, 2):
        longer = starts[size[starts] > k]
        combined[size[starts] > k] ^= hashes[longer + k] * _MIX[k]
    return combined >> np.uint64(32), owner[starts]


def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """Bands and rows per band: the longest bands (fewest false candidates) that still make a pair
    at exactly `threshold` a candidate with probability at least 0.9 (at most 16 bands)."""
    for rows in range(num_perm, 0, -1):
        bands = min(_MAX_BANDS, num_perm // rows)
        if 1 - (1 - threshold**rows) ** bands >= 0.9:
            return bands, rows
    return min(_MAX_BANDS, num_perm), 1


def estimate_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Jaccard similarity estimated from stored (8-bit) signatures, row by row.

    Two 8-bit minima agree by chance with probability 1/256 when the full minima differ, so the
    share that agree, m, estimates J + (1 - J) / 256.
    """
    chance = 1.0 / (1 << _BITS)
    agree = (a == b).mean(axis=1)
    return np.clip((agree - chance) / (1.0 - chance), 0.0, 1.0)


class NearDuplicateIndex:
    """Signatures of the texts seen so far, banded for lookup; about 256 bytes a text.

    Args:
        threshold: estimated Jaccard similarity from which two texts are near duplicates.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.bands, self.rows_per_band = lsh_params(threshold)
        self._index = [KeyIndex(np.uint32) for _ in range(self.bands)]
        self._stored = _SignatureStore()
        self._mix = _MIX[: self.rows_per_band]

    def add(self, rows: np.ndarray, sigs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index texts (rows must be increasing and above every row added before).

        Returns:
            For each text, the earliest earlier indexed row it near-duplicates (or -1), and the
            estimated Jaccard similarity with it (0 where none).
        """
        keys = self._band_keys(sigs)
        self._stored.set(rows, _compact(sigs))
        for band, index in enumerate(self._index):
            index.add(keys[:, band], rows)
        candidates = self._candidates(keys)
        candidates[candidates >= rows[:, None]] = -1  # itself and later texts of the same batch
        return self._verify(_compact(sigs), candidates)

    def query(self, sigs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For texts not indexed (e.g. validation rows): the earliest indexed row each one
        near-duplicates (or -1), and the estimated Jaccard similarity with it."""
        return self._verify(_compact(sigs), self._candidates(self._band_keys(sigs)))

    def _band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """One 32-bit key per band: a multiply-shift hash of the band's minima, shape (N, bands)."""
        used = sigs[:, : self.bands * self.rows_per_band].astype(np.uint64)
        banded = used.reshape(len(sigs), self.bands, self.rows_per_band)
        return ((banded * self._mix).sum(axis=2, dtype=np.uint64) >> np.uint64(32)).astype(np.uint32)

    def _candidates(self, keys: np.ndarray) -> np.ndarray:
        found = [index.matches(keys[:, band], _CANDIDATES_PER_BAND) for band, index in enumerate(self._index)]
        return np.concatenate(found, axis=1) if found else np.full((len(keys), 0), -1, dtype=np.int64)

    def _verify(self, compact: np.ndarray, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keep the candidates whose estimated Jaccard reaches the threshold; the earliest wins."""
        best = np.full(len(compact), -1, dtype=np.int64)
        similarity = np.zeros(len(compact))
        query, column = np.nonzero(candidates >= 0)
        if not len(query):
            return best, similarity
        pairs = np.unique(np.stack([query, candidates[query, column]], axis=1), axis=0)  # sorted by (query, row)
        estimate = estimate_jaccard(compact[pairs[:, 0]], self._stored.get(pairs[:, 1]))
        kept = pairs[estimate >= self.threshold]
        estimate = estimate[estimate >= self.threshold]
        first = np.r_[True, kept[1:, 0] != kept[:-1, 0]] if len(kept) else np.zeros(0, dtype=bool)
        best[kept[first, 0]] = kept[first, 1]
        similarity[kept[first, 0]] = estimate[first]
        return best, similarity


class _SignatureStore:
    """Stored (8-bit) signatures by row, in fixed blocks of rows: growing never copies what is
    stored, so memory stays at the signatures themselves (a grown single array would briefly
    hold the old and the new copy)."""

    _SHIFT = 16  # 65,536 rows (8 MiB) a block

    def __init__(self) -> None:
        self._blocks: list[np.ndarray] = []

    def set(self, rows: np.ndarray, compact: np.ndarray) -> None:
        block_of = rows >> self._SHIFT
        for block in np.unique(block_of):
            while len(self._blocks) <= block:
                self._blocks.append(np.zeros((1 << self._SHIFT, NUM_PERM), dtype=np.uint8))
            chosen = block_of == block
            self._blocks[block][rows[chosen] & ((1 << self._SHIFT) - 1)] = compact[chosen]

    def get(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), NUM_PERM), dtype=np.uint8)
        block_of = rows >> self._SHIFT
        for block in np.unique(block_of):
            chosen = block_of == block
            out[chosen] = self._blocks[block][rows[chosen] & ((1 << self._SHIFT) - 1)]
        return out


def _compact(sigs: np.ndarray) -> np.ndarray:
    return (sigs & ((1 << _BITS) - 1)).astype(np.uint8)
