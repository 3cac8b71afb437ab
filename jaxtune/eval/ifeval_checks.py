"""The IFEval instruction checkers: one pure function per instruction id, plus the registry that names them.

Semantics follow the official IFEval code (google-research `instruction_following_eval`, the 2025 version
whose figures SOURCES.md records) so scores are comparable with published ones, quirks included: keyword
existence and frequency match substrings case-insensitively, the postscript check looks for its marker
anywhere, `nth_paragraph_first_word` indexes the raw `\\n\\n` split. Two deliberate differences, neither of
which changes a score on the real IFEval data: keywords, forbidden words and section markers are matched
literally (the official code splices them into regexes unescaped), and kwargs the official code would fill
with random values when absent are required here, since a scorer must not invent its own instruction.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from jaxtune.eval import ifeval_text

Checker = Callable[[str, Mapping[str, Any], str], bool]

RELATIONS = ("less than", "at least")

# Instruction groups (the id's prefix) that measure output format rather than content.
FORMAT_GROUPS = ("detectable_format", "startend", "change_case", "punctuation")

CONSTRAINED_RESPONSE_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def group_of(instruction_id: str) -> str:
    """The instruction group, e.g. `detectable_format` for `detectable_format:title`."""
    return instruction_id.split(":", 1)[0]


def _compare(actual: int, relation: str, threshold: int) -> bool:
    if relation == "less than":
        return actual < threshold
    if relation == "at least":
        return actual >= threshold
    raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")


def detect_language(text: str) -> str | None:
    """ISO 639-1 code from langdetect with a fixed seed (its default is random), or None if undetectable."""
    from langdetect import DetectorFactory, LangDetectException, detect

    DetectorFactory.seed = 0
    try:
        return detect(text)
    except LangDetectException:
        return None


# -- keywords ---------------------------------------------------------------------------------------


def _keywords_existence(response, kw, prompt):
    return all(re.search(re.escape(word), response, flags=re.IGNORECASE) for word in kw["keywords"])


def _keywords_frequency(response, kw, prompt):
    found = len(re.findall(re.escape(kw["keyword"].strip()), response, flags=re.IGNORECASE))
    return _compare(found, kw["relation"], kw["frequency"])


def _forbidden_words(response, kw, prompt):
    return not any(
        re.search(rf"\b{re.escape(word)}\b", response, flags=re.IGNORECASE) for word in kw["forbidden_words"]
    )


def _letter_frequency(response, kw, prompt):
    letter = kw["letter"].strip().lower()
    if len(letter) != 1:
        raise ValueError(f"letter must be a single character, got {kw['letter']!r}")
    return _compare(response.lower().count(letter), kw["let_relation"], kw["let_frequency"])


# -- language and case ------------------------------------------------------------------------------


def _response_language(response, kw, prompt):
    detected = detect_language(response)
    return detected is None or detected == kw["language"]


def _english_capital(response, kw, prompt):
    return response.isupper() and detect_language(response) in (None, "en")


def _english_lowercase(response, kw, prompt):
    return response.islower() and detect_language(response) in (None, "en")


def _capital_word_frequency(response, kw, prompt):
    capitals = sum(tok.isupper() for tok in ifeval_text.word_tokenize(response))
    return _compare(capitals, kw["capital_relation"], kw["capital_frequency"])


# -- length -----------------------------------------------------------------------------------------


def _number_sentences(response, kw, prompt):
    return _compare(ifeval_text.count_sentences(response), kw["relation"], kw["num_sentences"])


def _number_words(response, kw, prompt):
    return _compare(ifeval_text.count_words(response), kw["relation"], kw["num_words"])


def _number_paragraphs(response, kw, prompt):
    """Paragraphs are separated by a `***` divider; an empty paragraph between two dividers fails."""
    parts = re.split(r"\s?\*\*\*\s?", response)
    for i, part in enumerate(parts):
        if not part.strip() and 0 < i < len(parts) - 1:
            return False
    return sum(1 for part in parts if part.strip()) == kw["num_paragraphs"]


def _nth_paragraph_first_word(response, kw, prompt):
    parts = response.split("\n\n")
    count = sum(1 for part in parts if part.strip())
    nth = kw["nth_paragraph"]
    if nth > count or not parts[nth - 1].strip():
        return False
    word = parts[nth - 1].strip().split()[0].lstrip("'").lstrip('"')
    first = re.match(r"[^.,?!'\"]*", word).group().lower()
    return count == kw["num_paragraphs"] and first == kw["first_word"].lower()


# -- content markers --------------------------------------------------------------------------------


def _number_placeholders(response, kw, prompt):
    return len(re.findall(r"\[.*?\]", response)) >= kw["num_placeholders"]


def _postscript(response, kw, prompt):
    marker = kw["postscript_marker"].strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))


# -- format -----------------------------------------------------------------------------------------


def _number_bullet_lists(response, kw, prompt):
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == kw["num_bullets"]


def _constrained_response(response, kw, prompt):
    return any(option in response.strip() for option in CONSTRAINED_RESPONSE_OPTIONS)


def _highlighted_sections(response, kw, prompt):
    single = [h for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", response) if h[2:-2].strip()]
    return len(single) + len(double) >= kw["num_highlights"]


def _multiple_sections(response, kw, prompt):
    marker = re.escape(kw["section_spliter"].strip())
    return len(re.split(rf"\s?{marker}\s?\d+\s?", response)) - 1 >= kw["num_sections"]


def _json_format(response, kw, prompt):
    text = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _title(response, kw, prompt):
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


# -- combinations, start/end, punctuation -----------------------------------------------------------


def _two_responses(response, kw, prompt):
    parts = response.split("******")
    for i, part in enumerate(parts):
        if not part.strip() and 0 < i < len(parts) - 1:
            return False
    answers = [part for part in parts if part.strip()]
    return len(answers) == 2 and answers[0].strip() != answers[1].strip()


def _repeat_prompt(response, kw, prompt):
    return response.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower())


def _end_checker(response, kw, prompt):
    return response.strip().strip('"').lower().endswith(kw["end_phrase"].strip().lower())


def _quotation(response, kw, prompt):
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def _no_comma(response, kw, prompt):
    return "," not in response


@dataclasses.dataclass(frozen=True)
class InstructionSpec:
    """A checker and the kwargs it needs (ids and kwargs names are IFEval's)."""

    check: Checker
    required: tuple[str, ...] = ()


CHECKERS: dict[str, InstructionSpec] = {
    "keywords:existence": InstructionSpec(_keywords_existence, ("keywords",)),
    "keywords:frequency": InstructionSpec(_keywords_frequency, ("keyword", "frequency", "relation")),
    "keywords:forbidden_words": InstructionSpec(_forbidden_words, ("forbidden_words",)),
    "keywords:letter_frequency": InstructionSpec(_letter_frequency, ("letter", "let_frequency", "let_relation")),
    "language:response_language": InstructionSpec(_response_language, ("language",)),
    "length_constraints:number_sentences": InstructionSpec(_number_sentences, ("num_sentences", "relation")),
    "length_constraints:number_paragraphs": InstructionSpec(_number_paragraphs, ("num_paragraphs",)),
    "length_constraints:number_words": InstructionSpec(_number_words, ("num_words", "relation")),
    "length_constraints:nth_paragraph_first_word": InstructionSpec(
        _nth_paragraph_first_word, ("num_paragraphs", "nth_paragraph", "first_word")
    ),
    "detectable_content:number_placeholders": InstructionSpec(_number_placeholders, ("num_placeholders",)),
    "detectable_content:postscript": InstructionSpec(_postscript, ("postscript_marker",)),
    "detectable_format:number_bullet_lists": InstructionSpec(_number_bullet_lists, ("num_bullets",)),
    "detectable_format:constrained_response": InstructionSpec(_constrained_response),
    "detectable_format:number_highlighted_sections": InstructionSpec(_highlighted_sections, ("num_highlights",)),
    "detectable_format:multiple_sections": InstructionSpec(_multiple_sections, ("section_spliter", "num_sections")),
    "detectable_format:json_format": InstructionSpec(_json_format),
    "detectable_format:title": InstructionSpec(_title),
    "combination:two_responses": InstructionSpec(_two_responses),
    "combination:repeat_prompt": InstructionSpec(_repeat_prompt, ("prompt_to_repeat",)),
    "startend:end_checker": InstructionSpec(_end_checker, ("end_phrase",)),
    "startend:quotation": InstructionSpec(_quotation),
    "change_case:capital_word_frequency": InstructionSpec(
        _capital_word_frequency, ("capital_frequency", "capital_relation")
    ),
    "change_case:english_capital": InstructionSpec(_english_capital),
    "change_case:english_lowercase": InstructionSpec(_english_lowercase),
    "punctuation:no_comma": InstructionSpec(_no_comma),
}

_RELATION_KWARGS = ("relation", "let_relation", "capital_relation")


def validate_instruction(instruction_id: str, kwargs: Mapping[str, Any]) -> None:
    """Raise ValueError (naming the id and the field) if the id is unknown or its kwargs cannot be checked."""
    spec = CHECKERS.get(instruction_id)
    if spec is None:
        raise ValueError(f"unknown instruction id {instruction_id!r}; supported: {', '.join(sorted(CHECKERS))}")
    missing = [name for name in spec.required if kwargs.get(name) is None]
    if missing:
        raise ValueError(f"{instruction_id} needs kwargs {missing}, got {sorted(kwargs)}")
    for name in _RELATION_KWARGS:
        if name in spec.required and kwargs[name] not in RELATIONS:
            raise ValueError(f"{instruction_id}: {name} must be one of {RELATIONS}, got {kwargs[name]!r}")
    if instruction_id == "length_constraints:nth_paragraph_first_word" and not (
        1 <= kwargs["nth_paragraph"] <= kwargs["num_paragraphs"]
    ):
        raise ValueError(f"{instruction_id}: nth_paragraph must be in 1..num_paragraphs, got {dict(kwargs)}")


def check_instruction(instruction_id: str, kwargs: Mapping[str, Any], prompt: str, response: str) -> bool:
    """Whether `response` follows one instruction (strictly: the response as given). Empty responses fail."""
    validate_instruction(instruction_id, kwargs)
    return bool(response.strip()) and bool(CHECKERS[instruction_id].check(response, kwargs, prompt))


def loose_variants(response: str) -> list[str]:
    """IFEval's loose-scoring rewrites: drop the first line, the last, both, and/or every `*`.

    They forgive a chatty opener ("Sure, here is..."), a closing remark and markdown emphasis.
    """
    lines = response.split("\n")
    trimmed = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return trimmed + [text.replace("*", "") for text in trimmed]


def check_instruction_loose(instruction_id: str, kwargs: Mapping[str, Any], prompt: str, response: str) -> bool:
    """Loose scoring: the instruction is followed if any loose variant of the response follows it."""
    validate_instruction(instruction_id, kwargs)
    check = CHECKERS[instruction_id].check
    return any(text.strip() and check(text, kwargs, prompt) for text in loose_variants(response))
