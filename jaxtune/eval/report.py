"""Base-vs-tuned evaluation report: `report.json` (stable schema) and a self-contained `report.html`.

The JSON is the record; the HTML (tables plus matplotlib PNGs embedded as base64) is rendered from the JSON
alone, so a report can be re-rendered later without the models. Sections: IFEval figures per metric, group and
instruction type (incl. format adherence and ignored-constraint rate), over-reach (unwarranted refusals and
unrequested formatting on the same prompts), over-rigidity categories, forgetting (now and over training
steps), loss curves from the run's `metrics.jsonl`, and sample generations side by side.

Every rate is a `jaxtune.stats` Estimate dict: value, n, k and its 95% Wilson interval. Every base-vs-tuned
difference is tuned − base in absolute points with a 95% bootstrap interval that resamples prompts (probes for
rigidity) on both sides at once, so the per-prompt pairing is kept.

Bump SCHEMA_VERSION whenever a key of report.json is renamed, removed or changes meaning.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxtune import stats
from jaxtune.data.report import Report
from jaxtune.eval.ifeval_checks import FORMAT_GROUPS, group_of
from jaxtune.eval.overreach import KINDS, score_overreach
from jaxtune.eval.rigidity import CATEGORIES
from jaxtune.jsonl import read_jsonl

SCHEMA_VERSION = 2
HEADLINE_METRICS = ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose", "format_adherence",
                    "ignored_constraint_rate")
REPORT_KEYS = ("schema_version", "jaxtune_version", "created_utc", "models", "settings", "intervals", "ifeval",
               "overreach", "rigidity", "forgetting", "training", "samples")
N_BOOT = 2000
# Per prompt, the flags a headline metric counts; the metric is the pooled rate of these flags over all prompts.
METRIC_FLAGS: dict[str, Callable] = {
    "prompt_strict": lambda r: [r.followed_all_strict],
    "instruction_strict": lambda r: list(r.strict),
    "prompt_loose": lambda r: [r.followed_all_loose],
    "instruction_loose": lambda r: list(r.loose),
    "format_adherence": lambda r: [lo for i, lo in zip(r.instruction_id_list, r.loose) if group_of(i) in FORMAT_GROUPS],
    "ignored_constraint_rate": lambda r: [not lo for lo in r.loose],
}
METRIC_UNITS = {"prompt_strict": "prompts", "instruction_strict": "instructions", "prompt_loose": "prompts",
                "instruction_loose": "instructions", "format_adherence": "format-group instructions",
                "ignored_constraint_rate": "instructions"}
# Which direction is an improvement, for colouring differences whose interval excludes zero (None: neither).
HIGHER_IS_BETTER = {**{m: True for m in HEADLINE_METRICS}, "ignored_constraint_rate": False,
                    "both": True, "format_only": False, "content_only": None, "neither": False}


# -- inputs from a run dir ------------------------------------------------------------------------------------
def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a run's `metrics.jsonl` (each a JSON object with at least `step`)."""
    rows = read_jsonl(path)
    for n, row in rows:
        if not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{n}: each line needs an integer 'step' field")
    return [row for _, row in rows]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def training_curves(rows: Sequence[dict]) -> dict:
    """`{"train": [[step, loss], ...], "eval": [[step, loss], ...]}` from metrics rows.

    Train rows have `loss` and split `train` (or no split); eval rows have split `eval` with `loss`, or an
    `eval_loss` key."""
    train, ev = [], []
    for row in rows:
        split = row.get("split", "train")
        if split == "train" and _finite(row.get("loss")):
            train.append([row["step"], float(row["loss"])])
        if split == "eval" and _finite(row.get("loss")):
            ev.append([row["step"], float(row["loss"])])
        elif _finite(row.get("eval_loss")):
            ev.append([row["step"], float(row["eval_loss"])])
    return {"train": train, "eval": ev}


def read_data_report(run_dir: str | Path) -> dict | None:
    """The run's `data_report.json` (what training dropped and truncated), or None for runs without one."""
    path = Path(run_dir) / "data_report.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); rerun training or delete the file") from None


def forgetting_history(rows: Sequence[dict]) -> list[dict]:
    """One entry per step with the `forgetting/*` values logged there (a later row for a step wins)."""
    by_step: dict[int, dict] = {}
    for row in rows:
        values = {k: float(v) for k, v in row.items() if k.startswith("forgetting/") and _finite(v)}
        if values:
            by_step.setdefault(row["step"], {}).update(values)
    return [{"step": s, **by_step[s]} for s in sorted(by_step)]


def forgetting_sizes(run_dir: str | Path) -> dict | None:
    """What each forgetting figure of a run was measured on, from its recorded baseline: `{"forgetting/<name>":
    {"n": int | None, "of": str}}` (n None where the run records only an upper bound), or None without one."""
    fdir = Path(run_dir) / "forgetting"
    path = fdir / "baseline.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); rerun training or delete the file") from None
    cfg, sources = doc.get("config") or {}, doc.get("sources") or {}

    def count(name: str) -> int | None:
        return len(read_jsonl(fdir / name)) if (fdir / name).is_file() else None

    def windows(source: str, chars) -> str:
        span = f"{chars} characters of {source}" if chars else source
        return f"windows of {cfg.get('seq_len')} tokens (at most {cfg.get('max_windows')}) over {span}"

    if cfg.get("base_text"):
        sizes = {"forgetting/base_ppl": {"n": None, "of": windows(Path(cfg["base_text"]).name, None)}}
    else:
        sizes = {"forgetting/base_ppl": {"n": count("base_samples.jsonl"), "of": "samples the base model wrote "
                                         f"(up to {cfg.get('sample_tokens')} tokens each)"}}
    if sources.get("general_text"):
        sizes["forgetting/general_ppl"] = {"n": None, "of": windows(Path(sources["general_text"]).name,
                                                                      cfg.get("general_chars"))}
    sizes["forgetting/probe_agreement"] = {"n": count("base_probe_outputs.jsonl"),
                                           "of": f"base-task probes ({cfg.get('probe_tokens')} greedy tokens each)"}
    return sizes


# -- the report document --------------------------------------------------------------------------------------
def pooled_rate(flags: Sequence[Sequence[bool]]) -> stats.Estimate:
    """The rate of true flags over every prompt's flags together (an IFEval instruction-level accuracy)."""
    return stats.rate_of(f for prompt_flags in flags for f in prompt_flags)


def paired_fraction_difference(base: Sequence[Sequence[bool]], tuned: Sequence[Sequence[bool]], *,
                               n_boot: int = N_BOOT, seed: int = 0) -> stats.Estimate:
    """Tuned − base paired over prompts: the mean over prompts with any flags of the change in each prompt's
    fraction of true flags (its 0/1 value when it has one flag), with a bootstrap that resamples whole prompts
    on both sides at once. With several flags per prompt this weighs prompts equally, so it can differ a little
    from the difference of the two `pooled_rate`s."""
    if len(base) != len(tuned) or any(len(b) != len(t) for b, t in zip(base, tuned)):
        raise ValueError("paired_fraction_difference: base and tuned need the same prompts with as many flags each")
    pairs = [(b, t) for b, t in zip(base, tuned) if t]
    return stats.paired_difference([sum(b) / len(b) for b, _ in pairs], [sum(t) / len(t) for _, t in pairs],
                                   n_boot=n_boot, seed=seed)


def compare(base: Sequence[Sequence[bool]], tuned: Sequence[Sequence[bool]], *, n_boot: int = N_BOOT,
            seed: int = 0) -> dict:
    """`{"base", "tuned", "difference"}` Estimate dicts of one pooled rate on both sides."""
    return {"base": pooled_rate(base).to_dict(), "tuned": pooled_rate(tuned).to_dict(),
            "difference": paired_fraction_difference(base, tuned, n_boot=n_boot, seed=seed).to_dict()}


def _breakdown(base, tuned, bucket: Callable[[str], str], **boot) -> dict:
    """Per bucket of instruction ids: its instruction count and strict/loose comparisons."""
    out = {}
    for name in sorted({bucket(i) for row in tuned.rows for i in row.instruction_id_list}):
        def pick(row, kind, name=name):
            return [f for i, f in zip(row.instruction_id_list, getattr(row, kind)) if bucket(i) == name]

        entry = {"count": sum(len(pick(row, "strict")) for row in tuned.rows)}
        for kind in ("strict", "loose"):
            entry[kind] = compare([pick(r, kind) for r in base.rows], [pick(r, kind) for r in tuned.rows], **boot)
        out[name] = entry
    return out


def ifeval_section(base, tuned, *, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Compare two `IFEvalResult`s scored on the same prompts: each headline metric, instruction group and
    instruction type as base and tuned rates with their difference."""
    if [(r.prompt, r.instruction_id_list) for r in base.rows] != [(r.prompt, r.instruction_id_list)
                                                                   for r in tuned.rows]:
        raise ValueError("base and tuned IFEval results were scored on different prompts")
    boot = {"n_boot": n_boot, "seed": seed}
    metrics = {name: {"unit": METRIC_UNITS[name],
                      **compare([METRIC_FLAGS[name](r) for r in base.rows], [METRIC_FLAGS[name](r) for r in tuned.rows],
                                **boot)}
               for name in HEADLINE_METRICS}
    return {
        "num_prompts": tuned.num_prompts,
        "num_instructions": tuned.num_instructions,
        "metrics": metrics,
        "by_group": _breakdown(base, tuned, group_of, **boot),
        "by_instruction": _breakdown(base, tuned, lambda i: i, **boot),
    }


def overreach_section(base, tuned, *, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Unwarranted refusals and unrequested formatting (`overreach.score_overreach`) of both models on the
    IFEval prompts, with the paired difference of each rate. A formatting kind counts only on prompts that did
    not ask for it, which are the same prompts on both sides."""
    prompts = [r.prompt for r in tuned.rows]
    scored = {side: score_overreach(prompts, [r.response for r in res.rows])
              for side, res in (("base", base), ("tuned", tuned))}

    def entry(value: Callable[[dict], dict], flags: Callable[[dict], list[bool]]) -> dict:
        return {"base": value(scored["base"]), "tuned": value(scored["tuned"]),
                "difference": paired_fraction_difference([flags(r) for r in scored["base"]["rows"]],
                                                         [flags(r) for r in scored["tuned"]["rows"]],
                                                         n_boot=n_boot, seed=seed).to_dict()}

    formatting = {"any": entry(lambda s: s["formatting"]["any"], lambda r: [bool(r["unrequested"])])}
    for kind in KINDS:
        formatting[kind] = entry(lambda s, k=kind: s["formatting"][k],
                                 lambda r, k=kind: [] if k in r["asked"] else [k in r["unrequested"]])
    return {"num_prompts": len(prompts),
            "refusal": entry(lambda s: s["refusal"], lambda r: [r["refusal"] is not None]),
            "formatting": formatting}


def rigidity_section(base, tuned, *, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Each over-rigidity category as base and tuned fractions of the probes, with the paired difference."""
    if [r.id for r in base.rows] != [r.id for r in tuned.rows]:
        raise ValueError("base and tuned over-rigidity results were scored on different probes")
    return {"probe_set": tuned.probe_set, "loose": tuned.loose, "num_probes": len(tuned.rows),
            "categories": {c: compare([[r.category == c] for r in base.rows], [[r.category == c] for r in tuned.rows],
                                      n_boot=n_boot, seed=seed) for c in CATEGORIES}}


def samples_section(base, tuned, n: int) -> list[dict]:
    out = []
    for b, t in list(zip(base.rows, tuned.rows))[:n]:
        out.append({"key": t.key, "prompt": t.prompt, "instruction_id_list": t.instruction_id_list,
                    "base": {"response": b.response, "followed_loose": b.loose},
                    "tuned": {"response": t.response, "followed_loose": t.loose}})
    return out


def build_report(*, base_ifeval, tuned_ifeval, models: dict, settings: dict, base_rigidity=None,
                 tuned_rigidity=None, forgetting: dict | None = None, metrics_rows: Sequence[dict] | None = None,
                 data_report: dict | None = None, forgetting_sizes: dict | None = None, n_samples: int = 5,
                 n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """The report.json document from scored results (no model needed here).

    `forgetting` is a `ForgettingMonitor.measure` result for the tuned model (or None); `metrics_rows` are the
    run's metrics.jsonl rows and `data_report` its data_report.json (None when no run dir is given); the data
    report goes under `training.data`. `forgetting_sizes` (see `forgetting_sizes`) says what the forgetting
    figures were measured on. `n_boot` and `seed` fix the bootstrap of every difference."""
    from jaxtune.version import __version__

    boot = {"n_boot": n_boot, "seed": seed}
    history = forgetting_history(metrics_rows) if metrics_rows else []
    return {
        "schema_version": SCHEMA_VERSION,
        "jaxtune_version": __version__,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "models": models,
        "settings": settings,
        "intervals": {"level": 0.95, "rates": "wilson",
                      "differences": ("tuned - base, mean over prompts (probes for rigidity) of the change in "
                                      "each one's value: 0/1, or for instruction-level rates the fraction of its "
                                      "instructions followed; paired bootstrap over prompts"),
                      **boot},
        "ifeval": ifeval_section(base_ifeval, tuned_ifeval, **boot),
        "overreach": overreach_section(base_ifeval, tuned_ifeval, **boot),
        "rigidity": rigidity_section(base_rigidity, tuned_rigidity, **boot) if tuned_rigidity is not None else None,
        "forgetting": ({"current": forgetting, "history": history, "sizes": forgetting_sizes}
                       if forgetting is not None or history else None),
        "training": ({**training_curves(metrics_rows or []), **({"data": data_report} if data_report else {})}
                     if metrics_rows or data_report else None),
        "samples": samples_section(base_ifeval, tuned_ifeval, n_samples),
    }


# -- figures --------------------------------------------------------------------------------------------------
def png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _percent_bars(estimates: Sequence[dict]):
    """Heights in % and (below, above) error-bar lengths of Estimate dicts; a rate without data has none."""
    import numpy as np

    def col(key):
        return np.array([np.nan if e.get(key) is None else 100 * e[key] for e in estimates], float)

    value, lo, hi = col("value"), col("lo"), col("hi")
    # Clipped: at a rate of 0 or 1 a Wilson bound can sit a rounding error inside the value.
    return value, np.clip(np.nan_to_num(np.vstack([value - lo, hi - value])), 0, None)


def _bars(labels: list[str], base: list[dict], tuned: list[dict], title: str, horizontal: bool = False):
    """Base and tuned rates side by side, each with its 95% interval as an error bar."""
    import matplotlib.pyplot as plt
    import numpy as np

    pos = np.arange(len(labels))
    w = 0.4
    sides = (("base", base, "#9aa5b1", -w / 2), ("tuned", tuned, "#2f6fbf", w / 2))
    if horizontal:
        fig, ax = plt.subplots(figsize=(8, 0.28 * len(labels) + 1.2))
        for name, estimates, color, shift in sides:
            value, err = _percent_bars(estimates)
            ax.barh(pos + shift, value, w, xerr=err, capsize=2, label=name, color=color, error_kw={"lw": 0.8})
        ax.set_yticks(pos, labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("% (95% interval)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        for name, estimates, color, shift in sides:
            value, err = _percent_bars(estimates)
            ax.bar(pos + shift, value, w, yerr=err, capsize=3, label=name, color=color, error_kw={"lw": 0.8})
        ax.set_xticks(pos, labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("% (95% interval)")
        ax.legend()
    ax.set_title(title)
    return png(fig)


def figures(report: dict) -> dict[str, bytes]:
    """PNG bytes per figure name, drawn from the report document only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    ev = report["ifeval"]
    m = ev["metrics"]
    figs["ifeval_metrics"] = _bars(list(m), [v["base"] for v in m.values()], [v["tuned"] for v in m.values()],
                                   f"IFEval: base vs tuned ({ev['num_prompts']} prompts)")
    inst = ev["by_instruction"]
    if inst:
        figs["ifeval_by_instruction"] = _bars(
            [f"{k} (n={v['count']})" for k, v in inst.items()], [v["loose"]["base"] for v in inst.values()],
            [v["loose"]["tuned"] for v in inst.values()], "loose accuracy per instruction type", horizontal=True)
    rig = report.get("rigidity")
    if rig:
        cats = rig["categories"]
        figs["rigidity"] = _bars(list(cats), [v["base"] for v in cats.values()], [v["tuned"] for v in cats.values()],
                                 f"over-rigidity probes ({rig['num_probes']})")
    curves = report.get("training")
    if curves and (curves["train"] or curves["eval"]):
        fig, ax = plt.subplots(figsize=(8, 3.6))
        for name, pts, style in (("train", curves["train"], "-"), ("eval", curves["eval"], "o-")):
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{name} loss", markersize=4)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("loss curves")
        ax.legend()
        figs["loss_curves"] = png(fig)
    forgetting = report.get("forgetting") or {}
    history = forgetting.get("history") or []
    names = sorted({k for h in history for k in h if k.endswith("_rel")})
    if names:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        for name in names:
            pts = [(h["step"], 100 * h[name]) for h in history if name in h]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name.removeprefix("forgetting/"),
                    markersize=4)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xlabel("step")
        ax.set_ylabel("change vs base (%)")
        ax.set_title("forgetting over training")
        ax.legend()
        figs["forgetting"] = png(fig)
    return figs


# -- HTML -----------------------------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}.good{color:#1a7f37}.bad{color:#c62828}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:1em}pre{white-space:pre-wrap;background:#f6f8fa;
padding:.6em;font-size:.85em}img{max-width:100%}.note{color:#555;font-size:.9em}.est{white-space:nowrap}"""
# Below this many prompts a percentile bootstrap interval is too unreliable to call a difference by colour.
MIN_N_TO_CALL = 10


def _est(text: str) -> str:
    return f"<span class='est'>{html.escape(text)}</span>"


def _delta(e: dict | None, higher_is_better: bool | None = True) -> str:
    """A difference in points, coloured good or bad only when its interval excludes zero over enough prompts."""
    text = _est(stats.fmt_points(e))
    if (e is None or e["value"] is None or higher_is_better is None or e["n"] < MIN_N_TO_CALL
            or e["lo"] <= 0 <= e["hi"]):
        return text
    cls = "good" if (e["value"] > 0) == higher_is_better else "bad"
    return f'<span class="{cls}">{text}</span>'


def _signed(v, lower_is_better: bool = False) -> str:
    if v is None:
        return "n/a"
    cls = "good" if (v > 0) != lower_is_better else "bad"
    return f'<span class="{cls}">{100 * v:+.2f}</span>' if v else "0.00"


def _comparison_rows(entries: dict, higher_is_better: Callable[[str], bool | None], label=html.escape) -> list:
    return [[label(name), _est(stats.fmt_rate(v["base"])), _est(stats.fmt_rate(v["tuned"])),
             _delta(v["difference"], higher_is_better(name))] for name, v in entries.items()]


COMPARISON_HEADER = ["", "base", "tuned", "Δ tuned − base"]


def _describe(model) -> str:
    if not isinstance(model, dict):
        return html.escape(str(model))
    return ", ".join(f"{html.escape(k)} <code>{html.escape(str(v))}</code>" for k, v in model.items() if v)


def img_tag(figs: dict, name: str) -> str:
    if name not in figs:
        return ""
    data = base64.b64encode(figs[name]).decode("ascii")
    return f'<img alt="{name}" src="data:image/png;base64,{data}">'


def table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _breakdown_html(entries: dict, first: str) -> str:
    rows = []
    for name, v in entries.items():
        for kind in ("loose", "strict"):
            # An instruction id may break after its group ("detectable_format:<wbr>title") to keep the table narrow.
            label = html.escape(name).replace(":", ":<wbr>") if kind == "loose" else ""
            rows.append([label, kind, _est(stats.fmt_rate(v[kind]["base"])), _est(stats.fmt_rate(v[kind]["tuned"])),
                         _delta(v[kind]["difference"])])
    return table([first, "check"] + COMPARISON_HEADER[1:], rows)


def _forgetting_html(forgetting: dict, figs: dict) -> list[str]:
    e = html.escape
    parts = ["<h2>Forgetting</h2>"]
    current = forgetting.get("current") or {}
    sizes = forgetting.get("sizes") or {}
    names = [k for k in current if not k.endswith("_rel")]

    def measured_on(k):
        s = sizes.get(k)
        if not s:
            return "not recorded"
        return e(f"{s['n']} {s['of']}" if s.get("n") is not None else s["of"])

    if names:
        parts.append(table(["metric", "tuned", "change vs base %", "measured on"],
                           [[e(k.removeprefix("forgetting/")), f"{current[k]:.4g}",
                             _signed(current.get(k + "_rel"), lower_is_better="ppl" in k), measured_on(k)]
                            for k in names]))
    elif sizes:
        parts.append(table(["metric", "measured on"],
                           [[e(k.removeprefix("forgetting/")), measured_on(k)] for k in sizes]))
    parts.append("<p class='note'>Forgetting figures are single measurements taken during or after the run, "
                 "without intervals; the perplexity change is tuned / base − 1.</p>")
    parts.append(img_tag(figs, "forgetting"))
    return parts


def render_html(report: dict, figs: dict[str, bytes] | None = None) -> str:
    """One HTML page, no external resources (figures are data: URIs)."""
    figs = figures(report) if figs is None else figs
    e = html.escape
    ev = report["ifeval"]
    models = report["models"]
    boot = report["intervals"]
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>jaxtune report</title>"
              f"<style>{CSS}</style></head><body>"),
             "<h1>Base vs tuned</h1>",
             (f"<p>tuned: {_describe(models.get('tuned'))}<br>base: {_describe(models.get('base'))}"
              f"<br>{ev['num_prompts']} IFEval prompts, {ev['num_instructions']} instructions; "
              f"created {e(report['created_utc'])}, schema v{report['schema_version']}</p>"),
             (f"<p class='note'>Rates: value [95% Wilson interval] n = how many it counts. Δ: tuned − base in "
              f"absolute percentage points (pts), n = prompts, with a 95% bootstrap interval that resamples prompts "
              f"and keeps both models' answers to each prompt together ({boot['n_boot']} resamples, seed "
              f"{boot['seed']}); coloured only when the interval excludes 0 and n ≥ {MIN_N_TO_CALL}. For "
              f"instruction-level rates Δ is the mean over prompts of the change in each prompt's fraction of "
              f"instructions followed, which weighs prompts equally and so can differ a little from the "
              f"difference of the two rates.</p>"),
             "<h2>Instruction following (IFEval)</h2>"]
    parts.append(table(["metric"] + COMPARISON_HEADER[1:],
                       _comparison_rows(ev["metrics"], HIGHER_IS_BETTER.get,
                                        label=lambda n: f"{e(n)} <span class='note'>(of {ev['metrics'][n]['unit']})"
                                                        "</span>")))
    parts.append(img_tag(figs, "ifeval_metrics"))
    parts.append("<h3>Per instruction group</h3>")
    parts.append(_breakdown_html(ev["by_group"], "group"))
    parts.append("<h3>Per instruction type</h3>")
    parts.append(img_tag(figs, "ifeval_by_instruction"))
    parts.append(_breakdown_html(ev["by_instruction"], "instruction"))
    over = report["overreach"]
    parts.append(f"<h2>Over-reach (the same {over['num_prompts']} prompts)</h2>")
    parts.append("<p class='note'>Unwarranted refusals are over all prompts (each is a harmless request). "
                 "Unrequested formatting of a kind is over the prompts that did not ask for that kind; "
                 "<i>any</i> is a response with at least one unrequested kind.</p>")
    rows = _comparison_rows({"unwarranted refusals": over["refusal"]}, lambda _: False)
    rows += _comparison_rows({f"unrequested formatting: {k}": v for k, v in over["formatting"].items()},
                             lambda _: False)
    parts.append(table(["measure"] + COMPARISON_HEADER[1:], rows))
    rig = report.get("rigidity")
    if rig:
        parts.append(f"<h2>Over-rigidity ({e(rig['probe_set'])}, {rig['num_probes']} probes)</h2>")
        parts.append("<p class='note'>Each probe asks for a format and a content that conflict; its response "
                     "satisfies both, only the format, only the content, or neither. Δ is paired over probes.</p>")
        parts.append(table(["category"] + COMPARISON_HEADER[1:],
                           _comparison_rows(rig["categories"], HIGHER_IS_BETTER.get)))
        parts.append(img_tag(figs, "rigidity"))
    forgetting = report.get("forgetting")
    if forgetting:
        parts.extend(_forgetting_html(forgetting, figs))
    if report.get("training"):
        parts.append("<h2>Training</h2>" + img_tag(figs, "loss_curves"))
        if report["training"].get("data"):
            parts.append("<h3>Data (what training dropped and truncated)</h3>"
                         f"<pre>{e(Report.from_dict(report['training']['data']).summary())}</pre>")
    parts.append("<h2>Sample generations</h2>")
    for s in report["samples"]:
        parts.append(f"<h4>{e(str(s['key']))}: {e(', '.join(s['instruction_id_list']))}</h4>"
                     f"<pre>{e(s['prompt'])}</pre><div class='pair'>")
        for side in ("base", "tuned"):
            ok = sum(s[side]["followed_loose"])
            parts.append(f"<div><b>{side}</b> ({ok}/{len(s[side]['followed_loose'])} followed, loose)"
                         f"<pre>{e(s[side]['response'])}</pre></div>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: dict, out_dir: str | Path, render=None) -> tuple[Path, Path]:
    """`report.json` and `report.html` (from `render`, default this module's `render_html`) in `out_dir`,
    each written atomically; returns both paths."""
    from jaxtune.files import write_text_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_text_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    html_path = write_text_atomic(out / "report.html", (render or render_html)(report))
    return json_path, html_path
