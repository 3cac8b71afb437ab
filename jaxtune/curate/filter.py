"""Quality filters and deduplication over normalised conversations, each step named and counted.

A check is `(name, fn)` with `fn(conversation) -> None` to keep it or a short reason to reject it. `curate`
runs the quality checks, decontamination against evaluation prompts, the chosen dedup passes (exact, MinHash,
ROUGE-L), model scores (IFD, perplexity) and a cap per task type, and returns the kept conversations with a
`CurateReport`. Dedup and the cap keep the first occurrences in input order.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jaxtune.curate import records
from jaxtune.curate.decontam import decontaminate
from jaxtune.curate.report import CurateReport
from jaxtune.curate.similarity import MinHashIndex, RougeIndex, lcs_length, rouge_l, words
from jaxtune.data.formats import Conversation
from jaxtune.eval.overreach import REFUSAL_PHRASES, refusal_phrase

if TYPE_CHECKING:  # score.py imports jax; the CLI builds its parser without it
    from jaxtune.curate.score import ResponseScore

Check = Callable[[Conversation], "str | None"]

DEDUP_METHODS = ("exact", "minhash", "rougeL")
DEDUP_ON = ("all", "prompt", "response")
CAP_BY = ("task_type", "verb")
# Control, private use, unassigned, surrogate. Not format (Cf): zero-width joiners are normal in many scripts.
_BAD_CATEGORIES = ("Cc", "Co", "Cn", "Cs")


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
    # Model scores (need `curate(model=...)`): drop IFD >= max_ifd, perplexity > max_ppl.
    max_ifd: float | None = None
    max_ppl: float | None = None
    score_template: str | None = None
    score_end_token: str | None = None  # the response terminator when scoring (data.end_token's meaning)
    score_seq_len: int = 512
    score_batch_size: int = 8
    # Keep the first `cap_per_type` records of each task type (meta task_type, else category) or verb.
    cap_per_type: int | None = None
    cap_by: str = "task_type"
    # Word n-gram decontamination against the reference prompts passed to `curate(references=...)`.
    decontam_n: int = 8
    decontam_threshold: float = 0.5

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
        for name in ("max_ifd", "max_ppl"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be positive")
        for name in ("cap_per_type", "decontam_n", "score_seq_len", "score_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        if not 0 < self.decontam_threshold <= 1:
            raise ValueError(f"decontam_threshold={self.decontam_threshold}: must be in (0, 1]")
        if self.cap_by not in CAP_BY:
            raise ValueError(f"cap_by={self.cap_by!r}: choose from {', '.join(CAP_BY)}")


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


# ------------------------------------------------------------------------------------ scores and balance

def score_filter(scored: list[tuple[Conversation, ResponseScore]], report: CurateReport, *,
                 max_ifd: float | None = None, max_ppl: float | None = None) -> list[Conversation]:
    """Drop IFD >= `max_ifd` (the instruction does not help predict the response), then perplexity above
    `max_ppl`; the notes show both distributions over everything scored."""
    from jaxtune.curate.score import distribution

    report.notes["IFD"] = distribution(s.ifd for _, s in scored)
    report.notes["perplexity"] = distribution(s.ppl for _, s in scored)
    checks = []
    if max_ifd is not None:
        checks.append((f"IFD >= {max_ifd:g}", lambda s: s.ifd >= max_ifd,
                       lambda s: f"IFD {s.ifd:.3f} (CE {s.ce_cond:.3f} with the instruction, {s.ce_uncond:.3f} "
                                 "without)"))
    if max_ppl is not None:
        checks.append((f"perplexity > {max_ppl:g}", lambda s: s.ppl > max_ppl,
                       lambda s: f"perplexity {s.ppl:.2f} over {s.n_tokens} response tokens"))
    report.declare(*(name for name, _, _ in checks))
    kept = []
    for conv, score in scored:
        hit = next(((name, why) for name, bad, why in checks if bad(score)), None)
        if hit:
            report.reject(hit[0], conv.source, hit[1](score), conv)
        else:
            kept.append(conv)
    return kept


def task_type(conv: Conversation, by: str = "task_type") -> str | None:
    """The record's type for balancing: its `task_type` label (else its `category`), or with by="verb"
    the instruction's first word, lower-cased; None when it has none."""
    if by == "verb":
        first = words(records.instruction(conv))[:1] if conv.text is None else []
        return first[0] if first else None
    return conv.meta.get("task_type") or conv.meta.get("category")


def cap_per_type(convs: list[Conversation], report: CurateReport, cap: int,
                 by: str = "task_type") -> list[Conversation]:
    """Keep the first `cap` records of each type in input order, so no task dominates. Records without a
    type are kept and counted in the notes."""
    label = "task type" if by == "task_type" else "verb"
    counts: Counter = Counter()
    kept, untyped = [], 0
    for conv in convs:
        kind = task_type(conv, by)
        if kind is None:
            untyped += 1
            kept.append(conv)
        elif counts[kind] >= cap:
            report.reject(f"over cap for {label} {kind!r}", conv.source, f"{cap} already kept", conv)
        else:
            counts[kind] += 1
            kept.append(conv)
    report.notes[f"kept per {label}"] = dict(counts.most_common())
    if untyped:
        report.notes[f"no {label} (not capped)"] = untyped
    return kept


def _scored(convs, cfg: FilterConfig, model, tokenizer, report: CurateReport) -> list[Conversation]:
    """Score with `model`; a record that cannot be scored is dropped when a threshold needs its score,
    kept (and counted) when the scores are only reported."""
    gate = cfg.max_ifd is not None or cfg.max_ppl is not None
    from jaxtune.curate.score import response_scores

    scores = response_scores(model, tokenizer, convs, template=cfg.score_template, end_token=cfg.score_end_token,
                             seq_len=cfg.score_seq_len,
                             batch_size=cfg.score_batch_size, report=report if gate else None)
    scored = [(c, s) for c, s in zip(convs, scores) if s is not None]
    kept = score_filter(scored, report, max_ifd=cfg.max_ifd, max_ppl=cfg.max_ppl)
    if gate:
        return kept
    if len(scored) < len(convs):
        report.notes["not scored (kept)"] = len(convs) - len(scored)
    return convs


def curate(convs: list[Conversation], cfg: FilterConfig = FilterConfig(), *, tokenizer=None, model=None,
           model_tokenizer=None, references: dict[str, list[str]] | None = None,
           stage: str = "filter") -> tuple[list[Conversation], CurateReport]:
    """Quality checks, decontamination against `references` (set name -> prompts), each dedup pass in
    `cfg.dedup` order, model scores when `model` is given (its tokenizer `model_tokenizer`, default
    `tokenizer`), then the cap per type."""
    if (cfg.max_ifd is not None or cfg.max_ppl is not None) and model is None:
        raise ValueError("max_ifd and max_ppl need a scoring model (pass --score-model MODEL_DIR)")
    model_tokenizer = model_tokenizer or tokenizer
    if model is not None and model_tokenizer is None:
        raise ValueError("scoring needs the model's tokenizer")
    report = CurateReport(stage, records_in=len(convs))
    kept = apply_checks(convs, quality_checks(cfg, tokenizer), report)
    if references:
        kept = decontaminate(kept, references, report, n=cfg.decontam_n, threshold=cfg.decontam_threshold)
    for method in cfg.dedup:
        if method == "exact":
            kept = dedup_exact(kept, report, cfg.dedup_on)
        elif method == "minhash":
            kept = dedup_minhash(kept, report, cfg.dedup_on, cfg.minhash_threshold, cfg.num_perm,
                                 cfg.minhash_ngram, cfg.seed)
        else:
            kept = dedup_rouge(kept, report, cfg.dedup_on, cfg.rouge_threshold)
    if model is not None:
        kept = _scored(kept, cfg, model, model_tokenizer, report)
    if cfg.cap_per_type is not None:
        kept = cap_per_type(kept, report, cfg.cap_per_type, cfg.cap_by)
    return kept, report
