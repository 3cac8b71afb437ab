"""Text similarity for curation: word tokens, ROUGE-L, and MinHash with LSH banding.

Both indexes answer "is this text too close to one already kept?" without comparing against every kept text:
ROUGE-L prunes with a bag-of-words bound, MinHash with band buckets; each then verifies its candidates
exactly, so a reported match is always a true one. Everything is deterministic: shingles are hashed with
blake2b (Python's `hash` is salted per process) and the MinHash permutations come from a seeded generator.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from array import array
from collections import Counter

import numpy as np

_WORD = re.compile(r"[^\W_]+")
_PRIME = (1 << 31) - 1  # Mersenne prime: a*x+b of 31-bit values never overflows uint64


def words(text: str) -> list[str]:
    """Case-folded runs of letters/digits, punctuation dropped. For ASCII text this is `rouge_score`'s
    default tokenizer; unlike it, letters of every script are kept."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def _tokens(x: str | list[str]) -> list[str]:
    return words(x) if isinstance(x, str) else x


# ------------------------------------------------------------------------------------------------ ROUGE-L

def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence length, bit-parallel (Allison-Dix): bit i of `v` is set while a[i] is not
    yet matched, and each token of `b` updates all of `a` in one big-integer step."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(candidate: str | list[str], reference: str | list[str]) -> float:
    """ROUGE-L F1 (beta 1, `rouge_score`'s `fmeasure`): P = LCS/len(candidate), R = LCS/len(reference)."""
    cand, ref = _tokens(candidate), _tokens(reference)
    lcs = lcs_length(ref, cand)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(cand), lcs / len(ref)
    return 2 * p * r / (p + r)


class RougeIndex:
    """Texts kept so far; `best_match` finds the most ROUGE-L-similar one at or above `threshold`.

    The LCS of two texts is at most their multiset word overlap, so F1 <= 2*overlap/(m+n). Overlaps with
    every kept text come from an inverted index in a few numpy ops; only texts whose bound reaches the
    threshold get an exact LCS, best bound first, stopping once no bound can beat the best exact score.
    """

    def __init__(self, threshold: float = 0.7):
        if not 0 < threshold <= 1:
            raise ValueError(f"ROUGE-L threshold {threshold} must be in (0, 1]")
        self.threshold = threshold
        self.texts: list[list[str]] = []
        self._lengths = array("i")
        self._ids: dict[str, array] = {}
        self._counts: dict[str, array] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str | list[str]) -> int:
        tokens = _tokens(text)
        idx = len(self.texts)
        self.texts.append(tokens)
        self._lengths.append(len(tokens))
        for tok, c in Counter(tokens).items():
            self._ids.setdefault(tok, array("i")).append(idx)
            self._counts.setdefault(tok, array("i")).append(c)
        return idx

    def best_match(self, text: str | list[str]) -> tuple[int | None, float]:
        """(index, ROUGE-L F1) of the most similar kept text at or above the threshold, else (None, 0.0)."""
        tokens = _tokens(text)
        if not tokens or not self.texts:
            return None, 0.0
        overlap = np.zeros(len(self.texts), np.int64)
        for tok, c in Counter(tokens).items():
            if tok in self._ids:
                ids = np.frombuffer(self._ids[tok], np.int32)
                overlap[ids] += np.minimum(np.frombuffer(self._counts[tok], np.int32), c)
        bound = 2 * overlap / (len(tokens) + np.frombuffer(self._lengths, np.int32))
        best, best_score = None, 0.0
        for i in np.argsort(-bound, kind="stable"):
            if bound[i] < self.threshold or bound[i] <= best_score:
                break
            score = rouge_l(tokens, self.texts[i])
            if score >= self.threshold and score > best_score:
                best, best_score = int(i), score
        return best, best_score


# ------------------------------------------------------------------------------------------------ MinHash

def shingles(tokens: list[str], n: int) -> set[str]:
    """Word n-grams; a text shorter than n words is one shingle (so short texts still compare)."""
    if len(tokens) < n:
        return {" ".join(tokens)} if tokens else set()
    return {" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def _hash31(shingle: str) -> int:
    return int.from_bytes(hashlib.blake2b(shingle.encode("utf-8"), digest_size=8).digest(), "little") % _PRIME


def lsh_params(num_perm: int, threshold: float, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest chance candidates) for which a pair with Jaccard exactly
    `threshold` still shares a band with probability >= `recall`; more similar pairs do so more often."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= recall:
            best = (bands, rows)
    return best


class MinHashIndex:
    """Kept texts as MinHash signatures over word n-gram shingles, bucketed per LSH band.

    `best_match` checks only texts sharing a band bucket, by exact Jaccard of the shingle sets.
    """

    def __init__(self, threshold: float = 0.7, num_perm: int = 128, ngram: int = 3, seed: int = 0):
        if not 0 < threshold <= 1:
            raise ValueError(f"MinHash threshold {threshold} must be in (0, 1]")
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, _PRIME, num_perm, dtype=np.uint64)
        self.b = rng.integers(0, _PRIME, num_perm, dtype=np.uint64)
        self.threshold, self.ngram = threshold, ngram
        self.bands, self.rows = lsh_params(num_perm, threshold)
        self.sets: list[set[str]] = []
        self._buckets: dict[tuple[int, bytes], list[int]] = {}

    def __len__(self) -> int:
        return len(self.sets)

    def signature(self, shingle_set: set[str]) -> np.ndarray:
        x = np.fromiter((_hash31(s) for s in shingle_set), np.uint64, len(shingle_set))
        return ((self.a[:, None] * x[None, :] + self.b[:, None]) % _PRIME).min(axis=1)

    def _keys(self, shingle_set: set[str]) -> list[tuple[int, bytes]]:
        sig = self.signature(shingle_set)
        return [(j, sig[j * self.rows:(j + 1) * self.rows].tobytes()) for j in range(self.bands)]

    def best_match(self, text: str | list[str]) -> tuple[int | None, float]:
        """(index, Jaccard) of the most similar kept text at or above the threshold, else (None, 0.0)."""
        sh = shingles(_tokens(text), self.ngram)
        if not sh or not self.sets:
            return None, 0.0
        candidates = sorted({i for key in self._keys(sh) for i in self._buckets.get(key, ())})
        best, best_score = None, 0.0
        for i in candidates:
            score = jaccard(sh, self.sets[i])
            if score >= self.threshold and score > best_score:
                best, best_score = i, score
        return best, best_score

    def add(self, text: str | list[str]) -> int:
        sh = shingles(_tokens(text), self.ngram)
        idx = len(self.sets)
        self.sets.append(sh)
        if sh:
            for key in self._keys(sh):
                self._buckets.setdefault(key, []).append(idx)
        return idx
