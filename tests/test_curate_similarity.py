"""ROUGE-L against hand-computed values and a DP reference; MinHash dedup on real Alpaca data with planted
near-duplicates, checked against brute-force Jaccard."""

from __future__ import annotations

import dataclasses
import random

import pytest

from jaxtune.curate import records
from jaxtune.curate.filter import dedup_minhash, dedup_rouge
from jaxtune.curate.report import CurateReport
from jaxtune.curate.similarity import (MinHashIndex, RougeIndex, jaccard, lcs_length, lsh_params, rouge_l,
                                       shingles, words)


def _lcs_dp(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_words_case_punctuation_and_scripts():
    assert words("The Cat's hat, (2024)!") == ["the", "cat", "s", "hat", "2024"]
    assert words("snake_case Ｆｕｌｌ") == ["snake", "case", "full"]  # underscore splits; NFKC folds width
    assert words("Добрый день") == ["добрый", "день"]


@pytest.mark.parametrize("cand, ref, expected", [
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6),  # LCS 5 of 6 and 6
    ("police kill the gunman", "police killed the gunman", 3 / 4),  # Lin (2004): LCS 3 of 4 and 4
    ("the gunman kill police", "police killed the gunman", 2 / 4),  # LCS "the gunman"
    ("a b c d", "a x c", 4 / 7),  # P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    ("The CAT!", "the cat", 1.0),
    ("dog", "the cat", 0.0),
    ("", "the cat", 0.0),
])
def test_rouge_l_hand_computed(cand, ref, expected):
    assert rouge_l(cand, ref) == pytest.approx(expected)


def test_lcs_bit_parallel_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]  # > 64 tokens crosses a machine word
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == _lcs_dp(a, b)


@pytest.fixture(scope="module")
def alpaca(assets_dir):
    from jaxtune.data.formats import load_records

    convs, _ = load_records(assets_dir / "data" / "alpaca_data_1k.json")
    # The file is one line, so give every record its own source to tell matches apart.
    return [dataclasses.replace(c, source=f"alpaca#{i}") for i, c in enumerate(convs)]


def test_rouge_index_matches_brute_force(alpaca):
    texts = [records.instruction(c) for c in alpaca[:400]]
    index = RougeIndex(threshold=0.4)
    for t in texts[:300]:
        index.add(t)
    hits = 0
    for t in texts[300:]:
        scores = [rouge_l(t, kept) for kept in texts[:300]]
        best = max(scores)
        match, score = index.best_match(t)
        if best >= 0.4:
            hits += 1
            assert score == pytest.approx(best) and scores[match] == pytest.approx(best)
        else:
            assert match is None
    assert hits > 0  # the threshold is low enough that the bound pruning is exercised on real matches


def _plant(conv, how: str, rng: random.Random):
    text = records.responses(conv)[-1]
    toks = text.split()
    if how == "case":
        new = text.upper().replace(".", " .").replace(",", "")
    elif how == "swap":
        i = rng.randrange(len(toks) // 3, 2 * len(toks) // 3)
        new = " ".join(toks[:i] + ["entirely"] + toks[i + 1:])
    else:
        new = text + " Hope this helps."
    msgs = [dict(m) for m in conv.messages]
    msgs[-1]["content"] = new
    return dataclasses.replace(conv, messages=msgs, source=f"planted {how} of {conv.source}")


def _exact_keep(convs, threshold, n):
    """Keep-first dedup by exact Jaccard against every kept text that shares a shingle (others score 0)."""
    kept, sets, by_shingle = [], [], {}
    for c in convs:
        sh = shingles(words(records.full_text(c)), n)
        others = {i for s in sh for i in by_shingle.get(s, ())}
        if not any(jaccard(sh, sets[i]) >= threshold for i in others):
            for s in sh:
                by_shingle.setdefault(s, []).append(len(sets))
            kept.append(c.source)
            sets.append(sh)
    return kept


def test_minhash_finds_planted_near_duplicates_and_keeps_distinct(alpaca):
    rng = random.Random(0)
    long = [c for c in alpaca if len(records.responses(c)[-1].split()) >= 60]
    originals = rng.sample(long, 30)
    planted = [_plant(c, ("case", "swap", "append")[i % 3], rng) for i, c in enumerate(originals)]
    for orig, copy in zip(originals, planted):  # precondition: every plant is clearly above the threshold
        a, b = (shingles(words(records.full_text(c)), 3) for c in (orig, copy))
        assert jaccard(a, b) >= 0.85
    data = alpaca + planted
    report = CurateReport("dedup", records_in=len(data))
    kept = dedup_minhash(data, report, threshold=0.7, ngram=3, seed=0)
    kept_sources = {c.source for c in kept}
    assert not kept_sources & {c.source for c in planted}
    dropped = {r.item.source: r.detail for r in report.rejects}
    for orig, copy in zip(originals, planted):
        assert f"near-duplicate of {orig.source} " in dropped[copy.source]
    # No false positives (matches are verified) and, here, no misses: same as exact Jaccard on all pairs.
    assert [c.source for c in kept] == _exact_keep(data, 0.7, 3)
    assert len(kept) >= 990  # the real data is nearly all distinct


def test_minhash_is_deterministic_by_seed():
    sigs = [MinHashIndex(seed=s).signature({"a b c", "b c d"}) for s in (0, 0, 1)]
    assert (sigs[0] == sigs[1]).all() and not (sigs[0] == sigs[2]).all()


def test_lsh_params_recall_at_threshold():
    for threshold in (0.5, 0.7, 0.9):
        bands, rows = lsh_params(128, threshold)
        assert bands * rows <= 128
        assert 1 - (1 - threshold ** rows) ** bands >= 0.99
        # one more row per band would miss more than 1% of pairs at the threshold
        assert 1 - (1 - threshold ** (rows + 1)) ** (128 // (rows + 1)) < 0.99


def test_rouge_dedup_drops_paraphrased_instructions(alpaca):
    base = alpaca[:50]
    para = []
    for c in base[:5]:
        msgs = [dict(m) for m in c.messages]
        msgs[-2] = {"role": "user", "content": "Please " + records.prompt(c)}
        para.append(dataclasses.replace(c, messages=msgs, source=f"para {c.source}"))
    report = CurateReport("dedup", records_in=55)
    kept = dedup_rouge(base + para, report, on="prompt", threshold=0.7)
    assert [c.source for c in kept] == [c.source for c in base]
    assert report.rejected == {"near duplicate (ROUGE-L)": 5}
