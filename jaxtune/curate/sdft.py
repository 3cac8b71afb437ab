"""Self-distillation (SDFT, Yang et al. 2024): let the base model rewrite each reference response in its own
words, so fine-tuning data stays close to the model's own distribution and forgets less.

Each rewrite must pass a consistency check or the record keeps its original response:
- rewrites that are empty, talk about "the reference answer" instead of answering, or refuse are rejected;
- a reference with a verifiable final answer ("#### 42", "\\boxed{42}", "The answer is 42") needs the same
  answer in the rewrite (numbers compared as numbers);
- a short reference (a label such as "Positive") must appear in the rewrite;
- otherwise the rewrite must keep some of the reference (ROUGE-L F1) and a similar length.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from jaxtune.curate import records
from jaxtune.curate.generator import GenerateFn
from jaxtune.curate.report import CurateReport
from jaxtune.curate.similarity import rouge_l, words
from jaxtune.data.formats import Conversation
from jaxtune.eval.overreach import refusal_phrase

PROMPT = ("Below is an instruction that describes a task, along with a reference answer. Using the reference "
          "answer as a guide, write your own response.\n\n### Instruction:\n{instruction}\n\n"
          "{input}### Reference answer:\n{reference}\n\n### Response:\n")
LEAK_PHRASES = ("reference answer", "your response", "my response", "your own response", "your turn")
CHECKS = ("empty rewrite", "mentions the reference", "refusal", "final answer differs", "label missing",
          "length ratio", "low overlap (ROUGE-L)")

_ANSWER_PATTERNS = (re.compile(r"####\s*(.+?)\s*$", re.M), re.compile(r"\\boxed\{([^{}]*)\}"),
                    re.compile(r"answer is\s*:?\s*\$?([^\n]+?)\s*\$?\.?\s*$", re.I | re.M))
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class SdftConfig:
    max_new_tokens: int = 512
    label_words: int = 3  # a reference this short is a label the rewrite must contain
    min_rouge: float = 0.2
    min_length_ratio: float = 0.3
    max_length_ratio: float = 3.0
    seed: int = 0


def sdft_prompt(conv: Conversation) -> str:
    user = next(m for m in reversed(conv.messages) if m["role"] == "user")
    inp = user.get("input") or ""
    return PROMPT.format(instruction=user.get("instruction") or user["content"],
                         input=f"### Input:\n{inp}\n\n" if inp.strip() else "",
                         reference=records.responses(conv)[-1])


def final_answer(text: str) -> str | None:
    """The explicitly marked final answer ("#### x", "\\boxed{x}", "the answer is x"), last one wins."""
    for pattern in _ANSWER_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    return None


def _same_answer(a: str, b: str) -> bool:
    na, nb = _NUMBER.findall(a), _NUMBER.findall(b)
    if na and nb:
        return float(na[-1].replace(",", "")) == float(nb[-1].replace(",", ""))
    return words(a) == words(b)


def check_rewrite(rewrite: str, reference: str, cfg: SdftConfig) -> tuple[str, str] | None:
    """(check, detail) for the first consistency rule the rewrite breaks, else None."""
    ref_words, new_words = words(reference), words(rewrite)
    lowered = rewrite.casefold()
    if not new_words:
        return "empty rewrite", "no words"
    leak = next((p for p in LEAK_PHRASES if p in lowered), None)
    if leak:
        return "mentions the reference", f"contains {leak!r}"
    refusal = refusal_phrase(rewrite)
    if refusal:
        return "refusal", f"contains {refusal!r}"
    expected = final_answer(reference)
    if expected is not None:
        got = final_answer(rewrite)
        if got is None and _NUMBER.findall(expected):
            got = (_NUMBER.findall(rewrite) or [None])[-1]
        if got is None or not _same_answer(got, expected):
            return "final answer differs", f"expected {expected!r}, got {got!r}"
        return None
    if len(ref_words) <= cfg.label_words:
        label = " ".join(ref_words)
        if f" {label} " not in f" {' '.join(new_words)} ":
            return "label missing", f"rewrite does not contain the reference label {label!r}"
        return None
    ratio = len(new_words) / len(ref_words)
    if not cfg.min_length_ratio <= ratio <= cfg.max_length_ratio:
        return "length ratio", f"{len(new_words)} words vs {len(ref_words)} in the reference ({ratio:.2f}x)"
    score = rouge_l(new_words, ref_words)
    if score < cfg.min_rouge:
        return "low overlap (ROUGE-L)", f"ROUGE-L {score:.2f} with the reference, below {cfg.min_rouge}"
    return None


def with_response(conv: Conversation, response: str) -> Conversation:
    """`conv` with its last assistant turn replaced."""
    last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
    messages = [dict(m) for m in conv.messages]
    messages[last]["content"] = response
    return dataclasses.replace(conv, messages=messages)


def distill(generate_fn: GenerateFn, convs: list[Conversation],
            cfg: SdftConfig = SdftConfig()) -> tuple[list[Conversation], CurateReport]:
    """Every conversation, with its last response rewritten where the rewrite passes; the report counts
    fallbacks (rewrites rejected, reference kept) per check and notes how many rewrites were kept."""
    for conv in convs:
        if conv.text is not None or not any(m["role"] == "assistant" for m in conv.messages):
            raise ValueError(f"{conv.source}: SDFT rewrites assistant responses; this record has none")
    report = CurateReport("sdft rewrites", records_in=len(convs))
    report.declare(*CHECKS)
    rewrites = generate_fn([sdft_prompt(c) for c in convs], cfg.max_new_tokens, cfg.seed) if convs else []
    out = []
    for conv, rewrite in zip(convs, rewrites):
        rewrite = rewrite.strip()
        failed = check_rewrite(rewrite, records.responses(conv)[-1], cfg)
        if failed:
            report.reject(failed[0], conv.source, failed[1], rewrite)
            out.append(conv)
        else:
            out.append(with_response(conv, rewrite))
    report.notes["rewrites kept"] = report.records_out
    report.notes["fell back to the reference"] = len(convs) - report.records_out
    return out, report
