"""What every stage shares: the run's context (model, tokenizer, teacher, eval splits, loaded once), the
task-record layout, and how a stage writes its counts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from jaxtune.curate import stories
from jaxtune.curate.constraints import GENERIC
from jaxtune.curate.teachers import LocalTeacher, teacher_from_config
from jaxtune.data.formats import Conversation
from jaxtune.jsonl import read_jsonl
from jaxtune.pipeline.config import BUILTIN_DOMAIN, PipelineConfig

EVAL_SPLITS = ("steering", "report")


def round_dir(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / f"round-{k}"


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_json(path: Path):
    """A JSON file's content, None when the file is absent (a stage that did not write it)."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def save_counts(out: Path, c: dict) -> dict:
    write_json(out / "counts.json", c)
    return c


def counts(n_in: int, n_out: int, dropped: Counter | dict | None = None, **notes) -> dict:
    dropped = dict(sorted((dropped or {}).items()))
    return {"in": n_in, "out": n_out, "dropped": dropped, **notes}


@dataclass
class Context:
    """What every stage may need, loaded once and only when first asked for."""

    cfg: PipelineConfig
    run_dir: Path
    log: Callable[[str], None] = print
    _cache: dict = field(default_factory=dict)

    def _once(self, name, make):
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    @property
    def tokenizer(self):
        from jaxtune.hf.load import load_tokenizer

        return self._once("tokenizer", lambda: load_tokenizer(self.cfg.model.tokenizer or self.cfg.model.path))

    @property
    def base_model(self):
        from jaxtune.hf.load import load_pretrained
        from jaxtune.model.config import parse_dtype

        return self._once("base", lambda: load_pretrained(self.cfg.model.path, parse_dtype(self.cfg.model.dtype)))

    @property
    def template(self) -> str | None:
        from jaxtune.data.chat import resolve_template

        return self._once("template", lambda: resolve_template(self.cfg.domain.template, self.tokenizer))

    def local(self, model, cfg) -> LocalTeacher:
        """A local sampler that prompts through the domain's template (the tokenizer's own when unset)."""
        return LocalTeacher(model, self.tokenizer, cfg, template=self.template, model_dir=self.cfg.model.path)

    @property
    def teacher(self):
        t = self.cfg.teacher
        if t.kind == "local" and t.model is None:
            return self._once("teacher", lambda: self.local(self.base_model, t))
        return self._once("teacher", lambda: teacher_from_config(t, base_model_dir=self.cfg.model.path,
                                                                 template=self.template))

    def model_teacher(self, model, *, temperature: float) -> LocalTeacher:
        """A local sampler for `model` with the teacher's stop tokens and the domain template."""
        t = self.cfg.teacher
        stop = t.stop if t.kind == "local" else ()  # an endpoint's stop strings are not the base model's tokens
        cfg = dataclasses.replace(t, kind="local", model=None, base_url=None, stop=stop, temperature=temperature,
                                  batch_size=self.cfg.evaluate.batch_size)
        return self.local(model, cfg)

    @property
    def eval_tasks(self) -> dict[str, list[dict]]:
        return self._once("eval", lambda: split_eval(load_tasks(self.eval_path), self.cfg.domain.report_fraction,
                                                     self.cfg.domain.eval_limit))

    @property
    def eval_path(self) -> Path:
        d = self.cfg.domain.eval
        return stories.EVAL if d == BUILTIN_DOMAIN else Path(d)

    @property
    def seeds_path(self) -> Path:
        d = self.cfg.domain.seeds
        return stories.SEEDS if d == BUILTIN_DOMAIN else Path(d)

    def check_inputs(self) -> None:
        """Read the seed and eval files once, so a bad record is named before any stage runs."""
        self.eval_tasks  # noqa: B018 (loads and splits the eval prompts)
        if self.cfg.generate.method == "compose":
            stories.load_premises(self.seeds_path, split="train")
        else:
            from jaxtune.curate.self_instruct import load_seed_tasks

            load_seed_tasks(self.seeds_path)

    def catalogue(self) -> dict:
        return stories.KINDS if self.cfg.generate.method == "compose" else GENERIC


# ------------------------------------------------------------------------------------------------ tasks


def load_tasks(path: Path) -> list[dict]:
    """IFEval-layout records (`key`, `prompt`, `instruction_id_list`, `kwargs`, optional `task_type`)."""
    from jaxtune.eval.ifeval import load_inputs_with_lines

    out = []
    for line, rec in load_inputs_with_lines(path):
        rec = dict(rec)
        rec.setdefault("task_type", None)
        rec["key"] = str(rec.get("key", f"line-{line}"))
        out.append(rec)
    return out


def split_eval(tasks: list[dict], report_fraction: float, limit: int | None = None) -> dict[str, list[dict]]:
    """Steering vs held-out report split by a hash of each key (stable as the file grows or is reordered)."""
    if limit is not None:
        tasks = tasks[:limit]

    def u(key: str) -> float:
        return int(hashlib.sha256(f"jaxtune-split:{key}".encode()).hexdigest()[:12], 16) / 16 ** 12

    out = {"steering": [t for t in tasks if u(t["key"]) >= report_fraction],
           "report": [t for t in tasks if u(t["key"]) < report_fraction]}
    for name, part in out.items():
        if not part:
            raise ValueError(f"the eval set has no {name} prompts ({len(tasks)} prompts, report_fraction "
                             f"{report_fraction}); use more eval prompts")
    return out


def conversation(task: dict, response: str, source: str) -> Conversation:
    meta = {"task_type": task["task_type"]} if task.get("task_type") else {}
    return Conversation([{"role": "user", "content": task["prompt"]}, {"role": "assistant", "content": response}],
                        source, meta=meta)


def data_rows(tasks: list[dict]) -> list[dict]:
    """Training rows (Alpaca layout) that keep the task's key, type and constraints for later stages."""
    return [{"instruction": t["prompt"], "input": "", "output": t["response"], "key": t["key"],
             "task_type": t.get("task_type"), "instruction_id_list": t["instruction_id_list"], "kwargs": t["kwargs"]}
            for t in tasks]


def rows_to_tasks(path: Path) -> list[dict]:
    return [{"key": r["key"], "prompt": r["instruction"], "response": r["output"], "task_type": r.get("task_type"),
             "instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"]} for _, r in read_jsonl(path)]
