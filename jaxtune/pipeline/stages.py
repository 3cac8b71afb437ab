"""The stages of one round: each reads its inputs, writes its outputs into a fresh directory and returns its
counts (in, out, dropped by reason). `run.py` decides which to run, and makes each write atomic. Generate and
evaluate have modules of their own; the shared context is in `context.py`.

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
import shutil
from collections import Counter
from pathlib import Path

from jaxtune.curate.constraints import failed_constraints
from jaxtune.jsonl import read_jsonl, write_jsonl
from jaxtune.pipeline.config import BUILTIN_DOMAIN, PipelineConfig
from jaxtune.pipeline.context import (
    EVAL_SPLITS,
    Context,
    conversation,
    counts,
    data_rows,
    round_dir,
    rows_to_tasks,
    save_counts,
    write_json,
)
from jaxtune.pipeline.evaluate import run_evaluate
from jaxtune.pipeline.generate import run_generate

# ------------------------------------------------------------------------------------------------ filter


def run_filter(ctx: Context, k: int, out: Path, progress=None) -> dict:
    from jaxtune.curate.filter import curate
    from jaxtune.curate.report import write_rejects

    tasks = [r for _, r in read_jsonl(round_dir(ctx.run_dir, k) / "generate" / "tasks.jsonl")]
    by_key = {t["key"]: t for t in tasks}
    unseen = set(ctx.cfg.domain.unseen_task_types)
    held_out = [t for t in tasks if t.get("task_type") in unseen]  # never train on a held-out task type
    convs = [conversation(t, t["response"], t["key"]) for t in tasks if t.get("task_type") not in unseen]
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

    convs = [conversation(t, t["response"], t["key"]) for t in tasks]
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
        measured = ctx.cfg.evaluate.forgetting and ctx.cfg.tune.forgetting is not None
        base = [] if k == 0 else [r / "tune" / "merged"] + (
            [round_dir(ctx.run_dir, 0) / "evaluate" / "forgetting"] if measured else [])
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
