"""The text_similarity grader's metrics, each `metric(output, reference) -> float` in [0, 1].

Word metrics read lowercased `\\w+` tokens. BLEU is sentence BLEU (Papineni et al., 2002) over 1..4-grams
with add-one smoothing above unigrams; GLEU is Google's sentence GLEU (Wu et al., 2016); ROUGE-N and
ROUGE-L are F1 (Lin, 2004); fuzzy_match is rapidfuzz's ratio (rapidfuzz comes with jiwer).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = ["METRICS"]


def _words(text: str) -> list[str]:
    """Lowercased word tokens, punctuation dropped (as rouge-score's tokenizer, but keeping non-ASCII letters)."""
    return re.findall(r"\w+", text.lower())


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _f1(overlap: int, predicted: int, reference: int) -> float:
    if not overlap:
        return 0.0
    precision, recall = overlap / predicted, overlap / reference
    return 2 * precision * recall / (precision + recall)


def _rouge_n(n: int) -> Callable[[str, str], float]:
    """ROUGE-N (Lin 2004) as an F1 of shared n-grams, as rouge-score reports it."""

    def score(text: str, reference: str) -> float:
        ours, theirs = _ngrams(_words(text), n), _ngrams(_words(reference), n)
        return _f1(sum((ours & theirs).values()), sum(ours.values()), sum(theirs.values()))

    return score


def _rouge_l(text: str, reference: str) -> float:
    """ROUGE-L: F1 of the longest common subsequence of words."""
    ours, theirs = _words(text), _words(reference)
    previous = [0] * (len(theirs) + 1)
    for word in ours:
        row = [0]
        for j, other in enumerate(theirs):
            row.append(previous[j] + 1 if word == other else max(previous[j + 1], row[j]))
        previous = row
    return _f1(previous[-1], len(ours), len(theirs))


def _bleu(text: str, reference: str) -> float:
    """Sentence BLEU (Papineni et al. 2002): geometric mean of 1..4-gram precisions (up to the shorter
    text's length), n > 1 smoothed by add-one (Lin & Och 2004, NLTK's method2), times the brevity penalty."""
    ours, theirs = _words(text), _words(reference)
    orders = min(4, len(ours), len(theirs))
    if not orders:
        return 0.0
    log_sum = 0.0
    for n in range(1, orders + 1):
        mine = _ngrams(ours, n)
        matches, total = sum((mine & _ngrams(theirs, n)).values()), sum(mine.values())
        if n == 1 and not matches:
            return 0.0
        log_sum += math.log(matches / total if n == 1 else (matches + 1) / (total + 1))
    brevity = min(1.0, math.exp(1 - len(theirs) / len(ours)))
    return brevity * math.exp(log_sum / orders)


def _gleu(text: str, reference: str) -> float:
    """Sentence GLEU (Wu et al. 2016): min(precision, recall) over all shared 1..4-grams together."""
    ours, theirs = _words(text), _words(reference)
    mine = sum((_ngrams(ours, n) for n in range(1, 5)), Counter())
    other = sum((_ngrams(theirs, n) for n in range(1, 5)), Counter())
    matches = sum((mine & other).values())
    if not matches:
        return 0.0
    return min(matches / sum(mine.values()), matches / sum(other.values()))


def _fuzzy(text: str, reference: str) -> float:
    """rapidfuzz's normalised Indel similarity (fuzz.ratio / 100); rapidfuzz comes with jiwer, a dependency."""
    from rapidfuzz import fuzz

    return float(fuzz.ratio(text, reference)) / 100.0


METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": _fuzzy,
    "bleu": _bleu,
    "gleu": _gleu,
    **{f"rouge_{n}": _rouge_n(n) for n in range(1, 6)},
    "rouge_l": _rouge_l,
}
