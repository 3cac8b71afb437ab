"""What `--resume` lets a recipe change. The recipe is compared with the one the latest checkpoint was
saved with (its meta, else `RUN/config.yaml`) before anything is loaded: keys that change neither the
trained weights nor the data order (intervals, output flags, file locations) and `train.steps` pass with a
note; any other change is refused with the list of differing keys, unless `--allow-changes`. A differing
recipe is kept as `config.<step>.yaml` beside the new `config.yaml`, so neither is lost."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from jaxtune.files import url_access, write_text_atomic
from jaxtune.train import metrics as metrics_lib
from jaxtune.train.checkpoint import Checkpointer, checkpoint_path

# Keys a resume may change. Intervals and output flags change what is reported or kept, not what is
# trained; locations may move (the data and tokenizer are checked by content hash on restore, the base
# model is trusted by path); the data ceilings only refuse or admit the data, whose content is hashed;
# `train.steps` extends or shortens the schedule (docs/usage.md, Train).
MAY_CHANGE = frozenset({
    "train.steps", "train.log_every", "train.eval_every", "train.save_every", "train.forgetting_every",
    "train.keep_last", "train.keep_best", "train.async_checkpoint", "train.compile_cache",
    "output.run_dir", "output.checkpoint_dir", "output.export", "output.export_dir", "output.tensorboard",
    "output.progress",
    "model.path", "model.tokenizer", "data.train", "data.validation", "data.cache_dir", "data.rejects_path",
    "data.max_dropped_fraction", "data.max_truncated_fraction", "forgetting.warn_at", "forgetting.stop_at",
})


def diff(old, new, prefix: str = "") -> list[tuple[str, object, object]]:
    """`(dotted key, old, new)` for each leaf that differs; a section present on one side only is one leaf."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            out += diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [(prefix, old, new)]


def _show(v) -> str:
    return json.dumps(v, default=str)


def saved_recipe(ckpt_dir: str | Path, run_dir: Path) -> tuple[int, dict] | None:
    """`(step, recipe)` of the latest checkpoint in `ckpt_dir` (a path or URL; None without one): the recipe in
    its meta, so the run dir may be gone, or `RUN/config.yaml` for a checkpoint that carries none."""
    ckpt_dir = checkpoint_path(ckpt_dir)
    with url_access(ckpt_dir):
        if not ckpt_dir.is_dir():
            return None
    ckpt = Checkpointer(ckpt_dir)
    try:
        step = ckpt.latest_step()
        if step is None:
            return None
        raw = ckpt.read_meta(step).get("config")
    finally:
        ckpt.close()
    if raw is None and (run_dir / "config.yaml").is_file():
        raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    return step, raw or {}


def check_changes(run_dir: Path, step: int, old: dict, new: dict, *, allow_changes: bool = False) -> list[str]:
    """Refuse a resume whose recipe `new` differs from `old` (checkpoint `step`'s, as plain dicts) in a key
    outside `MAY_CHANGE`, unless `allow_changes`; keep `old` as `config.<step>.yaml` when any key differs.
    Returns the notes to log, one per changed key."""
    changes = diff(old, new)
    if not changes:
        return []
    listed = ", ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in changes)
    refused = [k for k, _, _ in changes if k not in MAY_CHANGE]
    if refused and not allow_changes:
        raise ValueError(f"{run_dir}: the recipe differs from the one checkpoint step {step} was trained with "
                         f"({listed}); resume with that recipe, pass --allow-changes to continue with these "
                         "changes, or set a new output.run_dir")
    steps = new.get("train", {}).get("steps")
    if steps is not None and steps < step:
        raise ValueError(f"train.steps: {steps} is below the checkpoint's step {step}; set train.steps >= {step} "
                         "or start a new output.run_dir")
    kept = run_dir / f"config.{step}.yaml"
    if metrics_lib.is_writer():
        run_dir.mkdir(parents=True, exist_ok=True)  # a resume from a checkpoint dir whose run dir is gone
        write_text_atomic(kept, yaml.safe_dump(old, sort_keys=False))
    notes = [f"resume: {k}: {_show(a)} -> {_show(b)}" + ("" if k in MAY_CHANGE else " (--allow-changes)")
             for k, a, b in changes]
    if any(k == "train.steps" for k, _, _ in changes):
        notes.append(f"resume: the LR schedule is rebuilt for {steps} steps; from step {step} on the run "
                     "follows that schedule")
    return notes + [f"resume: the recipe of checkpoint step {step} is kept as {kept}"]
