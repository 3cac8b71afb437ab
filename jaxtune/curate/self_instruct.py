"""Self-Instruct (Wang et al. 2023): grow an instruction set from seed tasks with the model itself.

1. Instructions: each prompt lists `prompt_tasks` instructions (up to `prompt_machine` generated ones, the
   rest seeds) as "Come up with a series of tasks:" and a numbered list left open at the next number; the
   completion's list items are new instructions. Each is filtered (length, blacklisted words such as image
   or graph, program requests, leading punctuation or non-ASCII, ROUGE-L >= 0.7 against every instruction so
   far) and kept ones join the pool, so later prompts can show them.
2. Classification: a few-shot "Can the following task be regarded as a classification task with finite
   output labels?" prompt, answered Yes/No.
3. Instances: few-shot from seed tasks of the same kind; input first ("Example 1 / Input / Output") for most
   tasks, output first ("Class label / Input") for classification so labels do not all collapse to one.
4. Every kept (instruction, input, output) becomes one Alpaca record.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

from jaxtune.curate.generator import GenerateFn
from jaxtune.curate.report import CurateReport
from jaxtune.curate.similarity import RougeIndex, words

BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
             "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
INSTRUCTION_HEADER = "Come up with a series of tasks:\n\n"
CLASSIFY_HEADER = "Can the following task be regarded as a classification task with finite output labels?\n\n"
INSTANCE_HEADER = ("Come up with examples for the following tasks. Try to generate multiple examples when "
                   "possible. If the task doesn't require additional input, you can generate the output "
                   "directly.\n\n")
CLASS_INSTANCE_HEADER = ("Given the classification task definition and the class labels, generate an input "
                         "that corresponds to each of the class labels. If the task doesn't require input, "
                         "just generate the correct class label.\n\n")
INSTRUCTION_CHECKS = ("empty", "unfinished", "too short", "too long", "blacklisted word", "asks for a program",
                      "starts with punctuation", "starts with non-ASCII", "too similar (ROUGE-L)")
INSTANCE_CHECKS = ("no output", "too long", "same input and output", "duplicate instance", "over max_instances")

_ITEM = re.compile(r"\n\s*\d+\s*[.)]\s*")
_NUMBERED = re.compile(r"^\s*\d+\s*[.)]\s*(\S.*)$")
_NEXT_TASK = re.compile(r"^\s*Task\s*:", re.M)


@dataclass(frozen=True)
class SeedTask:
    instruction: str
    instances: tuple[tuple[str, str], ...]  # (input, output)
    is_classification: bool = False


@dataclass(frozen=True)
class SelfInstructConfig:
    num_instructions: int = 100
    prompt_tasks: int = 8  # instructions shown per prompt (the paper: 8)
    prompt_machine: int = 2  # of which generated ones, once there are some (the paper: 2)
    prompts_per_round: int = 8
    patience: int = 5  # stop after this many rounds in a row that keep no new instruction
    rouge_threshold: float = 0.7
    min_words: int = 4
    max_words: int = 150
    blacklist: tuple[str, ...] = BLACKLIST
    classify_shots: int = 8  # 0: skip identification, treat every task as non-classification
    instance_shots: int = 2
    max_instances: int = 3
    max_instance_words: int = 350
    max_new_tokens: int = 256
    instance_max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.prompt_machine < self.prompt_tasks:
            raise ValueError(f"prompt_machine={self.prompt_machine} must be >= 0 and below "
                             f"prompt_tasks={self.prompt_tasks} (prompts need some seed tasks)")
        for name in ("num_instructions", "prompts_per_round", "patience", "max_instances", "max_new_tokens",
                     "instance_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")


# -------------------------------------------------------------------------------------------------- seeds

def load_seed_tasks(path) -> list[SeedTask]:
    """Self-Instruct seed tasks: JSON(L) records with `instruction`, `instances` [{input, output}] and
    optional `is_classification`, read through the data pipeline's reader."""
    from jaxtune.data.readers import iter_records
    from jaxtune.data.report import RecordError

    tasks = []
    for source, rec in iter_records(path):
        if isinstance(rec, RecordError):
            raise rec
        if not isinstance(rec, dict):
            raise ValueError(f"{source}: expected a JSON object with instruction/instances, got {type(rec).__name__}")
        instr = rec.get("instruction")
        if not isinstance(instr, str) or not instr.strip():
            raise ValueError(f"{source}: field 'instruction' must be a non-empty string")
        instances = rec.get("instances", [])
        if not isinstance(instances, list) or not all(
                isinstance(i, dict) and isinstance(i.get("input", ""), str) and isinstance(i.get("output"), str)
                for i in instances):
            raise ValueError(f"{source}: field 'instances' must be a list of {{\"input\": str, \"output\": str}}")
        flag = rec.get("is_classification", False)
        if not isinstance(flag, bool):
            raise ValueError(f"{source}: field 'is_classification' must be true or false, got {flag!r}")
        tasks.append(SeedTask(instr.strip(), tuple((i.get("input", ""), i["output"]) for i in instances), flag))
    if not tasks:
        raise ValueError(f"{path}: no seed tasks")
    return tasks


# ------------------------------------------------------------------------------------------ instructions

def _one_line(text: str) -> str:
    return " ".join(text.split())


def instruction_prompt(instructions: list[str]) -> str:
    items = [f"{i}. {_one_line(inst).rstrip(':')}" for i, inst in enumerate(instructions, 1)]
    return INSTRUCTION_HEADER + "\n".join(items) + f"\n{len(instructions) + 1}."


def parse_instructions(completion: str) -> list[tuple[str, bool]]:
    """(instruction, complete) per list item of a completion that continues an open numbered list.

    The text before the first number is the open item. The prompt shows one task per line, so an item is
    its first line; the list ends at a blank line. An item is `complete` when a newline or another item
    follows it: the last line of a completion may have been cut by the token limit.
    """
    text, blank, _ = completion.partition("\n\n")
    items = _ITEM.split(text)
    out = []
    for k, item in enumerate(items):
        line, newline, _ = item.partition("\n")
        inst = _one_line(line)
        out.append((inst[:1].upper() + inst[1:], bool(newline or blank) or k < len(items) - 1))
    return out


def chat_list(text: str, finished: bool) -> str:
    """A chat model's answer to an instruction prompt (often a preamble, the list numbered from the open
    number, a closing line) as the completion of the open list: its numbered lines, the first without its
    number; a finished answer's last item is complete."""
    items = [m.group(1) for m in map(_NUMBERED.match, text.splitlines()) if m]
    if not items:
        return text
    return " " + "\n".join(f"{k}. {x}" if k else x for k, x in enumerate(items)) + ("\n" if finished else "")


def check_instruction(inst: str, complete: bool, cfg: SelfInstructConfig) -> tuple[str, str] | None:
    """(check, detail) for the first rule `inst` breaks, else None. ROUGE-L is checked by the caller."""
    n = len(inst.split())
    if not inst:
        return "empty", "no text"
    if not complete:
        return "unfinished", "last item, possibly cut by the token limit"
    if n < cfg.min_words:
        return "too short", f"{n} words, fewer than {cfg.min_words}"
    if n > cfg.max_words:
        return "too long", f"{n} words, more than {cfg.max_words}"
    listed = next((w for w in cfg.blacklist if re.search(rf"\b{re.escape(w)}\b", inst, re.I)), None)
    if listed:
        return "blacklisted word", f"mentions {listed!r}, which a text model cannot handle"
    if inst.lower().startswith("write a program"):
        return "asks for a program", "starts with 'Write a program'"
    if inst[0] in string.punctuation:
        return "starts with punctuation", f"starts with {inst[0]!r}"
    if not inst[0].isascii():
        return "starts with non-ASCII", f"starts with {inst[0]!r}"
    return None


def generate_instructions(generate_fn: GenerateFn, seeds: list[SeedTask], cfg: SelfInstructConfig,
                          rng: random.Random) -> tuple[list[str], CurateReport]:
    """Rounds of `prompts_per_round` prompts until `num_instructions` are kept or `patience` rounds in a row
    keep nothing."""
    report = CurateReport("self-instruct instructions")
    report.declare(*INSTRUCTION_CHECKS)
    seed_texts = [s.instruction for s in seeds]
    pool = RougeIndex(cfg.rouge_threshold)
    for text in seed_texts:
        pool.add(text)
    machine: list[str] = []
    rnd = idle = 0
    while len(machine) < cfg.num_instructions and idle < cfg.patience:
        prompts = []
        for _ in range(cfg.prompts_per_round):
            shown = rng.sample(machine, min(cfg.prompt_machine, len(machine)))
            shown += rng.sample(seed_texts, min(cfg.prompt_tasks - len(shown), len(seed_texts)))
            rng.shuffle(shown)
            prompts.append(instruction_prompt(shown))
        before = len(machine)
        for p, completion in enumerate(generate_fn(prompts, cfg.max_new_tokens, cfg.seed + rnd)):
            for j, (inst, complete) in enumerate(parse_instructions(completion)):
                if len(machine) == cfg.num_instructions:
                    break
                report.records_in += 1
                source = f"round {rnd + 1} prompt {p + 1} item {j + 1}"
                failed = check_instruction(inst, complete, cfg)
                if failed is None:
                    match, score = pool.best_match(inst)
                    if match is not None:
                        failed = ("too similar (ROUGE-L)",
                                  f"ROUGE-L {score:.2f} with {(seed_texts + machine)[match]!r}")
                if failed:
                    report.reject(failed[0], source, failed[1], inst)
                else:
                    pool.add(inst)
                    machine.append(inst)
        idle = idle + 1 if len(machine) == before else 0
        rnd += 1
    report.notes["rounds"] = rnd
    report.notes["prompts"] = rnd * cfg.prompts_per_round
    return machine, report


# --------------------------------------------------------------------------------------- classification

def classify_prompt(instruction: str, shots: list[SeedTask]) -> str:
    examples = "".join(f"Task: {_one_line(s.instruction)}\nIs it classification? "
                       f"{'Yes' if s.is_classification else 'No'}\n\n" for s in shots)
    return f"{CLASSIFY_HEADER}{examples}Task: {_one_line(instruction)}\nIs it classification?"


def classify(generate_fn: GenerateFn, instructions: list[str], seeds: list[SeedTask], cfg: SelfInstructConfig,
             rng: random.Random) -> list[bool]:
    """Yes/No per instruction from balanced few-shot seed examples; anything but "yes" counts as No."""
    if cfg.classify_shots == 0 or not instructions:
        return [False] * len(instructions)
    yes = [s for s in seeds if s.is_classification]
    no = [s for s in seeds if not s.is_classification]
    prompts = []
    for inst in instructions:
        n_yes = min(cfg.classify_shots // 2, len(yes))
        shots = rng.sample(yes, n_yes) + rng.sample(no, min(cfg.classify_shots - n_yes, len(no)))
        rng.shuffle(shots)
        prompts.append(classify_prompt(inst, shots))
    answers = generate_fn(prompts, 4, cfg.seed)
    return [(words(a)[:1] or [""])[0] == "yes" for a in answers]


# --------------------------------------------------------------------------------------------- instances

def instance_prompt(instruction: str, shots: list[SeedTask], classification: bool) -> tuple[str, str]:
    """(prompt, open tail): the tail is the prompt's last line, which the completion continues."""
    blocks = []
    for s in shots:
        lines = [f"Task: {_one_line(s.instruction)}"]
        for k, (inp, out) in enumerate(s.instances, 1):
            if classification:
                lines += [f"Class label: {out.strip()}"] + ([f"Input: {inp.strip()}"] if inp.strip() else [])
            else:
                lines += [f"Example {k}"] + ([f"Input: {inp.strip()}"] if inp.strip() else [])
                lines += [f"Output: {out.strip()}"]
        blocks.append("\n".join(lines) + "\n\n")
    tail = "Class label:" if classification else "Example 1\n"
    header = CLASS_INSTANCE_HEADER if classification else INSTANCE_HEADER
    return f"{header}{''.join(blocks)}Task: {_one_line(instruction)}\n{tail}", tail


def parse_instances(text: str, classification: bool) -> list[tuple[str, str]]:
    """(input, output) pairs from `tail + completion`, up to where the model starts another task."""
    text = _NEXT_TASK.split(text, maxsplit=1)[0]
    pairs = []
    if classification:
        for block in re.split(r"^\s*Class label\s*:", text, flags=re.M)[1:]:
            label, _, rest = block.partition("\n")
            inp = re.search(r"Input\s*:(.*)", rest, re.S)
            pairs.append(((inp.group(1) if inp else "").strip(), label.strip()))
    else:
        for block in re.split(r"^\s*Example\s*\d+\s*:?\s*$", text, flags=re.M)[1:]:
            m = re.search(r"(?:Input\s*:(.*?))?Output\s*:(.*)", block, re.S)
            pairs.append(((m.group(1) or "").strip(), m.group(2).strip()) if m else (block.strip(), ""))
    return pairs


def check_instance(inp: str, out: str, kept: list[tuple[str, str]], cfg: SelfInstructConfig):
    if not out:
        return "no output", "the example has no output"
    longest = max(len(inp.split()), len(out.split()))
    if longest > cfg.max_instance_words:
        return "too long", f"{longest} words, more than {cfg.max_instance_words}"
    if inp and _one_line(inp).lower() == _one_line(out).lower():
        return "same input and output", "the output copies the input"
    if (inp, out) in kept:
        return "duplicate instance", "same input and output as an earlier example"
    if len(kept) >= cfg.max_instances:
        return "over max_instances", f"already {cfg.max_instances} examples for this instruction"
    return None


def generate_instances(generate_fn: GenerateFn, instructions: list[str], is_class: list[bool],
                       seeds: list[SeedTask], cfg: SelfInstructConfig,
                       rng: random.Random) -> tuple[list[dict], CurateReport]:
    report = CurateReport("self-instruct instances")
    report.declare(*INSTANCE_CHECKS)
    prompts, tails = [], []
    for inst, cls in zip(instructions, is_class):
        same_kind = [s for s in seeds if s.is_classification == cls and s.instances] or seeds
        prompt, tail = instance_prompt(inst, rng.sample(same_kind, min(cfg.instance_shots, len(same_kind))), cls)
        prompts.append(prompt)
        tails.append(tail)
    completions = generate_fn(prompts, cfg.instance_max_new_tokens, cfg.seed) if prompts else []
    rows, without = [], 0
    for k, (inst, cls, tail, completion) in enumerate(zip(instructions, is_class, tails, completions)):
        kept: list[tuple[str, str]] = []
        for j, (inp, out) in enumerate(parse_instances(tail + completion, cls)):
            report.records_in += 1
            failed = check_instance(inp, out, kept, cfg)
            if failed:
                report.reject(failed[0], f"instruction {k + 1} example {j + 1}", failed[1],
                              {"instruction": inst, "input": inp, "output": out})
            else:
                kept.append((inp, out))
        rows += [{"instruction": inst, "input": inp, "output": out} for inp, out in kept]
        without += not kept
    report.notes["classification tasks"] = sum(is_class)
    report.notes["instructions without a valid example"] = without
    return rows, report


def self_instruct_dataset(generate_fn: GenerateFn, seeds: list[SeedTask],
                          cfg: SelfInstructConfig = SelfInstructConfig()) -> tuple[list[dict], list[CurateReport]]:
    """Alpaca records grown from `seeds`, with one report for instructions and one for instances."""
    rng = random.Random(cfg.seed)
    instructions, instr_report = generate_instructions(generate_fn, seeds, cfg, rng)
    is_class = classify(generate_fn, instructions, seeds, cfg, rng)
    rows, inst_report = generate_instances(generate_fn, instructions, is_class, seeds, cfg, rng)
    return rows, [instr_report, inst_report]
