"""The stages of one round: each reads its inputs, writes its outputs into a fresh directory and returns its
counts (in, out, dropped by reason). `run.py` decides which to run, and makes each write atomic.

    generate  tasks (composed, or Self-Instruct) as round K-1's steering failures allocate them, each
              answered by the teacher until a response passes its own constraints (K samples at most)
    filter    quality checks, decontamination against both eval splits, dedup, model scores, cap per type
    distill   the base model rewrites the responses (SDFT), or keeps them when they are its own already
    tune      LoRA (or full) SFT from the base on this round's data (and earlier rounds' with accumulate)
    evaluate  the round's model answers every eval prompt; constraints, rigidity, forgetting, with n and CIs
    report    this round's held-out metrics next to every earlier round's (report.json, report.html)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from jaxtune import stats
from jaxtune.curate import stories
from jaxtune.curate.constraints import GENERIC, attach_constraints, failed_constraints
from jaxtune.curate.teachers import LocalTeacher, teacher_from_config
from jaxtune.data.formats import Conversation
from jaxtune.jsonl import read_jsonl, write_jsonl
from jaxtune.pipeline import allocation
from jaxtune.pipeline.config import BUILTIN_DOMAIN, PipelineConfig

EVAL_SPLITS = ("steering", "report")


def round_dir(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / f"round-{k}"


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_counts(out: Path, c: dict) -> dict:
    write_json(out / "counts.json", c)
    return c


def counts(n_in: int, n_out: int, dropped: Counter | dict | None = None, **notes) -> dict:
    dropped = dict(sorted((dropped or {}).items()))
    return {"in": n_in, "out": n_out, "dropped": dropped, **notes}


# ------------------------------------------------------------------------------------------------ context


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


def _conversation(task: dict, response: str, source: str) -> Conversation:
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


# ------------------------------------------------------------------------------------------------ generate


def answer(ctx: Context, tasks: list[dict], *, samples: int, max_new_tokens: int, seed: int, require_stop: bool,
           teacher=None, progress=None) -> tuple[list[dict], list[dict], dict]:
    """Sample up to `samples` responses per task, keeping the first that passes every constraint of the task
    (and ended on a stop token when `require_stop`). Returns kept tasks (with `response`, `sample`), rejected
    ones (with the last failure), and token/time totals. A skipped prompt or endpoint error is final.
    `progress(done, total, note)` counts requests answered against the most there can be."""
    teacher = teacher or ctx.teacher
    pending = list(range(len(tasks)))
    kept: dict[int, dict] = {}
    last: dict[int, tuple[str, str | None]] = {}
    usage = Counter()
    budget, answered, start = len(tasks) * samples, 0, time.perf_counter()
    for s in range(samples):
        if not pending:
            break

        def tick(n: int, s=s, answered=answered, budget=budget) -> None:
            if progress:
                rate = usage["tokens_out"] / max(time.perf_counter() - start, 1e-9)
                progress(answered + n, budget, f"sample {s + 1}/{samples}, kept {len(kept)}, {rate:.0f} tokens/s")

        done = teacher.complete([tasks[i]["prompt"] for i in pending], max_new_tokens=max_new_tokens, seed=seed,
                                sample=s, progress=tick)
        answered += len(pending)
        still = []
        for i, c in zip(pending, done):
            usage["tokens_in"] += c.tokens_in
            usage["tokens_out"] += c.tokens_out
            usage["seconds"] += c.seconds
            if not c.ok:
                last[i] = (f"error: {c.reason}" if c.finish == "error" else "prompt too long", c.reason)
                continue
            if require_stop and c.finish != "stop":
                last[i] = ("unfinished (no stop token)", c.text)
                still.append(i)
                continue
            failed = failed_constraints(tasks[i], c.text)
            if failed:
                last[i] = (f"failed {failed[0]}", c.text)
                still.append(i)
            else:
                kept[i] = {**tasks[i], "response": c.text.strip(), "sample": s}
        pending = still
        budget = answered + len(pending) * (samples - s - 1)
        tick(0)
    rejected = [{**tasks[i], "reason": last[i][0], "last_response": last[i][1]} for i in range(len(tasks))
                if i not in kept]
    return [kept[i] for i in sorted(kept)], rejected, dict(usage)


def _reason_counts(rejected: list[dict]) -> Counter:
    return Counter("endpoint error" if r["reason"].startswith("error") else r["reason"] for r in rejected)


def _examples(rejected: list[dict], n: int = 3) -> dict[str, list[str]]:
    """The first `n` task keys per reason, so the report names the records behind each count."""
    out: dict[str, list[str]] = {}
    for r in rejected:
        reason = "endpoint error" if r["reason"].startswith("error") else r["reason"]
        if len(out.setdefault(reason, [])) < n:
            out[reason].append(f"{r['key']}: {r['reason']}" if reason == "endpoint error" else r["key"])
    return out


def previous_rows(ctx: Context, k: int) -> list[dict]:
    """Per-prompt steering results of the model round k builds on (round k-1's evaluation)."""
    path = round_dir(ctx.run_dir, k - 1) / "evaluate" / "steering.jsonl"
    return [r for _, r in read_jsonl(path)]


def run_generate(ctx: Context, k: int, out: Path, progress=None) -> dict:
    g, cfg = ctx.cfg.generate, ctx.cfg
    rows = previous_rows(ctx, k)
    catalogue = ctx.catalogue()
    alloc = {}
    if "instruction" in cfg.allocation.by:
        alloc["instruction"] = allocation.allocate(rows, list(catalogue), g.tasks, cfg.allocation.weight, "instruction")
    if g.method == "compose":
        unseen = set(cfg.domain.unseen_task_types)
        premises = [p for p in stories.load_premises(ctx.seeds_path, split="train") if p.task_type not in unseen]
        if "task_type" in cfg.allocation.by:
            types = sorted({p.task_type for p in premises})
            alloc["task_type"] = allocation.allocate(rows, types, g.tasks, cfg.allocation.weight, "task_type")
        tasks = stories.compose_tasks(premises, g.tasks, seed=g.seed * 1000 + k, max_constraints=g.max_constraints,
                                      kind_counts=alloc.get("instruction", {}).get("counts"),
                                      type_counts=alloc.get("task_type", {}).get("counts"), key_prefix=f"r{k}")
        made, made_usage = {"composed": len(tasks)}, Counter()
    else:
        made_usage: Counter = Counter()
        tasks, made = self_instruct_tasks(ctx, k, alloc.get("instruction", {}).get("counts"), made_usage)
    write_json(out / "allocation.json", alloc)
    kept, rejected, usage = answer(ctx, tasks, samples=g.samples, max_new_tokens=g.max_new_tokens,
                                   seed=g.seed * 1000 + k, require_stop=g.require_stop, progress=progress)
    write_jsonl(out / "tasks.jsonl", kept)
    write_jsonl(out / "rejects.jsonl", rejected)
    by_kind = {iid: {"tasks": sum(iid in t["instruction_id_list"] for t in tasks),
                     "kept": sum(iid in t["instruction_id_list"] for t in kept)} for iid in catalogue}
    # Token counts only (instructions and answers): wall time varies run to run, so it lives in the manifest.
    usage = dict(Counter({k: v for k, v in usage.items() if k != "seconds"}) + made_usage)
    return save_counts(out, counts(len(tasks), len(kept), _reason_counts(rejected), made=made,
                                   by_instruction=by_kind, teacher_usage=usage, examples=_examples(rejected)))


def self_instruct_tasks(ctx: Context, k: int, kind_counts: dict | None,
                        usage: Counter) -> tuple[list[dict], dict]:
    """New instructions grown from the seed tasks by the teacher (Self-Instruct), constraints attached as
    allocated; the teacher's tokens are added to `usage`."""
    import random

    from jaxtune.curate.self_instruct import chat_list, generate_instructions, load_seed_tasks

    g = ctx.cfg.generate
    si = g.self_instruct_config(k)

    def generate_fn(prompts, max_new_tokens, seed):  # a chat teacher answers the open list in its own words
        done = ctx.teacher.complete(list(prompts), max_new_tokens=max_new_tokens, seed=seed)
        usage.update(tokens_in=sum(c.tokens_in for c in done), tokens_out=sum(c.tokens_out for c in done))
        chat = ctx.cfg.teacher.kind == "endpoint" or getattr(ctx.teacher, "template", None) is not None
        return [("" if not c.ok else chat_list(c.text, c.finish == "stop") if chat else c.text) for c in done]

    instructions, report = generate_instructions(generate_fn, load_seed_tasks(ctx.seeds_path), si,
                                                 random.Random(si.seed))
    counts_ = kind_counts
    if counts_ is not None and len(instructions) < g.tasks:
        counts_ = allocation.apportion({x: float(n) for x, n in counts_.items()}, len(instructions))
    tasks = attach_constraints(instructions, GENERIC, seed=g.seed * 1000 + k, counts=counts_,
                               max_constraints=g.max_constraints, key_prefix=f"r{k}")
    return tasks, {"instructions": len(instructions), "self_instruct": report.to_dict()}


# ------------------------------------------------------------------------------------------------ filter


def run_filter(ctx: Context, k: int, out: Path, progress=None) -> dict:
    from jaxtune.curate.filter import curate
    from jaxtune.curate.report import write_rejects

    tasks = [r for _, r in read_jsonl(round_dir(ctx.run_dir, k) / "generate" / "tasks.jsonl")]
    by_key = {t["key"]: t for t in tasks}
    unseen = set(ctx.cfg.domain.unseen_task_types)
    held_out = [t for t in tasks if t.get("task_type") in unseen]  # never train on a held-out task type
    convs = [_conversation(t, t["response"], t["key"]) for t in tasks if t.get("task_type") not in unseen]
    f = ctx.cfg.filter
    scoring = f.max_ifd is not None or f.max_ppl is not None
    references = {name: [t["prompt"] for t in part] for name, part in ctx.eval_tasks.items()}
    if f.score_template is None and f.score_end_token is None:  # score as the data will be trained
        f = dataclasses.replace(f, score_template=ctx.cfg.domain.template, score_end_token=ctx.cfg.domain.end_token)
    kept, report = curate(convs, f, tokenizer=ctx.tokenizer, model=ctx.base_model if scoring else None,
                          references=references)
    write_jsonl(out / "data.jsonl", data_rows([by_key[c.source] for c in kept]))
    write_rejects([report], out / "rejects.jsonl")
    if progress:
        progress(len(tasks), len(tasks))
    dropped = {name: n for name, n in report.rejected.items() if n}
    if held_out:
        dropped["held-out task type"] = len(held_out)
    return save_counts(out, counts(len(tasks), len(kept), dropped, notes=report.notes))


# ------------------------------------------------------------------------------------------------ distill


def run_distill(ctx: Context, k: int, out: Path, progress=None) -> dict:
    src = round_dir(ctx.run_dir, k) / "filter" / "data.jsonl"
    tasks = rows_to_tasks(src)
    d = ctx.cfg.distill
    if d.method == "off":
        write_jsonl(out / "data.jsonl", data_rows(tasks))
        note = ("responses kept as generated: the teacher is the base model, so they are its own"
                if ctx.cfg.teacher.kind == "local" and ctx.cfg.teacher.model is None else
                "responses kept as generated (distill.method: off)")
        if progress:
            progress(len(tasks), len(tasks))
        return save_counts(out, counts(len(tasks), len(tasks), note=note))
    from jaxtune.curate.sdft import distill

    base = ctx.model_teacher(ctx.base_model, temperature=ctx.cfg.teacher.temperature)
    usage = Counter()

    def generate_fn(prompts, max_new_tokens, seed):  # SDFT's generator, counting tokens for the data cost
        done = base.complete(list(prompts), max_new_tokens=max_new_tokens, seed=seed,
                             progress=lambda n: progress(n, len(prompts)) if progress else None)
        usage.update(tokens_in=sum(c.tokens_in for c in done), tokens_out=sum(c.tokens_out for c in done))
        return [c.text if c.ok and c.text is not None else "" for c in done]

    convs = [_conversation(t, t["response"], t["key"]) for t in tasks]
    rewritten, report = distill(generate_fn, convs, d.sdft)
    final, fallback = [], Counter()
    for t, conv in zip(tasks, rewritten):
        new = conv.messages[-1]["content"]
        failed = failed_constraints(t, new) if new != t["response"] else []
        if failed:
            fallback[f"rewrite failed {failed[0]}"] += 1
            new = t["response"]
        final.append({**t, "response": new})
    for check, n in report.rejected.items():
        if n:
            fallback[f"rewrite rejected: {check}"] += n
    write_jsonl(out / "data.jsonl", data_rows(final))
    if progress:
        progress(len(tasks), len(tasks))
    rewrites = sum(a["response"] != b["response"] for a, b in zip(final, tasks))
    return save_counts(out, counts(len(tasks), len(final), rewrites_kept=rewrites,
                                   fell_back=dict(sorted(fallback.items())), teacher_usage=dict(usage)))


# ------------------------------------------------------------------------------------------------ tune


def tune_inputs(ctx: Context, k: int) -> list[Path]:
    first = 1 if ctx.cfg.tune.accumulate else k
    return [round_dir(ctx.run_dir, j) / "distill" / "data.jsonl" for j in range(first, k + 1)]


def run_tune(ctx: Context, k: int, out: Path, progress=None) -> dict:
    from jaxtune.train.loop import train

    rows = [r for p in tune_inputs(ctx, k) for _, r in read_jsonl(p)]
    if not rows:
        raise ValueError(f"round {k}: no training data survived generation and filtering; see the rejects.jsonl "
                         "files of this round's generate and filter stages")
    data = write_jsonl(out / "train.jsonl", rows)
    result = train(ctx.cfg.train_recipe(str(data), str(out / "train-run")))
    for part in ("merged", "adapter"):  # moved, not copied: an 8B merged model is 16 GB
        src = result.run_dir / "export" / part
        if src.is_dir():
            (src / ".jaxtune-export.json").unlink(missing_ok=True)
            shutil.move(src, out / part)
    summary = {"steps": result.step, "total_steps": result.total_steps, "stopped": result.stopped,
               "eval_loss": result.eval_loss, "first_loss": result.losses[0] if result.losses else None,
               "last_loss": result.losses[-1] if result.losses else None}
    write_json(out / "summary.json", summary)
    return save_counts(out, counts(len(rows), len(rows), **summary))


# ------------------------------------------------------------------------------------------------ evaluate


def round_model(ctx: Context, k: int):
    if k == 0:
        return ctx.base_model
    from jaxtune.hf.load import load_pretrained
    from jaxtune.model.config import parse_dtype

    return load_pretrained(str(round_dir(ctx.run_dir, k) / "tune" / "merged"), parse_dtype(ctx.cfg.model.dtype))


def score_rows(tasks: list[dict], completions) -> list[dict]:
    from jaxtune.eval.ifeval_checks import check_instruction, check_instruction_loose
    from jaxtune.eval.overreach import formatting_kinds, refusal

    rows = []
    for t, c in zip(tasks, completions):
        text = (c.text or "").strip()
        strict = [check_instruction(i, kw, t["prompt"], text) for i, kw in zip(t["instruction_id_list"], t["kwargs"])]
        loose = [check_instruction_loose(i, kw, t["prompt"], text)
                 for i, kw in zip(t["instruction_id_list"], t["kwargs"])]
        rows.append({"key": t["key"], "task_type": t.get("task_type"), "prompt": t["prompt"], "response": text,
                     "finish": c.finish, "tokens_out": c.tokens_out, "instruction_id_list": t["instruction_id_list"],
                     "kwargs": t["kwargs"], "followed": strict, "followed_loose": loose,
                     "refusal": refusal(text), "formatting": formatting_kinds(text)})
    return rows


def unasked_format(rows: list[dict], catalogue: dict) -> dict:
    """Rigidity in the domain: for each format-type constraint of the catalogue, how often a response
    satisfies it (with any of its values) on prompts that did not ask for it."""
    from jaxtune.eval.ifeval_checks import FORMAT_GROUPS, check_instruction, group_of

    out = {}
    for iid, kind in catalogue.items():
        if group_of(iid) not in FORMAT_GROUPS:
            continue
        unasked = [r for r in rows if iid not in r["instruction_id_list"]]
        hits = [any(check_instruction(iid, kind.kwargs(v, None), r["prompt"], r["response"]) for v in kind.values)
                for r in unasked]
        out[iid] = stats.rate_of(hits).to_dict()
    return out


def generalization(rows: list[dict], unseen: tuple[str, ...], n_boot: int) -> dict | None:
    """Constraint satisfaction on task types held out of training vs the seen ones, and the gap (seen minus
    unseen, an unpaired bootstrap: different prompts)."""
    if not unseen:
        return None
    flags = {side: [float(all(r["followed"])) for r in rows if (r["task_type"] in unseen) == (side == "unseen")]
             for side in ("seen", "unseen")}
    return {"unseen_task_types": list(unseen),
            "seen": stats.rate(int(sum(flags["seen"])), len(flags["seen"])).to_dict(),
            "unseen": stats.rate(int(sum(flags["unseen"])), len(flags["unseen"])).to_dict(),
            "gap": stats.difference(flags["seen"], flags["unseen"], n_boot=n_boot).to_dict()}


def summarize(rows: list[dict], catalogue: dict, n_boot: int) -> dict:
    """Rates with n and Wilson intervals: constraint satisfaction per prompt (all followed, strict) and per
    instruction, format adherence and ignored-constraint rate (IFEval's definitions, loose), per constraint
    and per task type, finished responses, response length, refusals and unrequested formatting."""
    from jaxtune.eval.ifeval_checks import FORMAT_GROUPS, group_of
    from jaxtune.eval.overreach import score_overreach

    flat = [(i, s, lo) for r in rows for i, s, lo in zip(r["instruction_id_list"], r["followed"], r["followed_loose"])]
    over = score_overreach([r["prompt"] for r in rows], [r["response"] for r in rows])
    over.pop("rows", None)
    return {
        "n_prompts": len(rows),
        "prompt_all_followed": stats.rate_of(all(r["followed"]) for r in rows).to_dict(),
        "instruction_followed": stats.rate_of(s for _, s, _ in flat).to_dict(),
        "format_adherence": stats.rate_of(lo for i, _, lo in flat if group_of(i) in FORMAT_GROUPS).to_dict(),
        "ignored_constraint_rate": stats.rate_of(not lo for _, _, lo in flat).to_dict(),
        "by_instruction": {i: stats.rate_of(s for j, s, _ in flat if j == i).to_dict()
                           for i in sorted({i for i, _, _ in flat})},
        "by_task_type": {tt: stats.rate_of(all(r["followed"]) for r in rows if r["task_type"] == tt).to_dict()
                         for tt in sorted({r["task_type"] for r in rows if r["task_type"]})},
        "finished": stats.rate_of(r["finish"] == "stop" for r in rows).to_dict(),
        "response_tokens": stats.mean([r["tokens_out"] for r in rows], n_boot=n_boot).to_dict(),
        "overreach": over,
        "unasked_format": unasked_format(rows, catalogue),
    }


def forgetting(ctx: Context, k: int, model, out: Path) -> dict | None:
    """Drift from the base: the monitor's metrics, plus a paired interval for the perplexity rise on the
    base model's own samples (per-sample NLL, tuned minus base; a rise of exp(mean) - 1)."""
    import math

    from jaxtune.eval.forgetting import ForgettingMonitor
    from jaxtune.eval.loss import sequence_losses

    fcfg = ctx.cfg.tune.forgetting
    if not ctx.cfg.evaluate.forgetting or fcfg is None:
        return None
    base_dir = out if k == 0 else round_dir(ctx.run_dir, 0) / "evaluate"
    monitor = ForgettingMonitor(ctx.tokenizer, fcfg, run_dir=base_dir)
    if k == 0:
        metrics = monitor.baseline(model)
    else:
        monitor.baseline(None)
        metrics = monitor.measure(model)
    result = {"metrics": metrics, "base": monitor.base_metrics}
    if monitor.samples:
        width = max(fcfg.seq_len, max(len(s) for s in monitor.samples))
        base_nll = sequence_losses(ctx.base_model, monitor.samples, width)
        nll = base_nll if k == 0 else sequence_losses(model, monitor.samples, width)
        diff = stats.paired_difference(base_nll, nll, n_boot=ctx.cfg.evaluate.n_boot)
        rise = {key: (None if v is None else math.exp(v) - 1.0) for key, v in
                (("value", diff.value), ("lo", diff.lo), ("hi", diff.hi))}
        result["base_ppl_rise"] = {**rise, "n": diff.n, "method": "paired bootstrap over base samples"}
    return result


def hallucination(ctx: Context, sampler: LocalTeacher, out: Path) -> dict:
    """Grounded and closed-book hallucination of the round's model: per-record rows in `<task>.jsonl`, rates in
    the summary."""
    from jaxtune.eval import closedbook, grounded

    e, summary = ctx.cfg.evaluate, {}
    for name, spec, load, prompt, score in (
            ("grounded", e.grounded, grounded.load_grounded, grounded.grounded_prompt, grounded.score_grounded),
            ("closedbook", e.closedbook, closedbook.load_closedbook, closedbook.closedbook_prompt,
             closedbook.score_closedbook)):
        if spec is None:
            continue
        records = load(None if spec == BUILTIN_DOMAIN else spec)[:e.hallucination_limit]
        done = sampler.complete([prompt(r) for r in records], max_new_tokens=e.hallucination_max_new_tokens,
                                seed=e.seed)
        doc = score(records, [c.text or "" for c in done])
        write_jsonl(out / f"{name}.jsonl", doc.pop("rows"))
        summary[name] = doc
    return summary


def run_evaluate(ctx: Context, k: int, out: Path, progress=None) -> dict:
    e = ctx.cfg.evaluate
    model = round_model(ctx, k)
    sampler = ctx.model_teacher(model, temperature=e.temperature)
    catalogue = ctx.catalogue()
    summary = {}
    for split in EVAL_SPLITS:
        tasks = ctx.eval_tasks[split]
        done = sampler.complete([t["prompt"] for t in tasks], max_new_tokens=e.max_new_tokens, seed=e.seed)
        rows = score_rows(tasks, done)
        write_jsonl(out / f"{split}.jsonl", rows)
        summary[split] = summarize(rows, catalogue, e.n_boot)
        summary[split]["generalization"] = generalization(rows, ctx.cfg.domain.unseen_task_types, e.n_boot)
        if progress:
            progress(EVAL_SPLITS.index(split) + 1, len(EVAL_SPLITS))
    summary["forgetting"] = forgetting(ctx, k, model, out)
    summary.update(hallucination(ctx, sampler, out))
    write_json(out / "scores.json", summary)
    if k and e.latency_prompts:
        from jaxtune.eval.latency import measure_latency

        prompts = [t["prompt"] for t in ctx.eval_tasks["report"]][:e.latency_prompts]
        timing = measure_latency({"base": ctx.base_model, "tuned": model}, ctx.tokenizer, prompts,
                                 template=ctx.template, max_new_tokens=e.max_new_tokens,
                                 batch_size=min(e.latency_batch_size, len(prompts)), stop_ids=sampler.params.stop_ids,
                                 repeats=e.latency_repeats, n_boot=e.n_boot)
        write_json(out / "timing.json", timing)  # a view: wall times are not part of the stage's identity
    n = sum(summary[s]["n_prompts"] for s in EVAL_SPLITS)
    return save_counts(out, counts(n, n))


def run_report(ctx: Context, k: int, out: Path, progress=None) -> dict:
    from jaxtune.pipeline.report import build, write
    from jaxtune.structs import to_dict

    doc = build(ctx.run_dir, k, n_boot=ctx.cfg.evaluate.n_boot, cost=to_dict(ctx.cfg.cost),
                teacher_kind=ctx.cfg.teacher.kind)
    write(doc, out)
    if progress:
        progress(1, 1)
    return save_counts(out, counts(k + 1, k + 1))


RUNNERS = {"generate": run_generate, "filter": run_filter, "distill": run_distill, "tune": run_tune,
           "evaluate": run_evaluate, "report": run_report}


def stage_inputs(ctx: Context, stage: str, k: int) -> list[Path]:
    """The files a stage reads (hashed into its key); a later round also depends on earlier rounds."""
    r = round_dir(ctx.run_dir, k)
    if stage == "generate":
        return [ctx.seeds_path, round_dir(ctx.run_dir, k - 1) / "evaluate" / "steering.jsonl"]
    if stage == "filter":
        return [r / "generate" / "tasks.jsonl", ctx.eval_path]
    if stage == "distill":
        return [r / "filter" / "data.jsonl"]
    if stage == "tune":
        return tune_inputs(ctx, k)
    if stage == "evaluate":
        base = [] if k == 0 else [r / "tune" / "merged", round_dir(ctx.run_dir, 0) / "evaluate" / "forgetting"]
        sets = [Path(p) for p in (ctx.cfg.evaluate.grounded, ctx.cfg.evaluate.closedbook)
                if p not in (None, BUILTIN_DOMAIN)]
        return [ctx.eval_path, *sets, *base]
    if stage == "report":
        return [round_dir(ctx.run_dir, j) / "evaluate" / "scores.json" for j in range(k + 1)] + \
            [round_dir(ctx.run_dir, j) / "evaluate" / f"{s}.jsonl" for j in range(k + 1) for s in EVAL_SPLITS] + \
            [round_dir(ctx.run_dir, j) / s / "counts.json" for j in range(1, k + 1) for s in RUNNERS
             if s not in ("report",)]
    raise ValueError(stage)


def stage_config(cfg: PipelineConfig, stage: str) -> dict:
    """The recipe sections a stage depends on (a change in one re-runs that stage and what follows)."""
    from jaxtune.structs import to_dict

    d = to_dict(cfg)
    common = {"model": d["model"], "domain": d["domain"]}
    sections = {"generate": ("teacher", "generate", "allocation"), "filter": ("filter",),
                "distill": ("distill", "teacher"), "tune": ("tune",), "evaluate": ("evaluate", "teacher", "tune"),
                "report": ("evaluate", "cost")}[stage]
    return {**common, **{s: d[s] for s in sections}}
