"""The pipeline recipe: one YAML file, one dataclass per section, validated like a training recipe.

`tune` holds the training recipe's own sections (lora, optim, train, forgetting, mesh, seq_len); each round
builds a full training recipe from them, the model section and that round's data, so everything a training
recipe checks is checked here at load time too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from jaxtune.curate.filter import FilterConfig
from jaxtune.curate.sdft import SdftConfig
from jaxtune.curate.self_instruct import SelfInstructConfig
from jaxtune.curate.teachers import TeacherConfig
from jaxtune.data.config import DataConfig
from jaxtune.eval.forgetting import ForgettingConfig
from jaxtune.lora.config import LoraConfig
from jaxtune.pipeline.allocation import compile_formula, weights
from jaxtune.recipe import RECIPE_PATHS, ModelSection, OutputSection, RecipeConfig, TrainSection, load_config
from jaxtune.structs import from_dict
from jaxtune.train.optim import OptimConfig

BUILTIN_DOMAIN = "stories"
PATHS = (("model", ("path", "tokenizer")), ("domain", ("seeds", "eval", "template")),
         ("evaluate", ("grounded", "closedbook")),
         *((f"tune.{section}", keys) for section, keys in RECIPE_PATHS if section == "forgetting"))


def _need(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {msg}")


@dataclass(frozen=True)
class DomainSection:
    """`seeds`/`eval`: `stories` (the packaged story domain) or JSONL files. Seeds in IFEval's layout (`prompt`
    or `instruction`, optional `task_type`) are what Self-Instruct grows from; eval prompts are IFEval-layout
    records (`key`, `prompt`, `instruction_id_list`, `kwargs`, optional `task_type`), split by a hash of their
    key into a steering split (its failures decide what the next round generates) and a held-out report split
    (`report_fraction` of them) that no generation, filter or allocation ever sees.
    `template`/`end_token`: the chat template and response terminator used for prompting and tuning.
    `unseen_task_types`: task types held out of all generated and training data, so the report can show how
    the model does on kinds of task it was never tuned on, next to the seen ones."""

    seeds: str = BUILTIN_DOMAIN
    eval: str = BUILTIN_DOMAIN
    template: str | None = None
    end_token: str | None = None
    report_fraction: float = 0.5
    eval_limit: int | None = None
    unseen_task_types: tuple[str, ...] = ()

    def __post_init__(self):
        _need(0.0 < self.report_fraction < 1.0, "domain.report_fraction", "must be between 0 and 1")
        _need(self.eval_limit is None or self.eval_limit >= 2, "domain.eval_limit", "must be >= 2 or null")


@dataclass(frozen=True)
class GenerateSection:
    """`method`: compose (the story domain: premise × constraints, as the allocation asks) or self-instruct
    (the teacher writes new instructions from the seeds; constraints are then attached as allocated).
    Each task is answered by the teacher up to `samples` times until a response passes every constraint
    it carries (and ends with a stop token when `require_stop`); the rest are dropped, counted by reason."""

    method: str = "compose"
    tasks: int = 200
    max_constraints: int = 1
    samples: int = 4
    max_new_tokens: int = 256
    require_stop: bool = True
    seed: int = 0
    self_instruct: dict = field(default_factory=dict)

    def __post_init__(self):
        _need(self.method in ("compose", "self-instruct"), "generate.method",
              f"{self.method!r} is not 'compose' or 'self-instruct'")
        for name in ("tasks", "max_constraints", "samples", "max_new_tokens"):
            _need(getattr(self, name) >= 1, f"generate.{name}", "must be >= 1")
        for name in ("num_instructions", "seed"):
            _need(name not in self.self_instruct, f"generate.self_instruct.{name}",
                  "is set by generate." + ("tasks" if name == "num_instructions" else "seed") + "; remove it")
        self.self_instruct_config(0)

    def self_instruct_config(self, k: int) -> SelfInstructConfig:
        """Self-Instruct's settings for round `k`: `tasks` instructions, a seed of its own per round."""
        try:
            return from_dict(SelfInstructConfig, {**self.self_instruct, "num_instructions": self.tasks,
                                                  "seed": self.seed * 1000 + k}, "generate.self_instruct")
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith("generate.") else f"generate.self_instruct.{msg}") from None


@dataclass(frozen=True)
class DistillSection:
    """`method`: `off` keeps the teacher's responses (right when the teacher is the base model itself: they
    are its own already), `rewrite` has the base model rewrite each in its own words (SDFT), re-verified
    against the task's constraints, falling back to the teacher's response when the rewrite fails."""

    method: str = "off"
    sdft: SdftConfig = field(default_factory=SdftConfig)

    def __post_init__(self):
        _need(self.method in ("off", "rewrite"), "distill.method", f"{self.method!r} is not 'off' or 'rewrite'")


@dataclass(frozen=True)
class TuneSection:
    """The training recipe's sections; `accumulate` trains round K on the kept data of rounds 1..K (from the
    base model each round), else on round K's data only."""

    lora: LoraConfig | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    forgetting: ForgettingConfig | None = field(default_factory=lambda: ForgettingConfig(warn_at=0.1, stop_at=0.5))
    mesh: dict[str, int] = field(default_factory=lambda: {"data": -1})
    seq_len: int = 512
    accumulate: bool = True


@dataclass(frozen=True)
class EvaluateSection:
    """Responses to every eval prompt (steering and report) from the model of the round (round 0: the base).
    `temperature` 0 is greedy; `forgetting` measures drift from the base with tune.forgetting's settings.
    `grounded` / `closedbook`: hallucination sets (`stories`: the packaged ones, a JSONL path, or null to
    skip), answered in up to `hallucination_max_new_tokens` (the first `hallucination_limit` records of each). From round 1, `latency_prompts` report prompts
    are timed with the base and the round's model in batches of `latency_batch_size` (`latency_repeats`
    times each, interleaved; the intervals are over batches)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 32
    forgetting: bool = True
    n_boot: int = 2000
    grounded: str | None = BUILTIN_DOMAIN
    closedbook: str | None = BUILTIN_DOMAIN
    hallucination_max_new_tokens: int = 64
    hallucination_limit: int | None = None
    latency_prompts: int = 32
    latency_batch_size: int = 8
    latency_repeats: int = 2

    def __post_init__(self):
        _need(self.max_new_tokens >= 1, "evaluate.max_new_tokens", "must be >= 1")
        _need(self.temperature >= 0, "evaluate.temperature", "must be >= 0")
        for name in ("hallucination_max_new_tokens", "latency_repeats", "latency_batch_size"):
            _need(getattr(self, name) >= 1, f"evaluate.{name}", "must be >= 1")
        _need(self.latency_prompts >= 0, "evaluate.latency_prompts", "must be >= 0 (0: not timed)")


@dataclass(frozen=True)
class AllocationSection:
    """`weight`: a formula (see pipeline/allocation.py) over each label's steering failures; `by`: the
    dimensions allocated (instruction ids, task types)."""

    weight: str = "max(fail_rate, 0.1)"
    by: tuple[str, ...] = ("instruction", "task_type")

    def __post_init__(self):
        compile_formula(self.weight)
        # The evidence every run meets sooner or later: a label never failed, always failed, never seen.
        weights({"never failed": (0, 10), "always failed": (10, 10), "half failed": (5, 10), "unseen": (0, 0)},
                self.weight)
        for b in self.by:
            _need(b in ("instruction", "task_type"), "allocation.by", f"{b!r} is not 'instruction' or 'task_type'")


@dataclass(frozen=True)
class CostSection:
    """What generated data cost, for the report: endpoint tokens at `price_per_million_input/output`, the local
    model's wall time at `device_hour` (a price per device-hour), next to `human_example` (the cost of one
    human-written example), all in `currency`. Unset prices are not shown."""

    currency: str = "USD"
    price_per_million_input: float | None = None
    price_per_million_output: float | None = None
    device_hour: float | None = None
    human_example: float | None = None

    def __post_init__(self):
        for name in ("price_per_million_input", "price_per_million_output", "device_hour", "human_example"):
            v = getattr(self, name)
            _need(v is None or v >= 0, f"cost.{name}", f"{v} must be >= 0")


@dataclass
class PipelineConfig:
    model: ModelSection
    output: OutputSection
    domain: DomainSection = field(default_factory=DomainSection)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    generate: GenerateSection = field(default_factory=GenerateSection)
    filter: FilterConfig = field(default_factory=FilterConfig)
    distill: DistillSection = field(default_factory=DistillSection)
    tune: TuneSection = field(default_factory=TuneSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    allocation: AllocationSection = field(default_factory=AllocationSection)
    cost: CostSection = field(default_factory=CostSection)
    rounds: int = 2

    def __post_init__(self):
        _need(self.rounds >= 1, "rounds", "must be >= 1")
        if self.generate.method == "compose":
            _need(self.domain.seeds == BUILTIN_DOMAIN, "generate.method",
                  "compose builds tasks from the packaged story premises (domain.seeds: stories); "
                  "use self-instruct for your own seed file")
        else:
            _need("task_type" not in self.allocation.by, "allocation.by",
                  "task_type applies to generate.method: compose (Self-Instruct tasks have no task types to "
                  "allocate); use [instruction]")
            _need(self.domain.seeds != BUILTIN_DOMAIN, "domain.seeds",
                  "self-instruct grows instructions from a Self-Instruct seed file (JSONL: instruction, instances); "
                  "stories is for generate.method: compose")
        steps, warmup = self.tune.train.steps, self.tune.optim.warmup_steps
        _need(steps is None or warmup <= steps, "tune.optim.warmup_steps",
              f"{warmup} exceeds tune.train.steps={steps}")
        try:
            self.train_recipe("pending.jsonl", "pending")
        except ValueError as e:
            raise ValueError(f"tune.{e}") from None

    def train_recipe(self, data: str, run_dir: str) -> RecipeConfig:
        """The training recipe of one round."""
        t = self.tune
        lora = t.lora if self.tune.train.mode == "lora" else None
        return RecipeConfig(
            model=self.model,
            data=DataConfig(train=data, chat_template=self.domain.template, end_token=self.domain.end_token,
                            seq_len=t.seq_len, cache_dir=None),
            output=dataclasses.replace(self.output, run_dir=run_dir, export=True),
            lora=lora, optim=t.optim, train=t.train, mesh=dict(t.mesh), forgetting=t.forgetting)


def load_pipeline(path, overrides: list[str] | None = None) -> PipelineConfig:
    return load_config(path, PipelineConfig, overrides, PATHS)
