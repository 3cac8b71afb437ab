"""Base-vs-tuned evaluation report: `report.json` (stable schema) and a self-contained `report.html`.

The JSON is the record; the HTML (tables plus matplotlib PNGs embedded as base64) is rendered from the JSON
alone, so a report can be re-rendered later without the models. Sections: IFEval figures per metric, group and
instruction type (incl. format adherence and ignored-constraint rate, with the relative changes tuning claims
are stated in), over-rigidity categories, forgetting (now and over training steps), loss curves from the run's
`metrics.jsonl`, and sample generations side by side.

Bump SCHEMA_VERSION whenever a key of report.json is renamed, removed or changes meaning.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
from pathlib import Path
from typing import Sequence

from jaxtune.data.report import Report
from jaxtune.jsonl import read_jsonl

SCHEMA_VERSION = 1
HEADLINE_METRICS = ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose", "format_adherence",
                    "ignored_constraint_rate")
REPORT_KEYS = ("schema_version", "jaxtune_version", "created_utc", "models", "settings", "ifeval", "rigidity",
               "forgetting", "training", "samples")


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


# -- the report document --------------------------------------------------------------------------------------
def _pair_table(base: dict, tuned: dict) -> dict:
    out = {}
    for name in sorted(set(base) | set(tuned)):
        b, t = base.get(name, {}), tuned.get(name, {})
        out[name] = {"count": b.get("count", t.get("count", 0)),
                     "base_strict": b.get("strict"), "tuned_strict": t.get("strict"),
                     "base_loose": b.get("loose"), "tuned_loose": t.get("loose")}
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def ifeval_section(base, tuned) -> dict:
    """Compare two `IFEvalResult`s scored on the same prompts."""
    if [r.prompt for r in base.rows] != [r.prompt for r in tuned.rows]:
        raise ValueError("base and tuned IFEval results were scored on different prompts")
    metrics = {}
    for name in HEADLINE_METRICS:
        b, t = getattr(base, name), getattr(tuned, name)
        metrics[name] = {"base": b, "tuned": t, "delta": None if b is None or t is None else t - b}
    fa, icr = metrics["format_adherence"], metrics["ignored_constraint_rate"]
    return {
        "num_prompts": tuned.num_prompts,
        "num_instructions": tuned.num_instructions,
        "metrics": metrics,
        # The practice states these claims as relative changes: "+35-50% format adherence", "41% fewer ignored constraints".
        "relative": {"format_adherence_change": _ratio(fa["delta"], fa["base"]),
                     "ignored_constraints_reduction": _ratio(None if icr["delta"] is None else -icr["delta"],
                                                             icr["base"])},
        "by_group": _pair_table(base.by_group, tuned.by_group),
        "by_instruction": _pair_table(base.by_instruction, tuned.by_instruction),
    }


def rigidity_section(base, tuned) -> dict:
    return {"probe_set": tuned.probe_set, "loose": tuned.loose, "num_probes": len(tuned.rows),
            "counts": {"base": base.counts, "tuned": tuned.counts},
            "fractions": {"base": base.fractions, "tuned": tuned.fractions}}


def samples_section(base, tuned, n: int) -> list[dict]:
    out = []
    for b, t in list(zip(base.rows, tuned.rows))[:n]:
        out.append({"key": t.key, "prompt": t.prompt, "instruction_id_list": t.instruction_id_list,
                    "base": {"response": b.response, "followed_loose": b.loose},
                    "tuned": {"response": t.response, "followed_loose": t.loose}})
    return out


def build_report(*, base_ifeval, tuned_ifeval, models: dict, settings: dict, base_rigidity=None,
                 tuned_rigidity=None, forgetting: dict | None = None, metrics_rows: Sequence[dict] | None = None,
                 data_report: dict | None = None, n_samples: int = 5) -> dict:
    """The report.json document from scored results (no model needed here).

    `forgetting` is a `ForgettingMonitor.measure` result for the tuned model (or None); `metrics_rows` are the
    run's metrics.jsonl rows and `data_report` its data_report.json (None when no run dir is given); the data
    report goes under `training.data`."""
    from jaxtune.version import __version__

    history = forgetting_history(metrics_rows) if metrics_rows else []
    return {
        "schema_version": SCHEMA_VERSION,
        "jaxtune_version": __version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "models": models,
        "settings": settings,
        "ifeval": ifeval_section(base_ifeval, tuned_ifeval),
        "rigidity": rigidity_section(base_rigidity, tuned_rigidity) if tuned_rigidity is not None else None,
        "forgetting": ({"current": forgetting, "history": history} if forgetting is not None or history else None),
        "training": ({**training_curves(metrics_rows or []), **({"data": data_report} if data_report else {})}
                     if metrics_rows or data_report else None),
        "samples": samples_section(base_ifeval, tuned_ifeval, n_samples),
    }


# -- figures --------------------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _bars(labels: list[str], base: list, tuned: list, title: str, horizontal: bool = False):
    import matplotlib.pyplot as plt
    import numpy as np

    vals = [np.array([np.nan if v is None else 100 * v for v in xs], float) for xs in (base, tuned)]
    pos = np.arange(len(labels))
    w = 0.4
    if horizontal:
        fig, ax = plt.subplots(figsize=(8, 0.28 * len(labels) + 1.2))
        ax.barh(pos - w / 2, vals[0], w, label="base", color="#9aa5b1")
        ax.barh(pos + w / 2, vals[1], w, label="tuned", color="#2f6fbf")
        ax.set_yticks(pos, labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("%")
    else:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        ax.bar(pos - w / 2, vals[0], w, label="base", color="#9aa5b1")
        ax.bar(pos + w / 2, vals[1], w, label="tuned", color="#2f6fbf")
        ax.set_xticks(pos, labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("%")
    ax.set_title(title)
    ax.legend()
    return _png(fig)


def figures(report: dict) -> dict[str, bytes]:
    """PNG bytes per figure name, drawn from the report document only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    ev = report["ifeval"]
    m = ev["metrics"]
    figs["ifeval_metrics"] = _bars(list(m), [v["base"] for v in m.values()], [v["tuned"] for v in m.values()],
                                   "IFEval: base vs tuned")
    inst = ev["by_instruction"]
    if inst:
        figs["ifeval_by_instruction"] = _bars(
            [f"{k} (n={v['count']})" for k, v in inst.items()], [v["base_loose"] for v in inst.values()],
            [v["tuned_loose"] for v in inst.values()], "loose accuracy per instruction type", horizontal=True)
    rig = report.get("rigidity")
    if rig:
        cats = list(rig["fractions"]["tuned"])
        figs["rigidity"] = _bars(cats, [rig["fractions"]["base"][c] for c in cats],
                                 [rig["fractions"]["tuned"][c] for c in cats], "over-rigidity probes")
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
        figs["loss_curves"] = _png(fig)
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
        figs["forgetting"] = _png(fig)
    return figs


# -- HTML -----------------------------------------------------------------------------------------------------
_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}.good{color:#1a7f37}.bad{color:#c62828}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:1em}pre{white-space:pre-wrap;background:#f6f8fa;
padding:.6em;font-size:.85em}img{max-width:100%}"""


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _signed(v, lower_is_better: bool = False) -> str:
    if v is None:
        return "n/a"
    cls = "good" if (v > 0) != lower_is_better else "bad"
    return f'<span class="{cls}">{100 * v:+.2f}</span>' if v else "0.00"


def _describe(model) -> str:
    if not isinstance(model, dict):
        return html.escape(str(model))
    return ", ".join(f"{html.escape(k)} <code>{html.escape(str(v))}</code>" for k, v in model.items() if v)


def _img(figs: dict, name: str) -> str:
    if name not in figs:
        return ""
    data = base64.b64encode(figs[name]).decode("ascii")
    return f'<img alt="{name}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: dict, figs: dict[str, bytes] | None = None) -> str:
    """One HTML page, no external resources (figures are data: URIs)."""
    figs = figures(report) if figs is None else figs
    e = html.escape
    ev = report["ifeval"]
    models = report["models"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>jaxtune report</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>Base vs tuned</h1>",
             f"<p>tuned: {_describe(models.get('tuned'))}<br>base: {_describe(models.get('base'))}"
             f"<br>{ev['num_prompts']} IFEval prompts, {ev['num_instructions']} instructions; "
             f"created {e(report['created_utc'])}, schema v{report['schema_version']}</p>",
             "<h2>Instruction following (IFEval)</h2>"]
    rows = [[name, pct(v["base"]), pct(v["tuned"]),
             _signed(v["delta"], lower_is_better=name == "ignored_constraint_rate")]
            for name, v in ev["metrics"].items()]
    parts.append(_table(["metric", "base %", "tuned %", "Δ points"], rows))
    rel = ev["relative"]
    parts.append(f"<p>format adherence relative change: {_signed(rel['format_adherence_change'])} %; "
                 f"ignored constraints relative reduction: {_signed(rel['ignored_constraints_reduction'])} %</p>")
    parts.append(_img(figs, "ifeval_metrics"))
    parts.append("<h3>Per instruction group</h3>")
    parts.append(_table(["group", "n", "base loose %", "tuned loose %", "base strict %", "tuned strict %"],
                        [[e(k), str(v["count"]), pct(v["base_loose"]), pct(v["tuned_loose"]),
                          pct(v["base_strict"]), pct(v["tuned_strict"])] for k, v in ev["by_group"].items()]))
    parts.append("<h3>Per instruction type</h3>")
    parts.append(_img(figs, "ifeval_by_instruction"))
    rig = report.get("rigidity")
    if rig:
        parts.append(f"<h2>Over-rigidity ({e(rig['probe_set'])}, {rig['num_probes']} probes)</h2>")
        parts.append(_table(["category", "base", "tuned"],
                            [[c, str(rig["counts"]["base"][c]), str(rig["counts"]["tuned"][c])]
                             for c in rig["counts"]["tuned"]]))
        parts.append(_img(figs, "rigidity"))
    forgetting = report.get("forgetting")
    if forgetting:
        parts.append("<h2>Forgetting</h2>")
        current = forgetting.get("current") or {}
        names = [k for k in current if not k.endswith("_rel")]
        if names:
            parts.append(_table(["metric", "tuned", "change vs base %"],
                                [[e(k.removeprefix("forgetting/")), f"{current[k]:.4g}",
                                  _signed(current.get(k + "_rel"), lower_is_better="ppl" in k)] for k in names]))
        parts.append(_img(figs, "forgetting"))
    if report.get("training"):
        parts.append("<h2>Training</h2>" + _img(figs, "loss_curves"))
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


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """`report.json` and `report.html` in `out_dir`; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "report.json", out / "report.html"
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    html_path.write_text(render_html(report), encoding="utf-8")
    return json_path, html_path
