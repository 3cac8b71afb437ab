"""Run the loop: round 0 evaluates the base model; rounds 1..N generate → filter → distill → tune →
evaluate → report. Each stage writes into `RUN/round-K/STAGE/` atomically (a crash loses at most the stage in
progress), with a manifest; a stage whose manifest matches what it would run with now is skipped, so a
second run with nothing changed does nothing, and an edit re-runs exactly the stages it affects.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from jaxtune.faults import fault_point
from jaxtune.files import atomic_dir, write_text_atomic
from jaxtune.pipeline import STAGES, manifest
from jaxtune.pipeline.config import PipelineConfig
from jaxtune.pipeline.context import Context, round_dir
from jaxtune.pipeline.stages import RUNNERS, stage_config, stage_inputs
from jaxtune.structs import to_dict
from jaxtune.version import __version__

RUN_MARKER = "pipeline.json"
STAGE_KIND = "pipeline stage"


@dataclass(frozen=True)
class StageRun:
    round: int
    stage: str
    skipped: bool
    counts: dict
    seconds: float


def plan(rounds: int) -> list[tuple[int, str]]:
    return [(0, "evaluate"), (0, "report")] + [(k, s) for k in range(1, rounds + 1) for s in STAGES]


def parse_from(spec: str | None, rounds: int) -> tuple[int, str] | None:
    """`STAGE` (its first occurrence: round 1, or round 0 for evaluate/report) or `K/STAGE` / `round-K/STAGE`."""
    if spec is None:
        return None
    k_part, _, stage = spec.rpartition("/")
    if stage not in STAGES:
        raise ValueError(f"--from {spec!r}: unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if k_part:
        try:
            k = int(k_part.removeprefix("round-"))
        except ValueError:
            raise ValueError(f"--from {spec!r}: expected STAGE or K/STAGE (e.g. 2/filter)") from None
    else:
        k = 0 if stage in ("evaluate", "report") else 1
    if (k, stage) not in plan(rounds):
        raise ValueError(f"--from {spec!r}: round {k} has no {stage} stage (rounds 1..{rounds}; round 0 only "
                         "evaluates the base model)")
    return k, stage


def open_run_dir(cfg: PipelineConfig) -> Path:
    """The run dir, created or recognised as a pipeline's own; anything else there is refused, never touched."""
    run_dir = Path(cfg.output.run_dir)
    marker = run_dir / RUN_MARKER
    if run_dir.exists() and any(run_dir.iterdir()) and not marker.is_file():
        raise ValueError(f"output.run_dir {run_dir} exists and is not a jaxtune pipeline run (no {RUN_MARKER}); "
                         "choose a new run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        write_text_atomic(marker, json.dumps({"jaxtune_pipeline": __version__}) + "\n")
    import yaml

    write_text_atomic(run_dir / "recipe.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return run_dir


def _config_changes(old: dict | None, new: dict) -> list[str]:
    if not old:
        return []
    out = []
    for section in sorted(set(old) | set(new)):
        if old.get(section) != new.get(section):
            out.append(section)
    return out


def _progress_bar(k: int, stage: str, enabled: bool):
    """One bar per stage; `update(done, total, note)`. The stage's first update is a fault-injection point
    (`pipeline.<stage>.progress`), so tests can kill a run in the middle of a stage, not by timing."""
    from tqdm import tqdm

    bar = tqdm(total=0, desc=f"round {k} {stage}", unit="item", disable=not enabled, dynamic_ncols=True)
    first = [True]

    def update(done: int, total: int, note: str | None = None) -> None:
        bar.total = total
        bar.n = done
        if note:
            bar.set_postfix_str(note, refresh=False)
        bar.refresh()
        if first[0]:
            first[0] = False
            fault_point(f"pipeline.{stage}.progress")

    return bar, update


def run_stage(ctx: Context, k: int, stage: str, *, force: bool) -> StageRun:
    cfg = ctx.cfg
    out = round_dir(ctx.run_dir, k) / stage
    inputs = {}
    for p in stage_inputs(ctx, stage, k):
        if not p.exists():
            raise ValueError(f"round {k} {stage}: its input {p} is missing; re-run from the stage that writes it "
                             f"(--from)")
        inputs[str(p.relative_to(ctx.run_dir) if p.is_relative_to(ctx.run_dir) else p)] = \
            manifest.digest(manifest.tree_hashes(p, manifest.LOG_NAMES))
    config = stage_config(cfg, stage)
    model = manifest.model_identity(cfg.model.path)
    teacher_model = cfg.teacher.model if cfg.teacher.kind == "local" and cfg.teacher.model else None
    teacher = {"config": config.get("teacher"),
               "model": manifest.model_identity(teacher_model) if teacher_model else None}
    key = manifest.stage_key(stage=stage, round_=k, inputs=inputs, model=model, teacher=teacher, config=config)
    old = manifest.read_manifest(out)
    if not force and manifest.is_current(out, key):
        ctx.log(f"[pipeline] round {k} {stage}: up to date, skipped ({old['counts']['out']} kept)")
        return StageRun(k, stage, True, old["counts"], 0.0)
    if old is not None:
        why = "forced by --from" if force else (
            "config changed: " + ", ".join(_config_changes(old.get("config"), config))
            if old.get("config") != config else "inputs, model or code changed")
        ctx.log(f"[pipeline] round {k} {stage}: re-running ({why})")
    start = time.perf_counter()
    bar, progress = _progress_bar(k, stage, cfg.output.progress)
    try:
        with atomic_dir(out, kind=STAGE_KIND) as tmp:
            result = RUNNERS[stage](ctx, k, tmp, progress=progress)
            fault_point(f"pipeline.{stage}.before_manifest")
            seconds = time.perf_counter() - start
            manifest.write_manifest(tmp, stage=stage, round=k, key=key, inputs=inputs, model=model, teacher=teacher,
                                    config=config, counts=result, seconds=round(seconds, 3))
    finally:
        bar.close()
    dropped = sum(result.get("dropped", {}).values())
    ctx.log(f"[pipeline] round {k} {stage}: {result['in']} in, {result['out']} out"
            + (f", {dropped} dropped ({', '.join(f'{r}: {n}' for r, n in result['dropped'].items())})"
               if dropped else "") + f" [{seconds:.1f} s]")
    return StageRun(k, stage, False, result, seconds)


def run_pipeline(cfg: PipelineConfig, *, rounds: int | None = None, from_stage: str | None = None,
                 log=print) -> list[StageRun]:
    rounds = cfg.rounds if rounds is None else rounds
    if rounds < 1:
        raise ValueError(f"--rounds {rounds}: must be >= 1")
    start_at = parse_from(from_stage, rounds)
    ctx = Context(cfg, open_run_dir(cfg), log)
    ctx.check_inputs()  # a bad seed or eval file fails now, not after round 0's evaluation
    steps = plan(rounds)
    forced_from = steps.index(start_at) if start_at else len(steps)
    runs = [run_stage(ctx, k, stage, force=i >= forced_from) for i, (k, stage) in enumerate(steps)]
    report = round_dir(ctx.run_dir, rounds) / "report" / "report.html"
    log(f"[pipeline] done: {sum(not r.skipped for r in runs)} stages ran, {sum(r.skipped for r in runs)} skipped; "
        f"report {report}")
    return runs
