"""The generate stage: tasks as round K-1's steering failures allocate them (composed story tasks, or
Self-Instruct through the teacher), each answered until a response passes its own constraints."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from jaxtune.curate import stories
from jaxtune.curate.constraints import GENERIC, attach_constraints, failed_constraints
from jaxtune.jsonl import read_jsonl, write_jsonl
from jaxtune.pipeline import allocation
from jaxtune.pipeline.context import Context, counts, round_dir, save_counts, write_json


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


def _reason(rejected: dict) -> str:
    """The reason a drop is counted under: endpoint errors together, their messages kept in the examples."""
    return "endpoint error" if rejected["reason"].startswith("error") else rejected["reason"]


def _examples(rejected: list[dict], n: int = 3) -> dict[str, list[str]]:
    """The first `n` task keys per reason, so the report names the records behind each count."""
    out: dict[str, list[str]] = {}
    for r in rejected:
        reason = _reason(r)
        if len(out.setdefault(reason, [])) < n:
            out[reason].append(f"{r['key']}: {r['reason']}" if reason != r["reason"] else r["key"])
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
    return save_counts(out, counts(len(tasks), len(kept), Counter(map(_reason, rejected)), made=made,
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
