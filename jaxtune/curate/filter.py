"""Quality filters and deduplication over normalised conversations, each step named and counted.

A check is `(name, fn)` with `fn(conversation) -> None` to keep it or a short reason to reject it. `curate`
runs the quality checks, then the chosen dedup passes (exact, MinHash, ROUGE-L), and returns the kept
conversations with a `CurateReport`. Dedup keeps the first occurrence: a record is dropped when it matches
one already kept.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from typing import Callable

from jaxtune.curate import records
from jaxtune.curate.report import CurateReport
from jaxtune.curate.similarity import MinHashIndex, RougeIndex, lcs_length, rouge_l, words
from jaxtune.data.formats import Conversation

Check = Callable[[Conversation], "str | None"]

# Lower-case; apostrophes are normalised to ' before matching.
REFUSAL_PHRASES = (
    "as an ai language model", "as a language model", "as an ai assistant", "as an ai model",
    "i'm just an ai", "i am just an ai", "i'm sorry, but i cannot", "i'm sorry, but i can't",
    "i am sorry, but i cannot", "i cannot fulfill", "i can't fulfill", "i cannot assist with",
    "i can't assist with", "i'm not able to provide", "i am not able to provide", "i do not have personal",
    "i don't have personal opinions", "my knowledge cutoff", "trained by openai", "developed by openai",
)
DEDUP_METHODS = ("exact", "minhash", "rougeL")
DEDUP_ON = ("all", "prompt", "response")
# Control, private use, unassigned, surrogate. Not format (Cf): zero-width joiners are normal in many scripts.
_BAD_CATEGORIES = ("Cc", "Co", "Cn", "Cs")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds for `curate`. Word counts use `similarity.words`; `max_tokens` needs a tokenizer."""

    min_response_words: int = 1
    max_response_words: int = 4096
    max_prompt_words: int = 4096
    max_tokens: int | None = None
    echo_threshold: float = 0.9
    echo_max_new_words: int = 1
    refusal_phrases: tuple[str, ...] = REFUSAL_PHRASES
    max_symbol_ratio: float = 0.5
    max_bad_char_ratio: float = 0.01
    language: str | None = None
    dedup: tuple[str, ...] = ("exact", "minhash")
    dedup_on: str = "all"
    minhash_threshold: float = 0.7
    minhash_ngram: int = 3
    num_perm: int = 128
    rouge_threshold: float = 0.7
    seed: int = 0

    def __post_init__(self):
        bad = [m for m in self.dedup if m not in DEDUP_METHODS]
        if bad:
            raise ValueError(f"unknown dedup method(s) {bad}; choose from {', '.join(DEDUP_METHODS)}")
        if self.dedup_on not in DEDUP_ON:
            raise ValueError(f"dedup_on={self.dedup_on!r}: choose from {', '.join(DEDUP_ON)}")
        if self.min_response_words > self.max_response_words:
            raise ValueError(f"min_response_words={self.min_response_words} exceeds "
                             f"max_response_words={self.max_response_words}")
        for name in ("echo_threshold", "max_symbol_ratio", "max_bad_char_ratio", "minhash_threshold",
                     "rouge_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be between 0 and 1")


# ------------------------------------------------------------------------------------------------ checks

def check_empty(conv: Conversation) -> str | None:
    for i, r in enumerate(records.responses(conv)):
        if not words(r):
            return f"response {i + 1} has no words ({r.strip()[:20]!r})"
    return None


def check_response_length(conv: Conversation, lo: int, hi: int) -> str | None:
    for i, r in enumerate(records.responses(conv)):
        n = len(words(r))
        if not lo <= n <= hi:
            return f"response {i + 1} has {n} words, outside [{lo}, {hi}]"
    return None


def check_prompt_length(conv: Conversation, hi: int) -> str | None:
    n = len(words(records.prompt(conv)))
    return f"prompt has {n} words, more than {hi}" if n > hi else None


def check_tokens(conv: Conversation, tokenizer, hi: int) -> str | None:
    n = len(tokenizer.encode(records.full_text(conv), add_special_tokens=False))
    return f"{n} tokens, more than {hi}" if n > hi else None


def check_echo(conv: Conversation, threshold: float, max_new_words: int) -> str | None:
    """A response that repeats the instruction teaches copying, not answering: ROUGE-L F1 with the
    instruction at least `threshold` and at most `max_new_words` words outside their common subsequence
    (so "X is Y." answering "What is X?" is kept)."""
    for i, (instruction, response) in enumerate(records.exchanges(conv)):
        instr, resp = words(instruction), words(response)
        score = rouge_l(resp, instr)
        new = len(resp) - lcs_length(instr, resp)
        if score >= threshold and new <= max_new_words:
            return f"response {i + 1} repeats the instruction (ROUGE-L {score:.2f}, {new} new words)"
    return None


def refusal_phrase(text: str, phrases: tuple[str, ...] = REFUSAL_PHRASES) -> str | None:
    """The first of `phrases` in `text`, ignoring case, spacing and curly apostrophes."""
    text = " ".join(text.translate(_APOSTROPHES).casefold().split())
    return next((p for p in phrases if p in text), None)


def check_refusal(conv: Conversation, phrases: tuple[str, ...]) -> str | None:
    for i, r in enumerate(records.responses(conv)):
        hit = refusal_phrase(r, phrases)
        if hit:
            return f"response {i + 1} contains {hit!r}"
    return None


def check_garbage(conv: Conversation, max_symbols: float, max_bad: float) -> str | None:
    """Broken encodings and control bytes (any share above `max_bad`), or text that is mostly symbols."""
    text = records.full_text(conv)
    if not text:
        return None
    bad = sum(ch == "\ufffd" or (unicodedata.category(ch) in _BAD_CATEGORIES and not ch.isspace())
              for ch in text)
    if bad / len(text) > max_bad:
        return f"{bad} control/replacement/unassigned characters of {len(text)}"
    symbols = sum(not (ch.isalnum() or ch.isspace() or unicodedata.category(ch).startswith("M")) for ch in text)
    if symbols / len(text) > max_symbols:
        return f"{symbols / len(text):.0%} of characters are symbols or punctuation"
    return None


def check_language(conv: Conversation, language: str, min_letters: int = 50, min_prob: float = 0.2) -> str | None:
    """langdetect on prompt and responses together. It is unreliable on short text, so a record with fewer
    than `min_letters` letters is kept, as is one where `language` gets at least `min_prob` (a translation
    task mixes two languages)."""
    from langdetect import DetectorFactory, LangDetectException, detect_langs

    DetectorFactory.seed = 0  # langdetect samples; a fixed seed makes its answer repeatable
    text = records.full_text(conv)
    if sum(ch.isalpha() for ch in text) < min_letters:
        return None
    try:
        found = detect_langs(text)
    except LangDetectException:
        return None
    if any(lang.lang == language and lang.prob >= min_prob for lang in found):
        return None
    return f"language {found[0].lang!r} (p={found[0].prob:.2f}), not {language!r}"


def quality_checks(cfg: FilterConfig, tokenizer=None) -> list[tuple[str, Check]]:
    """The named checks `cfg` asks for, cheapest and most basic first."""
    if cfg.max_tokens is not None and tokenizer is None:
        raise ValueError("max_tokens needs a tokenizer (pass --tokenizer MODEL_DIR)")
    checks: list[tuple[str, Check]] = [
        ("empty response", check_empty),
        ("response length", lambda c: check_response_length(c, cfg.min_response_words, cfg.max_response_words)),
        ("prompt length", lambda c: check_prompt_length(c, cfg.max_prompt_words)),
    ]
    if cfg.max_tokens is not None:
        checks.append(("token length", lambda c: check_tokens(c, tokenizer, cfg.max_tokens)))
    checks += [
        ("repeats instruction", lambda c: check_echo(c, cfg.echo_threshold, cfg.echo_max_new_words)),
        ("refusal/boilerplate", lambda c: check_refusal(c, cfg.refusal_phrases)),
        ("garbage text", lambda c: check_garbage(c, cfg.max_symbol_ratio, cfg.max_bad_char_ratio)),
    ]
    if cfg.language:
        checks.append(("language", lambda c: check_language(c, cfg.language)))
    return checks


def apply_checks(convs: list[Conversation], checks: list[tuple[str, Check]],
                 report: CurateReport) -> list[Conversation]:
    report.declare(*(name for name, _ in checks))
    kept = []
    for conv in convs:
        for name, check in checks:
            why = check(conv)
            if why:
                report.reject(name, conv.source, why, conv)
                break
        else:
            kept.append(conv)
    return kept


# ------------------------------------------------------------------------------------------------- dedup

def dedup_text(conv: Conversation, on: str) -> str:
    if on == "prompt":
        return records.prompt(conv)
    if on == "response":
        return "\n".join(records.responses(conv))
    return records.full_text(conv)


def normalise(text: str) -> str:
    """What exact dedup compares: Unicode NFKC, case-folded, whitespace runs collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def dedup_exact(convs: list[Conversation], report: CurateReport, on: str = "all") -> list[Conversation]:
    report.declare("exact duplicate")
    seen: dict[bytes, str] = {}
    kept = []
    for conv in convs:
        digest = hashlib.blake2b(normalise(dedup_text(conv, on)).encode("utf-8"), digest_size=16).digest()
        if digest in seen:
            report.reject("exact duplicate", conv.source, f"same text as {seen[digest]}", conv)
        else:
            seen[digest] = conv.source
            kept.append(conv)
    return kept


def _dedup_near(convs, report, name, index, on, score_name):
    """Drop each conversation whose text matches a kept one in `index` (MinHashIndex or RougeIndex)."""
    report.declare(name)
    kept = []
    for conv in convs:
        tokens = words(dedup_text(conv, on))
        match, score = index.best_match(tokens)
        if match is not None:
            report.reject(name, conv.source, f"near-duplicate of {kept[match].source} ({score_name} {score:.2f})",
                          conv)
        else:
            index.add(tokens)
            kept.append(conv)
    return kept


def dedup_minhash(convs: list[Conversation], report: CurateReport, on: str = "all", threshold: float = 0.7,
                  num_perm: int = 128, ngram: int = 3, seed: int = 0) -> list[Conversation]:
    """Near-duplicates by Jaccard similarity of word n-gram sets, found through MinHash LSH buckets."""
    index = MinHashIndex(threshold, num_perm, ngram, seed)
    return _dedup_near(convs, report, "near duplicate (MinHash)", index, on, "Jaccard")


def dedup_rouge(convs: list[Conversation], report: CurateReport, on: str = "prompt",
                threshold: float = 0.7) -> list[Conversation]:
    """Self-Instruct's rule: drop a record whose ROUGE-L F1 against a kept one reaches `threshold`."""
    return _dedup_near(convs, report, "near duplicate (ROUGE-L)", RougeIndex(threshold), on, "ROUGE-L")


def curate(convs: list[Conversation], cfg: FilterConfig = FilterConfig(), *, tokenizer=None,
           stage: str = "filter") -> tuple[list[Conversation], CurateReport]:
    """Quality checks, then each dedup pass in `cfg.dedup` order."""
    report = CurateReport(stage, records_in=len(convs))
    kept = apply_checks(convs, quality_checks(cfg, tokenizer), report)
    for method in cfg.dedup:
        if method == "exact":
            kept = dedup_exact(kept, report, cfg.dedup_on)
        elif method == "minhash":
            kept = dedup_minhash(kept, report, cfg.dedup_on, cfg.minhash_threshold, cfg.num_perm,
                                 cfg.minhash_ngram, cfg.seed)
        else:
            kept = dedup_rouge(kept, report, cfg.dedup_on, cfg.rouge_threshold)
    return kept, report
