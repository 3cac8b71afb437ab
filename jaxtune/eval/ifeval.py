"""IFEval scoring: strict and loose, prompt- and instruction-level, plus the two figures tuning claims use.

Format adherence = loose instruction-level accuracy over the `detectable_format`, `startend`, `change_case`
and `punctuation` groups (does the output have the requested shape?). Ignored-constraint rate = 1 - loose
instruction-level accuracy over all instructions (how often any verifiable constraint is dropped). Both use
loose scoring so that a chatty first line or markdown emphasis is not counted as ignoring a constraint.

`jaxtune eval ifeval --responses FILE` scores any model's saved outputs ({prompt, response} JSONL).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from jaxtune.eval.ifeval_checks import (
    FORMAT_GROUPS,
    check_instruction,
    check_instruction_loose,
    group_of,
    validate_instruction,
)
from jaxtune.jsonl import read_jsonl, write_jsonl

__all__ = [
    "IFEvalResult",
    "PromptResult",
    "check_instruction",
    "load_ifeval_inputs",
    "load_responses",
    "match_responses",
    "prompts_sha256",
    "score_responses",
    "write_responses",
]

DEFAULT_INPUT_NAME = "ifeval_input_data.jsonl"


class IFEvalDataError(ValueError):
    """A malformed IFEval input or responses file; the message names the file, line and field."""


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _parse_input(record: dict, where: str) -> dict:
    for field, kind in (("prompt", str), ("instruction_id_list", list), ("kwargs", list)):
        if not isinstance(record.get(field), kind):
            raise IFEvalDataError(f"{where}: field '{field}' must be a {kind.__name__} (IFEval input format)")
    ids, kwargs = record["instruction_id_list"], record["kwargs"]
    if len(ids) != len(kwargs):
        raise IFEvalDataError(
            f"{where}: 'instruction_id_list' has {len(ids)} entries but 'kwargs' has {len(kwargs)}; "
            "give one kwargs object per instruction"
        )
    # The Hugging Face copy of IFEval pads every kwargs object with null-valued keys: drop them.
    clean = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in kwargs]
    for i, (instruction_id, kw) in enumerate(zip(ids, clean)):
        try:
            validate_instruction(instruction_id, kw)
        except ValueError as e:
            raise IFEvalDataError(f"{where}: instruction_id_list[{i}]: {e}") from None
    task_type = record.get("task_type")
    if task_type is not None and not isinstance(task_type, str):
        raise IFEvalDataError(f"{where}: field 'task_type' must be a string when given")
    out = {"key": record.get("key"), "prompt": record["prompt"], "instruction_id_list": ids, "kwargs": clean}
    return {**out, "task_type": task_type} if task_type is not None else out


def load_inputs_with_lines(path: str | os.PathLike) -> list[tuple[int, dict]]:
    path = Path(path)
    return [(n, _parse_input(rec, f"{path}:{n}")) for n, rec in read_jsonl(path, IFEvalDataError)]


def load_ifeval_inputs(path: str | os.PathLike) -> list[dict]:
    """IFEval-format prompts (`key`, `prompt`, `instruction_id_list`, `kwargs`), validated against the checkers."""
    return [rec for _, rec in load_inputs_with_lines(path)]


class Responses(list):
    """(line, {prompt?, response}) records of a responses file, with its checksum header if it has one."""

    def __init__(self, records, path: Path, prompts_sha256: str | None = None, header_line: int | None = None):
        super().__init__(records)
        self.path, self.prompts_sha256, self.header_line = path, prompts_sha256, header_line


def prompts_sha256(prompts: Sequence[str]) -> str:
    """SHA-256 (hex) of the prompts in order: UTF-8 of the compact JSON list `["p1","p2",...]`, non-ASCII
    kept as is (`json.dumps(prompts, ensure_ascii=False, separators=(",", ":"))`)."""
    blob = json.dumps(list(prompts), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def load_responses(path: str | os.PathLike) -> Responses:
    """Records of a responses JSONL; `response` must be a string, `prompt` (if present) too. A first record
    `{"prompts_sha256": HEX}` (no `response`) is the header that lets records without prompts be paired
    by order; see `match_responses`."""
    path = Path(path)
    records = read_jsonl(path, IFEvalDataError)
    digest = header_line = None
    if records and "response" not in records[0][1] and "prompts_sha256" in records[0][1]:
        header_line, header = records.pop(0)
        digest = header["prompts_sha256"]
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise IFEvalDataError(f"{path}:{header_line}: field 'prompts_sha256' must be 64 lower-case hex digits")
    for n, rec in records:
        if not isinstance(rec.get("response"), str):
            raise IFEvalDataError(f"{path}:{n}: field 'response' must be a string (records are {{prompt, response}})")
        if "prompt" in rec and not isinstance(rec["prompt"], str):
            raise IFEvalDataError(f"{path}:{n}: field 'prompt' must be a string")
    return Responses(records, path, digest, header_line)


def write_responses(path: str | os.PathLike, prompts: Sequence[str], responses: Sequence[str], *,
                    with_prompts: bool = True) -> Path:
    """A responses file that `load_responses`/`match_responses` accept: `{prompt, response}` records, or
    (`with_prompts=False`) a `{"prompts_sha256": ...}` header and `{response}` records in prompt order."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts")
    if with_prompts:
        rows = ({"prompt": p, "response": r} for p, r in zip(prompts, responses))
    else:
        rows = [{"prompts_sha256": prompts_sha256(prompts)}, *({"response": r} for r in responses)]
    return write_jsonl(path, rows)


def _by_order(inputs, responses, input_path, responses_path) -> list[str]:
    """Pair a headed file by position: the checksum proves which prompts, in which order, it answers."""
    where = f"{responses_path}:{responses.header_line}"
    if len(responses) != len(inputs):
        raise IFEvalDataError(f"{responses_path}: {len(responses)} responses for the {len(inputs)} prompts of "
                              f"{input_path}; a file paired by order answers every prompt once")
    if responses.prompts_sha256 != prompts_sha256([inp["prompt"] for _, inp in inputs]):
        raise IFEvalDataError(f"{where}: prompts_sha256 {responses.prompts_sha256[:12]}… does not match "
                              f"{input_path} (its prompts, in order); the responses were generated from other "
                              "prompts or in another order")
    position = {inp["prompt"]: i for i, (_, inp) in reversed(list(enumerate(inputs)))}
    for i, (n, rec) in enumerate(responses):
        j = position.get(rec.get("prompt"), i)
        if rec.get("prompt") != inputs[i][1]["prompt"] and j != i:
            raise IFEvalDataError(f"{responses_path}:{n}: prompt {rec['prompt'][:60]!r} is record {j + 1} of "
                                  f"{input_path}, not record {i + 1}; the file is out of order")
    return [rec["response"] for _, rec in responses]


def match_responses(
    inputs: Sequence[tuple[int, dict]],
    responses: Sequence[tuple[int, dict]],
    input_path: str | os.PathLike = "<inputs>",
    responses_path: str | os.PathLike = "<responses>",
) -> list[str]:
    """One response per input: by exact prompt text, or by order when the file's `prompts_sha256` header
    matches the inputs' prompts (for prompts saved after a chat template, or not saved at all).

    Without a header every record needs a prompt that is one of the inputs', answered once."""
    if getattr(responses, "prompts_sha256", None):
        return _by_order(inputs, responses, input_path, responses_path)
    known: dict[str, int] = {}
    for lineno, inp in inputs:
        if inp["prompt"] in known:
            raise IFEvalDataError(f"{input_path}:{lineno}: prompt repeats line {known[inp['prompt']]}, so responses "
                                  "matched by prompt cannot tell the two apart; pair by order with a prompts_sha256 "
                                  "header instead")
        known[inp["prompt"]] = lineno
    by_prompt: dict[str, tuple[int, str]] = {}
    for n, rec in responses:
        if "prompt" not in rec:
            raise IFEvalDataError(
                f"{responses_path}:{n}: no 'prompt' field; give each record the prompt it answers, or start the "
                "file with a {\"prompts_sha256\": ...} header of the input prompts to pair records by order")
        prompt = rec["prompt"]
        if prompt not in known:
            raise IFEvalDataError(f"{responses_path}:{n}: prompt {prompt[:60]!r} is not in {input_path}; each "
                                  "record's prompt must be an input prompt, unchanged")
        if prompt in by_prompt:
            raise IFEvalDataError(f"{responses_path}:{n}: prompt {prompt[:60]!r} already answered on line "
                                  f"{by_prompt[prompt][0]}; keep one response per prompt")
        by_prompt[prompt] = (n, rec["response"])
    for lineno, inp in inputs:
        if inp["prompt"] not in by_prompt:
            raise IFEvalDataError(
                f"{input_path}:{lineno}: no record in {responses_path} has this prompt "
                f"(key {inp['key']}, starts {inp['prompt'][:60]!r}); add a {{prompt, response}} record "
                "with the prompt text unchanged"
            )
    return [by_prompt[inp["prompt"]][1] for _, inp in inputs]


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptResult:
    key: Any
    prompt: str
    response: str
    instruction_id_list: list[str]
    strict: list[bool]
    loose: list[bool]

    @property
    def followed_all_strict(self) -> bool:
        return all(self.strict)

    @property
    def followed_all_loose(self) -> bool:
        return all(self.loose)

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "followed_all_strict": self.followed_all_strict,
            "followed_all_loose": self.followed_all_loose,
        }


def _accuracy(flags: Iterable[bool]) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def _breakdown(rows: Sequence[PromptResult], name) -> dict[str, dict]:
    """Per-name strict/loose instruction accuracy, where `name` maps an instruction id to its bucket."""
    buckets: dict[str, dict[str, list[bool]]] = {}
    for row in rows:
        for instruction_id, s, lo in zip(row.instruction_id_list, row.strict, row.loose):
            b = buckets.setdefault(name(instruction_id), {"strict": [], "loose": []})
            b["strict"].append(s)
            b["loose"].append(lo)
    return {
        k: {"count": len(v["strict"]), "strict": _accuracy(v["strict"]), "loose": _accuracy(v["loose"])}
        for k, v in sorted(buckets.items())
    }


@dataclasses.dataclass(frozen=True)
class IFEvalResult:
    """Accuracies are fractions in [0, 1]; None where nothing was scored."""

    prompt_strict: float | None
    instruction_strict: float | None
    prompt_loose: float | None
    instruction_loose: float | None
    format_adherence: float | None
    ignored_constraint_rate: float | None
    num_prompts: int
    num_instructions: int
    by_instruction: dict[str, dict]
    by_group: dict[str, dict]
    rows: list[PromptResult]

    def summary(self) -> dict:
        """Everything but the per-prompt rows (the stable schema of the summary JSON)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rows"}

    def to_dict(self) -> dict:
        return {**self.summary(), "rows": [row.to_dict() for row in self.rows]}


def score_responses(inputs: Sequence[dict], responses: dict[str, str] | Sequence[str]) -> IFEvalResult:
    """Score responses against IFEval inputs; `responses` maps prompt text to response, or is in input order."""
    if isinstance(responses, dict):
        missing = [i for i, inp in enumerate(inputs) if inp["prompt"] not in responses]
        if missing:
            inp = inputs[missing[0]]
            raise IFEvalDataError(
                f"input record {missing[0]} (key {inp.get('key')}) has no response: the responses mapping "
                f"lacks prompt {inp['prompt'][:60]!r} ({len(missing)} prompts missing in all)"
            )
        ordered = [responses[inp["prompt"]] for inp in inputs]
    else:
        ordered = list(responses)
        if len(ordered) != len(inputs):
            raise IFEvalDataError(f"got {len(ordered)} responses for {len(inputs)} inputs; give one per input")
    rows = []
    for inp, response in zip(inputs, ordered):
        pairs = list(zip(inp["instruction_id_list"], inp["kwargs"]))
        rows.append(
            PromptResult(
                key=inp.get("key"),
                prompt=inp["prompt"],
                response=response,
                instruction_id_list=list(inp["instruction_id_list"]),
                strict=[check_instruction(i, kw, inp["prompt"], response) for i, kw in pairs],
                loose=[check_instruction_loose(i, kw, inp["prompt"], response) for i, kw in pairs],
            )
        )
    flat = [(i, lo) for row in rows for i, lo in zip(row.instruction_id_list, row.loose)]
    instruction_loose = _accuracy(lo for _, lo in flat)
    return IFEvalResult(
        prompt_strict=_accuracy(row.followed_all_strict for row in rows),
        instruction_strict=_accuracy(s for row in rows for s in row.strict),
        prompt_loose=_accuracy(row.followed_all_loose for row in rows),
        instruction_loose=instruction_loose,
        format_adherence=_accuracy(lo for i, lo in flat if group_of(i) in FORMAT_GROUPS),
        ignored_constraint_rate=None if instruction_loose is None else 1.0 - instruction_loose,
        num_prompts=len(rows),
        num_instructions=len(flat),
        by_instruction=_breakdown(rows, lambda i: i),
        by_group=_breakdown(rows, group_of),
        rows=rows,
    )


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "   n/a" if x is None else f"{100 * x:6.2f}"


def format_report(result: IFEvalResult) -> str:
    """The headline figures and the per-group table, as printed by `jaxtune eval ifeval`."""
    lines = [
        f"prompts: {result.num_prompts}  instructions: {result.num_instructions}",
        f"prompt-level strict       {_pct(result.prompt_strict)} %",
        f"instruction-level strict  {_pct(result.instruction_strict)} %",
        f"prompt-level loose        {_pct(result.prompt_loose)} %",
        f"instruction-level loose   {_pct(result.instruction_loose)} %",
        f"format adherence          {_pct(result.format_adherence)} %   (loose, {', '.join(FORMAT_GROUPS)})",
        f"ignored-constraint rate   {_pct(result.ignored_constraint_rate)} %   (1 - instruction-level loose)",
        "",
        f"{'group':<22}{'n':>5}{'strict %':>10}{'loose %':>10}",
    ]
    for group, b in result.by_group.items():
        lines.append(f"{group:<22}{b['count']:>5}{_pct(b['strict']):>10}{_pct(b['loose']):>10}")
    return "\n".join(lines)


def default_input() -> Path | None:
    from jaxtune.assets import find_asset

    return find_asset(f"data/{DEFAULT_INPUT_NAME}")


def write_results(result, out_dir: str | os.PathLike, name: str = "ifeval") -> tuple[Path, Path]:
    """Write `<name>_results.jsonl` (one row per scored prompt) and `<name>_summary.json`; return both paths.

    `result` is an `IFEvalResult` or any result with `rows` (each with `to_dict()`) and `summary()`, such as the
    over-rigidity probe's, so both commands lay out their output the same way."""
    out = Path(out_dir)
    rows_path = write_jsonl(out / f"{name}_results.jsonl", (row.to_dict() for row in result.rows))
    summary_path = out / f"{name}_summary.json"
    summary_path.write_text(json.dumps(result.summary(), indent=2) + "\n", encoding="utf-8")
    return rows_path, summary_path
