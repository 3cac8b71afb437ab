"""The pipeline's report: every round's held-out metrics side by side (round 0 is the base model), each
rate with its n and 95% interval, differences from the base in absolute points with a paired bootstrap over
the report prompts, and what each stage kept and dropped. `report.json` holds it all; `report.html` shows it
with inline figures only (no network).

Only the report split is shown as a result: the steering split decided what later rounds generated, so its
numbers are listed apart, as what the loop optimised for.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from jaxtune import stats
from jaxtune.eval.report import CSS, img_tag, png, table, write_report
from jaxtune.jsonl import read_jsonl
from jaxtune.pipeline.context import read_json, round_dir

SCHEMA = 1
# (key in an evaluate summary, label, whether lower is better)
HEADLINE = (("prompt_all_followed", "constraint satisfaction (all of a prompt's, strict)", False),
            ("instruction_followed", "constraints followed (each, strict)", False),
            ("format_adherence", "format adherence (loose)", False),
            ("ignored_constraint_rate", "ignored-constraint rate (loose)", True),
            ("finished", "finished (ended on a stop token)", False))
# Per-prompt 0/1 values for the paired differences against the base.
PAIRED = {"prompt_all_followed": lambda r: float(all(r["followed"])),
          "instruction_followed": lambda r: sum(r["followed"]) / len(r["followed"]) if r["followed"] else 0.0,
          "ignored_constraint_rate": lambda r: (sum(not x for x in r["followed_loose"]) / len(r["followed_loose"])
                                                if r["followed_loose"] else 0.0),
          "finished": lambda r: float(r["finish"] == "stop"),
          "unrequested_formatting": lambda r: float(bool(r.get("formatting")) and not _asked(r)),
          "refusal": lambda r: float(r.get("refusal") is not None)}


def _asked(row: dict) -> bool:
    from jaxtune.eval.overreach import asked_formatting

    return bool(set(row.get("formatting") or ()) & asked_formatting(row["prompt"]))


def data_cost(usage: list[dict], kept: int, cost: dict) -> dict:
    """What a round's generated examples cost. `usage`: one entry per generation stage, `{stage, teacher
    ("local" | "endpoint"), tokens_in, tokens_out, seconds}`; an endpoint costs its tokens at the recipe's
    prices per million, the local model its wall time at `device_hour` (one device). Per kept example, next
    to what `kept` human-written examples would cost. A figure whose price is unset is None."""
    def priced(u):
        if u["teacher"] == "endpoint":
            p_in, p_out = cost.get("price_per_million_input"), cost.get("price_per_million_output")
            if p_in is None or p_out is None:
                return None
            return u["tokens_in"] / 1e6 * p_in + u["tokens_out"] / 1e6 * p_out
        hour = cost.get("device_hour")
        return None if hour is None else u["seconds"] / 3600 * hour

    stages = [{**u, "cost": priced(u)} for u in usage]
    total = None if any(s["cost"] is None for s in stages) else sum(s["cost"] for s in stages)
    human = None if cost.get("human_example") is None else kept * cost["human_example"]
    return {"currency": cost.get("currency", "USD"), "stages": stages, "kept": kept, "total": total,
            "per_kept_example": None if total is None or not kept else total / kept,
            "human_equivalent": human,
            "saving": None if total is None or not human else 1 - total / human,
            "device_seconds": sum(s["seconds"] for s in stages if s["teacher"] == "local"),
            "tokens": {"in": sum(s["tokens_in"] for s in stages), "out": sum(s["tokens_out"] for s in stages)}}


def _rows(run_dir: Path, k: int, split: str) -> list[dict]:
    return [r for _, r in read_jsonl(round_dir(run_dir, k) / "evaluate" / f"{split}.jsonl")]


def _hallucination(run_dir: Path, k: int, n_boot: int) -> dict:
    """Each hallucination set's rates for round k, paired with the base's over the same records."""
    from jaxtune.eval import closedbook, grounded
    from jaxtune.eval.hallucination import compare

    out = {}
    for name, metrics in (("grounded", grounded.METRICS), ("closedbook", closedbook.METRICS)):
        paths = [round_dir(run_dir, j) / "evaluate" / f"{name}.jsonl" for j in (0, k)]
        if all(p.is_file() for p in paths):
            base, tuned = ([r for _, r in read_jsonl(p)] for p in paths)
            out[name] = compare(base, tuned, metrics, n_boot=n_boot, seed=k)
    return out


def _usage(run_dir: Path, k: int, teacher_kind: str) -> tuple[list[dict], int]:
    """Generation usage of round k's stages (tokens from their counts, wall time from their manifests) and the
    examples the round kept for training."""
    out = []
    for stage, kind in (("generate", teacher_kind), ("distill", "local")):
        counts = read_json(round_dir(run_dir, k) / stage / "counts.json") or {}
        usage = counts.get("teacher_usage")
        if usage:
            man = read_json(round_dir(run_dir, k) / stage / "manifest.json") or {}
            out.append({"stage": stage, "teacher": kind, "tokens_in": usage.get("tokens_in", 0),
                        "tokens_out": usage.get("tokens_out", 0), "seconds": man.get("seconds", 0.0)})
    kept = (read_json(round_dir(run_dir, k) / "distill" / "counts.json") or {}).get("out", 0)
    return out, kept


def build(run_dir: str | Path, upto: int, *, n_boot: int = 2000, cost: dict | None = None,
          teacher_kind: str = "local") -> dict:
    """The report of rounds 0..`upto` from their stage outputs. Wall-time figures (inference and data cost)
    go in `doc["timing"]`, apart from the deterministic rest."""
    run_dir = Path(run_dir)
    rounds = []
    base_rows = _rows(run_dir, 0, "report")
    for k in range(upto + 1):
        scores = read_json(round_dir(run_dir, k) / "evaluate" / "scores.json")
        rows = _rows(run_dir, k, "report")
        if [r["key"] for r in rows] != [r["key"] for r in base_rows]:
            raise ValueError(f"round {k} was evaluated on other report prompts than round 0; re-run with --from "
                             "evaluate")
        diffs = {name: stats.paired_difference([f(r) for r in base_rows], [f(r) for r in rows], n_boot=n_boot,
                                               seed=k).to_dict() for name, f in PAIRED.items()}
        entry = {"round": k, "model": "base" if k == 0 else f"round-{k}/tune/merged", "report": scores["report"],
                 "steering": scores["steering"], "forgetting": scores.get("forgetting"), "vs_base": diffs,
                 "hallucination": _hallucination(run_dir, k, n_boot)}
        if k:
            entry["stages"] = {s: read_json(round_dir(run_dir, k) / s / "counts.json")
                               for s in ("generate", "filter", "distill", "tune")}
            entry["allocation"] = read_json(round_dir(run_dir, k) / "generate" / "allocation.json")
        rounds.append(entry)
    timing = {"inference": {}, "data": {}}
    for k in range(1, upto + 1):
        latency = read_json(round_dir(run_dir, k) / "evaluate" / "timing.json")
        if latency:
            timing["inference"][k] = latency
        usage, kept = _usage(run_dir, k, teacher_kind)
        timing["data"][k] = data_cost(usage, kept, cost or {})
    samples = [{"key": b["key"], "prompt": b["prompt"], "base": b["response"], "latest": r["response"],
                "base_followed": b["followed"], "latest_followed": r["followed"]}
               for b, r in list(zip(base_rows, _rows(run_dir, upto, "report")))[:6]]
    return {"schema": SCHEMA, "rounds": rounds, "n_report_prompts": len(base_rows), "samples": samples,
            "timing": timing}


# ------------------------------------------------------------------------------------------------ figures


def _series(doc: dict, key: str) -> tuple[list, list, list]:
    vals, los, his = [], [], []
    for r in doc["rounds"]:
        e = r["report"][key]
        vals.append(e["value"])
        los.append(e["lo"])
        his.append(e["hi"])
    return vals, los, his


def figures(doc: dict) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figs = {}
    x = np.arange(len(doc["rounds"]))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for key, label, _ in HEADLINE:
        v, lo, hi = (np.array([np.nan if a is None else 100 * a for a in s], float) for s in _series(doc, key))
        ax.errorbar(x, v, yerr=[v - lo, hi - v], marker="o", capsize=3, label=label)
    ax.set_xticks(x, [f"round {r['round']}" + (" (base)" if r["round"] == 0 else "") for r in doc["rounds"]])
    ax.set_ylim(0, 100)
    ax.set_ylabel("% (95% CI)")
    ax.set_title(f"held-out report split, n = {doc['n_report_prompts']} prompts")
    ax.legend(fontsize=7, loc="best")
    figs["rounds"] = png(fig)
    ids = sorted({i for r in doc["rounds"] for i in r["report"]["by_instruction"]})
    if ids:
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(ids) + 1.4))
        w = 0.8 / len(doc["rounds"])
        for j, r in enumerate(doc["rounds"]):
            e = [r["report"]["by_instruction"].get(i) or {} for i in ids]
            v = np.array([np.nan if x.get("value") is None else 100 * x["value"] for x in e])
            lo = np.array([np.nan if x.get("lo") is None else 100 * x["lo"] for x in e])
            hi = np.array([np.nan if x.get("hi") is None else 100 * x["hi"] for x in e])
            ax.barh(np.arange(len(ids)) + j * w, v, w, xerr=[v - lo, hi - v], capsize=2, label=f"round {r['round']}")
        ax.set_yticks(np.arange(len(ids)) + 0.4 - w / 2, ids, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("% followed (strict, 95% CI)")
        ax.legend(fontsize=7)
        figs["by_instruction"] = png(fig)
    return figs


# ------------------------------------------------------------------------------------------------ HTML


def _rate(e: dict | None) -> str:
    return html.escape(stats.fmt_rate(e))


def _points(e: dict | None) -> str:
    return html.escape(stats.fmt_points(e))


def _forgetting_cells(f: dict | None) -> list[str]:
    if not f:
        return ["n/a", "n/a", "n/a"]
    m = f["metrics"]
    rise = f.get("base_ppl_rise")
    rise_s = "n/a" if not rise or rise["value"] is None else (
        f"{100 * rise['value']:+.1f}% [{100 * rise['lo']:+.1f}, {100 * rise['hi']:+.1f}] n={rise['n']}")
    general = m.get("forgetting/general_ppl_rel")
    agree = m.get("forgetting/probe_agreement")
    return [html.escape(rise_s), "n/a" if general is None else f"{100 * general:+.1f}%",
            "n/a" if agree is None else f"{100 * agree:.0f}%"]


# What a stage's counts.json says beyond in/out/dropped, shown under the round's data table.
DETAILS = ("notes", "examples", "teacher_usage", "note", "rewrites_kept", "fell_back", "steps", "stopped",
           "first_loss", "last_loss")


def _note(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{html.escape(str(k))} {_note(x)}" for k, x in v.items())
    if isinstance(v, list):
        return "; ".join(_note(x) for x in v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _money(v, currency: str) -> str:
    return "n/a (no price in the recipe's cost: section)" if v is None else f"{v:.4g} {html.escape(currency)}"


def _data_cost_html(data: dict) -> str:
    if not data:
        return ""
    rows = []
    for k, d in data.items():
        c = d["currency"]
        rows.append([f"round {k}", str(d["kept"]), f"{d['tokens']['in']:,} / {d['tokens']['out']:,}",
                     f"{d['device_seconds']:.1f}", _money(d["total"], c), _money(d["per_kept_example"], c),
                     _money(d["human_equivalent"], c),
                     "n/a" if d["saving"] is None else f"{100 * d['saving']:.0f}%"])
    return ("<h2>Data cost (measured wall time; varies run to run)</h2>"
            "<p>Tokens and wall time of every generation stage (generate, and distill when it rewrites), priced as "
            "the recipe's <code>cost:</code> section says: endpoint tokens per million, the local model per "
            "device-hour; next to what the kept examples would cost written by people.</p>" +
            table(["round", "examples kept", "tokens in / out", "device-seconds (local)", "cost",
                   "per kept example", "human-written equivalent", "saving"], rows))


def _mean(e: dict | None, digits: int = 1) -> str:
    return html.escape(stats.fmt_mean(e, digits))


def _inference_html(inference: dict) -> str:
    if not inference:
        return ""
    parts = ["<h2>Inference cost (measured wall time; varies run to run)</h2>",
             ("<p>The base and the round's model answer the same report prompts in the same batches, interleaved "
             "after a warm-up compile, greedily. Means over batches (times) or prompts (length) with bootstrap "
             "intervals; tuned − base paired; the ratio is of the means.</p>")]
    rows = []
    for k, t in inference.items():
        base, tuned = t["models"]["base"], t["models"]["tuned"]
        comp = t["comparison"]["tuned"]
        for key, label, digits in (("length", "response length (tokens)", 1), ("ttft_ms", "time to first token (ms)", 2),
                                   ("per_token_ms", "decode time per token (ms)", 3),
                                   ("total_ms", "generation time per batch (ms)", 1)):
            ratio = comp["ratio"].get(key)
            rows.append([f"round {k}", label, _mean(base[key], digits), _mean(tuned[key], digits),
                         _mean(comp[key], digits), "n/a" if ratio is None else f"{ratio:.2f}×"])
        s = t["setup"]
        rows.append([f"round {k}", (f"setup: {s['prompts']} prompts in {s['batches']} batches of {s['batch_size']}, "
                     f"{s['repeats']} repeats, up to {s['max_new_tokens']} new tokens, {html.escape(str(s['device']))}"),
                     "", "", "", ""])
    parts.append(table(["round", "measure", "base", "tuned", "tuned − base", "tuned / base"], rows))
    return "\n".join(parts)


def _hallucination_html(rounds: list[dict], names: list[str]) -> str:
    from jaxtune.eval import closedbook, grounded

    parts = []
    for name, title, metrics in (("grounded", "grounded (questions about a given story)", grounded.METRICS),
                                 ("closedbook", "closed-book (some questions have no answer)", closedbook.METRICS)):
        if not any(name in r["hallucination"] for r in rounds):
            continue
        parts.append(f"<h3>Hallucination, {title}</h3>")
        rows = []
        for m in metrics:
            cells = [_rate(r["hallucination"].get(name, {}).get(m.name, {}).get("tuned")) for r in rounds]
            diffs = [_points(r["hallucination"].get(name, {}).get(m.name, {}).get("difference")) for r in rounds[1:]]
            rows.append([html.escape(f"{m.name} (of {m.of})"), *cells, *diffs])
        parts.append(table(["metric", *names, *[f"{n} − base" for n in names[1:]]], rows))
    return ("<h2>Hallucination</h2>" + "\n".join(parts)) if parts else ""


def render_html(doc: dict, figs: dict[str, bytes] | None = None) -> str:
    figs = figures(doc) if figs is None else figs
    e = html.escape
    rounds = doc["rounds"]
    names = [f"round {r['round']}" + (" (base)" if r["round"] == 0 else "") for r in rounds]
    parts = [("<!doctype html><html><head><meta charset='utf-8'><title>jaxtune pipeline report</title>"
              f"<style>{CSS}</style></head><body>"),
             f"<h1>Refinement loop: {len(rounds) - 1} round(s)</h1>",
             (f"<p>Held-out report split: {doc['n_report_prompts']} prompts no generation, filter or allocation "
              "saw. Rates: value [95% Wilson interval] n. Differences from the base: absolute points [95% paired "
              "bootstrap interval over prompts].</p>"), "<h2>Held-out metrics per round</h2>"]
    rows = [[e(label)] + [_rate(r["report"][key]) for r in rounds] for key, label, _ in HEADLINE]
    over = [("unrequested formatting (any kind)", lambda r: r["report"]["overreach"]["formatting"]["any"]),
            ("unwarranted refusals", lambda r: r["report"]["overreach"]["refusal"])]
    rows += [[e(label)] + [_rate(f(r)) for r in rounds] for label, f in over]
    for iid in sorted({i for r in rounds for i in r["report"]["unasked_format"]}):
        rows.append([e(f"trained format when not asked: {iid}")] +
                    [_rate(r["report"]["unasked_format"].get(iid)) for r in rounds])
    rows.append(["response length (tokens)"] + [_mean(r["report"]["response_tokens"]) for r in rounds])
    parts.append(table(["metric"] + names, rows))
    parts.append(img_tag(figs, "rounds"))
    parts.append("<h2>Change from the base (report split)</h2>")
    parts.append(table(["metric"] + names[1:],
                       [[e(name)] + [_points(r["vs_base"][name]) for r in rounds[1:]] for name in PAIRED]))
    parts.append("<h2>Forgetting (drift from the base)</h2>")
    parts.append(table(["round", "perplexity rise on base samples", "general-text perplexity change",
                        "probe agreement with the base"],
                       [[n] + _forgetting_cells(r["forgetting"]) for n, r in zip(names, rounds)]))
    parts.append("<h2>Per constraint (report split, strict)</h2>")
    ids = sorted({i for r in rounds for i in r["report"]["by_instruction"]})
    parts.append(table(["instruction"] + names, [[e(i)] + [_rate(r["report"]["by_instruction"].get(i)) for r in rounds]
                                                 for i in ids]))
    parts.append(img_tag(figs, "by_instruction"))
    types = sorted({t for r in rounds for t in r["report"]["by_task_type"]})
    if types:
        parts.append("<h3>Per task type (all of a prompt's constraints)</h3>")
        parts.append(table(["task type"] + names, [[e(t)] + [_rate(r["report"]["by_task_type"].get(t)) for r in rounds]
                                                   for t in types]))
    parts.append(_hallucination_html(rounds, names))
    gen = [r["report"].get("generalization") for r in rounds]
    if any(gen):
        unseen = ", ".join(next(g for g in gen if g)["unseen_task_types"])
        parts.append(f"<h2>Generalization: task types never trained on ({e(unseen)})</h2>")
        parts.append("<p>Constraint satisfaction (all of a prompt's, strict) on report prompts of the held-out "
                     "task types vs the seen ones; the gap is seen minus unseen (unpaired bootstrap).</p>")
        parts.append(table(["", *names], [
            ["seen task types"] + [_rate(g and g["seen"]) for g in gen],
            ["unseen task types"] + [_rate(g and g["unseen"]) for g in gen],
            ["gap (seen − unseen)"] + [_points(g and g["gap"]) for g in gen]]))
    parts.append(_inference_html(doc.get("timing", {}).get("inference", {})))
    parts.append(_data_cost_html(doc.get("timing", {}).get("data", {})))
    parts.append("<h2>Steering split (what the loop optimised for; not a held-out result)</h2>")
    parts.append(table(["metric"] + names, [[e(label)] + [_rate(r["steering"][key]) for r in rounds]
                                            for key, label, _ in HEADLINE]))
    parts.append("<h2>Data per round</h2>")
    for r in rounds[1:]:
        parts.append(f"<h3>Round {r['round']}</h3>")
        stage_rows = []
        for stage, c in (r.get("stages") or {}).items():
            if not c:
                continue
            dropped = ", ".join(f"{e(k)}: {v}" for k, v in c.get("dropped", {}).items()) or "none"
            stage_rows.append([stage, str(c["in"]), str(c["out"]), dropped])
        parts.append(table(["stage", "in", "out", "dropped (by reason)"], stage_rows))
        for stage, c in (r.get("stages") or {}).items():
            details = {k: v for k, v in (c or {}).items() if k in DETAILS}
            if details:
                parts.append(f"<p><b>{stage}</b>: " + "; ".join(f"{e(k)}: {_note(v)}" for k, v in details.items())
                             + "</p>")
        alloc = (r.get("allocation") or {})
        for by, a in alloc.items():
            parts.append(f"<p>allocation by {e(by)} (weight = <code>{e(a['formula'])}</code> of round "
                         f"{r['round'] - 1}'s steering failures): " +
                         ", ".join(f"{e(k)} {v} (failed {a['evidence'][k]['failed']}/{a['evidence'][k]['n']})"
                                   for k, v in a["counts"].items()) + "</p>")
    parts.append("<h2>Samples (report split): base vs latest round</h2>")
    for s in doc["samples"]:
        parts.append(f"<h4>{e(s['key'])}</h4><pre>{e(s['prompt'])}</pre><div class='pair'>"
                     f"<div><b>base</b> ({sum(s['base_followed'])}/{len(s['base_followed'])} followed)"
                     f"<pre>{e(s['base'])}</pre></div><div><b>latest</b> ({sum(s['latest_followed'])}/"
                     f"{len(s['latest_followed'])} followed)<pre>{e(s['latest'])}</pre></div></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write(doc: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """`report.json` (deterministic: no wall times), `timing.json` and `report.html` (which shows both)."""
    from jaxtune.files import write_text_atomic

    out = Path(out_dir)
    timing = {k: v for k, v in doc.items() if k == "timing"}
    paths = write_report({k: v for k, v in doc.items() if k != "timing"}, out, lambda _: render_html(doc))
    write_text_atomic(out / "timing.json", json.dumps(timing, indent=1) + "\n")
    return paths
