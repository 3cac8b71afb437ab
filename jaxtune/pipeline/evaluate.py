"""The evaluate stage: the round's model answers every eval prompt; constraint satisfaction, format adherence,
rigidity, generalization, hallucination, forgetting and (from round 1) inference cost, with n and intervals."""

from __future__ import annotations

from pathlib import Path

from jaxtune import stats
from jaxtune.curate.teachers import LocalTeacher
from jaxtune.jsonl import write_jsonl
from jaxtune.pipeline.config import BUILTIN_DOMAIN
from jaxtune.pipeline.context import EVAL_SPLITS, Context, counts, round_dir, save_counts, write_json


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
