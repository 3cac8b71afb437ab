"""From the study's run dirs to results.json, results.md and the plots.

Every figure is computed from per-item values that all arms share (the same eval prompts, the same held-out
stories, the same documents, in the same order). An arm's level is `stats.clustered_mean` over its seeds; a
change (arm minus base, arm minus arm) is `stats.clustered_paired_difference` over the seeds both have: seeds
and then items are resampled, so seed-to-seed variation is part of every interval. Perplexity rises come from
differences of mean NLL per item: a rise of exp(d) - 1, its interval the same transform of d's.
Each figure names the runs it comes from; `runs` holds each run dir and the sha256 of its result.json.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from jaxtune.pipeline.manifest import file_sha256

SCHEMA = 1
HIGHER = {"satisfied": True, "followed": True, "format": True, "ignored": False, "finished": True,
          "unasked_end": False, "unasked_formatting": False, "agreement": True, "kl": False, "story_nll": False,
          "unseen_nll": False, "tokens": None}
LABELS = {
    "satisfied": "constraint satisfaction (all of a prompt's, strict)",
    "followed": "constraints followed (each, strict)",
    "format": "format adherence (loose, IFEval's format groups)",
    "ignored": "ignored-constraint rate (loose)",
    "finished": "finished stories (ended on BOS)",
    "unasked_end": "trained end phrase where none was asked (rigidity)",
    "unasked_formatting": "unrequested formatting (lists, headers, JSON...)",
    "story_nll": "perplexity rise on held-out base-model stories",
    "kl": "KL(base ‖ tuned) per token on held-out base-model stories",
    "agreement": "greedy agreement with the base (plain story prompts)",
    "unseen_nll": "perplexity rise on unseen text (Alpaca-GPT-4 responses)",
    "tokens": "response length (tokens)",
}
SHORT = {"satisfied": "constraint satisfaction (%)", "followed": "constraints followed (%)",
         "format": "format adherence (%)", "ignored": "ignored constraints (%)",
         "unasked_end": "end phrase when unasked (%)", "story_nll": "base-story perplexity rise (%)",
         "kl": "KL(base ‖ tuned) per token", "agreement": "greedy agreement (%)",
         "unseen_nll": "unseen-text perplexity rise (%)"}
RISES = ("story_nll", "unseen_nll")
FORGETTING = ("story_nll", "kl", "agreement", "unseen_nll")
QUALITY = ("satisfied", "followed", "format", "ignored", "finished", "unasked_end")
KIND_PREFIX = "followed:"


def higher(metric: str) -> bool | None:
    """Whether a rise in `metric` is an improvement (per-constraint rates are like `followed`)."""
    return HIGHER["followed" if metric.startswith(KIND_PREFIX) else metric]


def _load(jobs: list[dict], base_dir: str) -> tuple[dict, dict, dict]:
    """{arm: {seed: items}}, the base's items, and the runs table (name -> dir, sha256, arm, seed)."""
    arms, runs = {}, {}
    base = json.loads((Path(base_dir) / "result.json").read_text())
    runs["base"] = {"dir": Path(base_dir).name, "sha256": file_sha256(Path(base_dir) / "result.json"), "arm": "base",
                    "seed": None}
    for j in jobs:
        if "rerun" in j["name"]:
            continue
        path = Path(j["dir"]) / "result.json"
        doc = json.loads(path.read_text())
        arm, seed = j["name"].split("/s")[0], j["seed"]
        arms.setdefault(arm, {})[seed] = doc
        runs[j["name"]] = {"dir": f"{Path(j['dir']).parent.name}/{Path(j['dir']).name}", "sha256": file_sha256(path),
                           "arm": arm, "seed": seed}
    return arms, base, runs


def _transform(est: dict, metric: str) -> dict:
    """A difference of mean NLL as a perplexity rise (exp(d) - 1); other metrics as they are."""
    if metric not in RISES:
        return est
    return {**est, **{k: (None if est[k] is None else math.expm1(est[k])) for k in ("value", "lo", "hi")}}


class Study:
    def __init__(self, grid, arms, base, runs, n_boot):
        self.grid, self.arms, self.base, self.runs, self.n_boot = grid, arms, base, runs, n_boot
        self.figures = []

    def seeds(self, arm: str, new_seed: int | None = None) -> list[int]:
        return sorted(s for s in self.arms.get(arm, {}) if s != new_seed)

    def items(self, arm: str, metric: str, seeds: list[int]) -> list[list[float]]:
        if arm == "base":
            return [self.base["items"][metric]] * len(seeds)
        return [self.arms[arm][s]["items"][metric] for s in seeds]

    def _runs(self, arm: str, seeds: list[int]) -> list[str]:
        return ["base"] if arm == "base" else [f"{arm}/s{s}" for s in seeds]

    def figure(self, fid: str, claim: str, metric: str, arm: str, est: dict, runs: list[str], **extra) -> dict:
        fig = {"id": fid, "claim": claim, "metric": metric, "arm": arm, **est, "runs": runs, **extra}
        self.figures.append(fig)
        return fig

    def level(self, claim: str, arm: str, metric: str, seeds: list[int]) -> dict:
        from jaxtune import stats

        if metric in RISES or metric == "kl" and arm != "base":
            return self.change(claim, "base", arm, metric, seeds)
        est = stats.clustered_mean(self.items(arm, metric, seeds), n_boot=self.n_boot).to_dict()
        return self.figure(f"{claim}/{arm}/{metric}", claim, metric, arm, est, self._runs(arm, seeds))

    def change(self, claim: str, ref: str, arm: str, metric: str, seeds: list[int]) -> dict:
        """`arm` minus `ref` over the seeds both ran (the base is one deterministic model: every seed's)."""
        from jaxtune import stats

        if metric == "kl" and ref == "base":
            est = stats.clustered_mean(self.items(arm, metric, seeds), n_boot=self.n_boot).to_dict()
        else:
            est = stats.clustered_paired_difference(self.items(ref, metric, seeds), self.items(arm, metric, seeds),
                                                    n_boot=self.n_boot).to_dict()
            est = _transform(est, metric)
        runs = self._runs(ref, seeds) + self._runs(arm, seeds)
        return self.figure(f"{claim}/{arm}-minus-{ref}/{metric}", claim, metric, arm, est, runs, ref=ref)


def _common(study: Study, arms: list[str], new_seed: int | None) -> list[int]:
    sets = [set(study.seeds(a, new_seed)) for a in arms if a != "base"]
    return sorted(set.intersection(*sets)) if sets else []


def _verdict(est: dict, higher_better: bool | None) -> str:
    """'held' when the interval lies on the claimed side of zero, 'not shown' when it straddles, 'reversed'
    when it lies on the other side."""
    if est["lo"] is None:
        return "no data"
    good = (est["lo"] > 0) if higher_better else (est["hi"] < 0)
    bad = (est["hi"] < 0) if higher_better else (est["lo"] > 0)
    return "held" if good else "reversed" if bad else "not shown"


def analyse(*, grid: dict, data: dict, base_dir: str, jobs: list[dict], checks: dict, memory: list | None,
            study_dir: Path, seconds: float) -> dict:

    arms, base, runs = _load(jobs, base_dir)
    pools = [json.loads((Path(d) / "result.json").read_text())["seconds"]
             for d in sorted(Path(data["dir"]).parent.glob("pool-*")) if (Path(d) / "result.json").is_file()]
    run_seconds = {"pool": sum(pools), "base": base["seconds"],
                   "arms": sum(doc["seconds"] for a in arms.values() for doc in a.values())}
    study = Study(grid, arms, base, runs, grid["evaluate"]["n_boot"])
    new_seed = checks.get("new_seed")
    names = list(grid["arms"])
    kinds = sorted(k for k in base["items"] if k.startswith(KIND_PREFIX))
    out = {"schema": SCHEMA, "quick": grid["quick"], "seconds": round(seconds, 1), "grid": grid, "arms": names,
           "data": {k: v for k, v in data.items() if k != "dir"}, "claims": {}, "runs": runs,
           "run_seconds": run_seconds}

    # Levels of every arm and the base, on every metric (the tables' cells).
    levels = {}
    for arm in ["base", *names]:
        seeds = [0] if arm == "base" else study.seeds(arm, new_seed)
        levels[arm] = {m: study.level("levels", arm, m, seeds) for m in (*QUALITY, *kinds, "tokens",
                                                                           "unasked_formatting", *FORGETTING)
                       if not (arm == "base" and m in (*RISES, "kl"))}
    out["levels"] = {a: {m: f["id"] for m, f in v.items()} for a, v in levels.items()}

    # Claims 2 and 5: every arm against the base.
    c25 = {}
    for arm in names:
        seeds = study.seeds(arm, new_seed)
        c25[arm] = {m: study.change("2+5", "base", arm, m, seeds)
                    for m in ("format", "ignored", "satisfied", "followed", "finished", *kinds,
                              "unasked_end", "unasked_formatting")}
    out["claims"]["2+5"] = {"changes": {a: {m: f["id"] for m, f in v.items()} for a, v in c25.items()},
                            "verdicts": {a: {m: _verdict(f, higher(m)) for m, f in v.items()}
                                         for a, v in c25.items()}}

    # Claim 1: self vs foreign vs mix, on each forgetting measure.
    if {"self", "foreign"} <= set(names):
        contrasts = {}
        for other in [a for a in ("foreign", "mix") if a in names]:
            seeds = _common(study, ["self", other], new_seed)
            contrasts[other] = {m: study.change("1", "self", other, m, seeds) for m in FORGETTING}
        reduction = {}
        for m in RISES + ("kl",):
            s, f = levels["self"][m]["value"], levels["foreign"][m]["value"]
            reduction[m] = None if not f else 1 - s / f
        out["claims"]["1"] = {
            "contrasts": {o: {m: f["id"] for m, f in v.items()} for o, v in contrasts.items()},
            "verdicts": {o: {m: _verdict(f, not higher(m)) for m, f in v.items()} for o, v in contrasts.items()},
            "relative_reduction": reduction}

    # Claim 3: curated vs each noisy set, at equal steps and at equal epochs.
    noisy = [a for a in names if grid["arms"][a]["data"].startswith("noisy-")]
    if "self" in names and noisy:
        c3 = {}
        for arm in noisy:
            seeds = _common(study, ["self", arm], new_seed)
            c3[arm] = {m: study.change("3", arm, "self", m, seeds) for m in (*QUALITY, *FORGETTING)}
        out["claims"]["3"] = {"contrasts": {a: {m: f["id"] for m, f in v.items()} for a, v in c3.items()},
                              "verdicts": {a: {m: _verdict(f, higher(m)) for m, f in v.items()}
                                           for a, v in c3.items()},
                              "steps": {a: _steps(arms, a) for a in ["self", *noisy]}}

    # Claim 4: ranks and full fine-tuning on the tiny model; memory on real shapes.
    variants = [a for a in names if a == "self" or a.startswith("rank-") or a == "full"]
    if len(variants) > 1:
        c4 = {}
        for arm in variants:
            if arm == "self":
                continue
            seeds = _common(study, ["self", arm], new_seed)
            c4[arm] = {m: study.change("4", "self", arm, m, seeds) for m in ("satisfied", "followed", *FORGETTING)}
        out["claims"]["4"] = {"contrasts": {a: {m: f["id"] for m, f in v.items()} for a, v in c4.items()},
                              "trainable": {a: _trainable(arms, a) for a in variants}}
    if memory is not None:
        out["memory"] = memory

    # Reproducibility: a same-seed rerun, and a seed the report did not use against the prediction interval.
    out["checks"] = _checks(study, checks, new_seed)
    out["figures"] = study.figures
    out["claims"]["summary"] = _summary(out, {f["id"]: f for f in study.figures})
    return out


def _steps(arms: dict, arm: str) -> dict:
    docs = list(arms.get(arm, {}).values())
    return {"steps": docs[0]["train"]["steps"] if docs else None}


def _trainable(arms: dict, arm: str) -> dict:
    docs = list(arms.get(arm, {}).values())
    n = docs[0]["train"]["trainable"] if docs else None
    return {"trainable": n, "fraction": None if n is None else n / 260032}


def _checks(study: Study, checks: dict, new_seed: int | None) -> dict:
    from jaxtune import stats

    if not checks:
        return {}
    arm = checks["arm"]
    rerun = json.loads((Path(checks["rerun"]) / "result.json").read_text())
    first = study.arms[arm][0]
    same = rerun["items"] == first["items"] and rerun["train"]["merged_sha256"] == first["train"]["merged_sha256"]
    seeds = study.seeds(arm, new_seed)
    inside = {}
    for m in ("satisfied", "followed", "format", "ignored", "story_nll", "kl", "agreement", "unseen_nll"):
        values = [sum(study.arms[arm][s]["items"][m]) / len(study.arms[arm][s]["items"][m]) for s in seeds]
        lo, hi = stats.prediction_interval(values)
        new = study.arms[arm].get(new_seed)
        v = None if new is None else sum(new["items"][m]) / len(new["items"][m])
        inside[m] = {"seed_values": values, "interval": [lo, hi], "new_seed": new_seed, "new_value": v,
                     "inside": None if v is None else bool(lo <= v <= hi)}
    differ = {m: len({json.dumps(study.arms[arm][s]["items"][m]) for s in seeds}) == len(seeds)
              for m in ("satisfied", "story_nll", "kl")}
    return {"arm": arm, "rerun": {"dir": Path(checks["rerun"]).name, "identical": same,
                                  "merged_sha256": rerun["train"]["merged_sha256"]},
            "prediction": inside, "seeds_differ": differ}


def _summary(out: dict, figs: dict) -> dict:
    """One sentence per claim from the figures: what held, what did not."""
    s = {}
    c1 = out["claims"].get("1")
    if c1:
        v = c1["verdicts"].get("foreign", {})
        held = [m for m, x in v.items() if x == "held"]
        s["1"] = (f"Foreign responses forgot more than self-distilled ones on {len(held)} of {len(v)} measures "
                  f"(interval of foreign minus self on the forgetting side of zero: {', '.join(held) or 'none'}).")
    c3 = out["claims"].get("3")
    if c3:
        parts = []
        for arm, v in c3["verdicts"].items():
            parts.append(f"{arm}: curated better on {sum(x == 'held' for x in v.values())}, worse on "
                         f"{sum(x == 'reversed' for x in v.values())} of {len(v)} measures")
        s["3"] = "; ".join(parts) + "."
    c25 = out["claims"].get("2+5")
    if c25:
        fa = {a: v["format"] for a, v in c25["verdicts"].items()}
        ig = {a: v["ignored"] for a, v in c25["verdicts"].items()}
        rg = {a: v["unasked_end"] for a, v in c25["verdicts"].items()}
        s["2"] = (f"Format adherence rose (interval above zero) in {sum(x == 'held' for x in fa.values())} of "
                  f"{len(fa)} arms; the ignored-constraint rate fell in {sum(x == 'held' for x in ig.values())} "
                  f"of {len(ig)}.")
        s["5"] = (f"A trained end phrase appeared more often where none was asked in "
                  f"{sum(x == 'reversed' for x in rg.values())} of {len(rg)} arms (rigidity).")
    rows = {(r["model"], r["method"], r["target"]): r for r in out.get("memory") or []}
    parts = []
    for model in dict.fromkeys(m for m, _, _ in rows):
        lora, qlora, full = (rows.get((model, m, "cpu")) for m in ("lora", "qlora", "full"))
        if lora and full and qlora and lora.get("peak_gib") and full.get("peak_gib"):
            parts.append(f"{model}: LoRA trains {lora['trainable_pct']:.2g}% of the parameters; one device's "
                         f"compiled peak {full['peak_gib']:.1f} GiB (full) → {lora['peak_gib']:.1f} GiB (LoRA), "
                         f"{qlora['peak_gib']:.1f} GiB (QLoRA)")
    if parts:
        s["4"] = "; ".join(parts) + " (XLA:CPU estimates)."
    return s


# --------------------------------------------------------------------------------------------- rendering

def _pct(f: dict, points: bool = False) -> str:
    if f.get("value") is None:
        return "n/a"
    if points:
        return f"{100 * f['value']:+.1f} pts [{100 * f['lo']:+.1f}, {100 * f['hi']:+.1f}]"
    return f"{100 * f['value']:.1f}% [{100 * f['lo']:.1f}, {100 * f['hi']:.1f}]"


def _rise(f: dict) -> str:
    if f.get("value") is None:
        return "n/a"
    return f"{100 * f['value']:+.1f}% [{100 * f['lo']:+.1f}, {100 * f['hi']:+.1f}]"


def _num(f: dict, digits: int = 4) -> str:
    if f.get("value") is None:
        return "n/a"
    return f"{f['value']:.{digits}f} [{f['lo']:.{digits}f}, {f['hi']:.{digits}f}]"


def cell(f: dict, change: bool = False) -> str:
    """One figure as text, the way its metric reads."""
    m = f["metric"]
    if m in RISES:
        return _rise(f)
    if m == "kl":
        return _num(f, 4)
    if m == "tokens":
        return _num(f, 1) if not change else f"{f['value']:+.1f} [{f['lo']:+.1f}, {f['hi']:+.1f}]"
    return _pct(f, points=change)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                            for r in rows]


def plot_names(doc: dict) -> dict[str, str]:
    """The plots a results doc has, by key: file name."""
    names = {"claim25": "claim2-5-before-after.png"}
    for claim, name in (("1", "claim1-forgetting.png"), ("3", "claim3-curated-vs-noisy.png"),
                        ("4", "claim4-ranks.png")):
        if claim in doc["claims"]:
            names[f"claim{claim}"] = name
    return names


def _plots(doc: dict, figs: dict, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = plot_names(doc)
    arms = doc["arms"]

    def bars(ax, labels, fs, scale=100.0, title=""):
        v = np.array([f["value"] * scale for f in fs])
        err = np.clip(np.array([[(f["value"] - f["lo"]) * scale for f in fs],
                                [(f["hi"] - f["value"]) * scale for f in fs]]), 0, None)
        ax.bar(range(len(fs)), v, yerr=err, capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(fs)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.axhline(0, color="k", lw=0.5)

    c1 = doc["claims"].get("1")
    if c1:
        order = [a for a in ("self", "mix", "foreign") if a in arms]
        fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
        for ax, m in zip(axes, FORGETTING):
            fs = [figs[doc["levels"][a][m]] for a in order]
            bars(ax, order, fs, 100.0 if m != "kl" else 1.0, SHORT[m])
        fig.savefig(out / names["claim1"], dpi=90, bbox_inches="tight")
        plt.close(fig)
    if "3" in doc["claims"]:
        order = ["self", *doc["claims"]["3"]["contrasts"]]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        for ax, m in zip(axes, ("satisfied", "ignored", "story_nll")):
            bars(ax, order, [figs[doc["levels"][a][m]] for a in order], title=SHORT[m])
        fig.savefig(out / names["claim3"], dpi=90, bbox_inches="tight")
        plt.close(fig)
    order = ["base", *arms]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for ax, m in zip(axes, ("format", "ignored", "satisfied", "unasked_end")):
        bars(ax, order, [figs[doc["levels"][a][m]] for a in order], title=SHORT[m])
    fig.savefig(out / names["claim25"], dpi=90, bbox_inches="tight")
    plt.close(fig)
    if "4" in doc["claims"]:
        tr = doc["claims"]["4"]["trainable"]
        order = sorted(tr, key=lambda a: tr[a]["fraction"] or 0)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, m in zip(axes, ("satisfied", "story_nll")):
            fs = [figs[doc["levels"][a][m]] for a in order]
            x = [100 * tr[a]["fraction"] for a in order]
            v = [100 * f["value"] for f in fs]
            err = np.clip([[100 * (f["value"] - f["lo"]) for f in fs], [100 * (f["hi"] - f["value"]) for f in fs]],
                          0, None)
            ax.errorbar(x, v, yerr=err, fmt="o-", capsize=3)
            for xi, vi, a in zip(x, v, order):
                ax.annotate(a, (xi, vi), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xscale("log")
            ax.set_xlabel("trainable parameters (% of 260,032)", fontsize=8)
            ax.set_title(SHORT[m], fontsize=9)
        fig.savefig(out / names["claim4"], dpi=90, bbox_inches="tight")
        plt.close(fig)
    return names


COMMANDS = """\
```bash
python experiments/study.py --results docs          # everything: data, {n_runs} runs, memory, this page
python experiments/study.py --only foreign --seed 3  # one row's run again, bit-identical to the study's
python experiments/study.py --quick --out /tmp/q     # the reduced grid the test suite runs (under a minute)
python experiments/memory.py                         # the real-shape memory table alone
```"""


def render(doc: dict, plots: dict[str, str], commentary: dict[str, str]) -> str:
    figs = {f["id"]: f for f in doc["figures"]}
    g, L = doc["grid"], []

    def label(m: str) -> str:
        """A metric's name with its items per seed (n in a cell is items × seeds)."""
        f = figs[doc["levels"]["self" if "self" in doc["levels"] else doc["arms"][0]][m]]
        return f"{LABELS.get(m, m)} (n = {f['n'] // (f.get('clusters') or 1)} × seeds)"

    def col(arm: str) -> str:
        seeds = figs[doc["levels"][arm]["satisfied"]].get("clusters")
        return f"{arm} ({seeds} seeds)" if arm != "base" else "base"
    n_runs = sum(1 for r in doc["runs"] if r != "base")
    L += ["# Measured: the practice's claims on the bundled model", "",
          commentary.get("intro", "").strip(), "",
          f"Compute: {sum(doc['run_seconds'].values()) / 60:.0f} process-minutes in runs pinned to one core each "
          f"(raw pool {doc['run_seconds']['pool'] / 60:.0f}, base {doc['run_seconds']['base'] / 60:.0f}, "
          f"{n_runs} training runs {doc['run_seconds']['arms'] / 60:.0f}), two at a time on the 2 cores; "
          "`study.yaml` is the grid. "
          "Every interval is 95%: a bootstrap that resamples seeds and then the shared items (prompts, stories, "
          "documents), so seed-to-seed variation is in it; n is items × seeds. "
          "With 3 seeds such an interval is narrower than it should be (see *Reproducibility*).", "",
          COMMANDS.format(n_runs=n_runs), ""]
    L += ["## Summary", "", "| claim | quoted (chat models) | measured here | |", "|---|---|---|---|"]
    for row in commentary.get("summary_rows", []):
        L.append(row)
    L += ["", "Read off the intervals (computed, not written by hand):", ""]
    L += [f"- Claim {k}: {v}" for k, v in sorted(doc["claims"]["summary"].items())] + [""]

    d = doc["data"]
    pool = d["pool"]
    L += ["## Data", "", commentary.get("data", "").strip(), "",
          f"Raw pool: {pool['tasks']} tasks × {g['data']['samples']} samples = {pool['samples']} stories, "
          f"{pool['finished']} finished, {pool['passed']} passed their constraints; {pool['tasks_with_a_pass']} tasks "
          f"had a passing sample, {pool['after_filter']} survived the filter "
          f"(dropped: {', '.join(f'{k} {v}' for k, v in pool['filter_dropped'].items()) or 'none'}), "
          f"{d['files']['curated']['records']} drawn.", ""]
    rows = []
    for name, f in d["files"].items():
        nll = d["base_nll"].get(name)
        comp = d["noise"].get(name)
        what = ""
        if comp:
            what = (", ".join(f"{k} {v}" for k, v in comp["counts"].items())
                    + f"; failing their constraints {comp['failing']}, unfinished {comp['unfinished']}")
        rows.append([f"`{name}`", str(f["records"]), _num(nll["nll"], 3), _num(nll["tokens"], 0), what,
                     f["sha256"][:12]])
    L += _table(["set", "records", "base-model NLL per response token", "response tokens", "composition",
                 "sha256"], rows) + [""]

    arms = doc["arms"]
    L += ["## Every arm against the base (claims 2 and 5)", "", commentary.get("2+5", "").strip(), ""]
    metrics = ["format", "ignored", "satisfied", "followed", "finished", "unasked_end", "unasked_formatting"]
    header = ["metric", "base", *map(col, arms)]
    rows = []
    for m in metrics:
        rows.append([label(m), cell(figs[doc["levels"]["base"][m]]),
                     *[cell(figs[doc["claims"]["2+5"]["changes"][a][m]], change=True) for a in arms]])
    L += ["Base level, then each arm's change from it (points):", ""] + _table(header, rows) + [""]
    kinds = [k for k in doc["levels"]["base"] if k.startswith(KIND_PREFIX)]
    rows = [[label(k).replace(KIND_PREFIX, ""), cell(figs[doc["levels"]["base"][k]]),
             *[cell(figs[doc["levels"][a][k]]) for a in arms]] for k in kinds]
    L += ["Per constraint (strict):", ""] + _table(["constraint", "base", *map(col, arms)], rows) + [""]
    if "claim25" in plots:
        L += [f"![before and after]({plots['claim25']})", ""]

    if "1" in doc["claims"]:
        c1 = doc["claims"]["1"]
        L += ["## Claim 1: self-distilled vs foreign responses", "", commentary.get("1", "").strip(), ""]
        order = [a for a in ("self", "mix", "foreign") if a in arms]
        rows = [[label(m), *[cell(figs[doc["levels"][a][m]]) for a in order],
                 *[cell(figs[c1["contrasts"][o][m]], change=m not in RISES) for o in c1["contrasts"]]]
                for m in FORGETTING]
        L += _table(["forgetting measure", *map(col, order), *[f"{o} − self" for o in c1["contrasts"]]], rows) + [""]
        short = {"story_nll": "base-story perplexity rise", "unseen_nll": "unseen-text perplexity rise", "kl": "KL"}
        red = ", ".join(f"{short[m]} {100 * v:.0f}%" for m, v in c1["relative_reduction"].items() if v is not None)
        L += [f"Relative reduction, 1 − self/foreign (point estimates): {red}.", ""]
        if "claim1" in plots:
            L += [f"![forgetting]({plots['claim1']})", ""]

    if "3" in doc["claims"]:
        c3 = doc["claims"]["3"]
        L += ["## Claim 3: a small curated set vs larger noisy ones", "", commentary.get("3", "").strip(), ""]
        order = list(c3["contrasts"])
        steps = c3["steps"]
        rows = [[label(m), cell(figs[doc["levels"]["self"][m]]),
                 *[cell(figs[c3["contrasts"][a][m]], change=m not in RISES) for a in order]]
                for m in (*QUALITY, *FORGETTING)]
        L += _table(["measure", f"curated: {col('self')}, {steps['self']['steps']} steps",
                     *[f"curated − {col(a)}, {steps[a]['steps']} steps" for a in order]], rows) + [""]
        if "claim3" in plots:
            L += [f"![curated vs noisy]({plots['claim3']})", ""]

    if "4" in doc["claims"] or "memory" in doc:
        L += ["## Claim 4: how much LoRA trains, and the memory it saves", "", commentary.get("4", "").strip(), ""]
    if "4" in doc["claims"]:
        c4 = doc["claims"]["4"]
        rows = []
        for a, t in sorted(c4["trainable"].items(), key=lambda kv: kv[1]["fraction"] or 0):
            levels = [cell(figs[doc["levels"][a][m]]) for m in ("satisfied", *FORGETTING)]
            rows.append([col(a), f"{t['trainable']:,} ({100 * t['fraction']:.1f}%)", *levels])
        L += _table(["arm", "trainable (of 260,032)", label("satisfied"), *[label(m) for m in FORGETTING]],
                    rows) + [""]
        if "claim4" in plots:
            L += [f"![ranks]({plots['claim4']})", ""]
    if doc.get("memory"):
        L += [commentary.get("memory", "").strip(), ""]
        L += _table(["model", "method", "compiled for", "trainable", "weights + grads + AdamW", "peak per device",
                     "peak / full FT's"], [_memory_row(r) for r in doc["memory"]]) + [""]
        L += [f"Every memory row is an {doc['memory'][0]['label']}; seq {doc['memory'][0]['seq_len']}, "
              f"{doc['memory'][0]['batch']} sequence per micro-batch, remat {doc['memory'][0]['remat']}.", ""]

    ch = doc["checks"]
    if ch:
        L += ["## Reproducibility", "", commentary.get("checks", "").strip(), "",
              f"- Same seed again (`{ch['arm']}` seed 0, run dir `{ch['rerun']['dir']}`): "
              f"{'bit-identical' if ch['rerun']['identical'] else 'DIFFERENT'} (every per-item value and the "
              "merged model's bytes).",
              f"- Seeds give different numbers: {', '.join(f'{m} {v}' for m, v in ch['seeds_differ'].items())}.", ""]
        rows = []
        for m, p in ch["prediction"].items():
            fmt = (lambda v: f"{v:.4f}") if m in (*RISES, "kl") else (lambda v: f"{100 * v:.1f}%")
            rows.append([LABELS[m], ", ".join(fmt(v) for v in p["seed_values"]),
                         f"[{fmt(p['interval'][0])}, {fmt(p['interval'][1])}]",
                         "n/a" if p["new_value"] is None else fmt(p["new_value"]),
                         {True: "inside", False: "OUTSIDE", None: "n/a"}[p["inside"]]])
        L += _table(["metric (per-seed means; NLL for perplexity rows)", "seeds used by the report",
                     "95% prediction interval", f"new seed {ch['prediction']['satisfied']['new_seed']}", ""],
                    rows) + [""]

    L += ["## Runs", "", "Every figure above is computed from these run dirs (under the study directory; "
          "`results.json` lists each figure with the runs it used). The hash in a dir's name is of everything "
          "the run depends on; `sha256` is of its `result.json`.", ""]
    L += _table(["run", "dir", "result.json sha256"],
                [[k, f"`{v['dir']}`", v["sha256"][:16]] for k, v in doc["runs"].items()]) + [""]
    return "\n".join(L).replace("\n\n\n", "\n\n")


def _memory_row(r: dict) -> list[str]:
    """One experiments/memory.py row as table cells."""
    target = r["backend"] + (f" {r['target']} ({r['mesh']})" if r["backend"] == "XLA:TPU" else ", one device")
    if r.get("does_not_fit"):
        sizes = re.findall(r"\(([\d.]+G)\)", r["does_not_fit"])
        peak = "does not fit" + (f" (temporaries {sizes[0]}, HBM {sizes[1]})" if len(sizes) == 2 else "")
    else:
        peak = f"{r['peak_gib']:.2f} GiB" + (f" of {r['device_memory_gib']:.1f}" if r.get("device_memory_gib") else "")
    ratio = "" if r.get("peak_vs_full") is None else f"{r['peak_vs_full']:.2f}×"
    n = r["trainable_params"]
    count = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    return [r["model"], r["method_desc"], target, f"{count} ({r['trainable_pct']:.3g}%)", f"{r['wgo_gib']:.2f} GiB",
            peak, ratio]


def read_commentary(path: Path) -> dict:
    """`## key` sections of a markdown file, by key; `summary_rows` are the summary table's lines."""
    out, key = {}, None
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            key = line[3:].strip()
            out[key] = ""
        elif key:
            out[key] += line + "\n"
    out["summary_rows"] = [ln for ln in out.pop("summary", "").splitlines() if ln.startswith("|")]
    return out


def write(doc: dict, out: Path, commentary: Path | None = None) -> Path:
    """results.json, results.md and the PNGs into `out` (atomic file writes)."""
    from jaxtune.files import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    plot_dir = out / "results"
    plot_dir.mkdir(exist_ok=True)
    figs = {f["id"]: f for f in doc["figures"]}
    plots = {k: f"results/{v}" for k, v in _plots(doc, figs, plot_dir).items()}
    commentary = commentary or Path(__file__).resolve().parent / "commentary.md"
    write_text_atomic(out / "results.json", json.dumps(doc, indent=1, default=float) + "\n")
    write_text_atomic(out / "results.md", render(doc, plots, read_commentary(commentary)) + "\n")
    return out / "results.md"


def trace(results: Path, study_dir: Path) -> list[str]:
    """Problems found tracing every figure of results.json to its run dirs by hash (empty when all trace)."""
    doc = json.loads(Path(results).read_text())
    problems = []
    for name, run in doc["runs"].items():
        path = study_dir / "runs" / run["dir"]
        if not (path / "result.json").is_file():
            problems.append(f"{name}: run dir {path} is missing")
        elif file_sha256(path / "result.json") != run["sha256"]:
            problems.append(f"{name}: {path}/result.json does not hash to {run['sha256'][:12]}")
    for f in doc["figures"]:
        missing = [r for r in f["runs"] if r not in doc["runs"]]
        if missing:
            problems.append(f"figure {f['id']}: runs {missing} are not in the runs table")
    return problems

