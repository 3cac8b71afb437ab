"""The training run behind `jaxtune train`: set up (recipe → mesh, model, data, the steps assembled by
`train/plan.py`, the checkpoint to resume from), loop (one jitted step, then the hooks of
`train/hooks.py`: metrics, forgetting, eval, checkpoints), finish (export).

Two ways to end before the schedule does: the NaN guard raises `TrainingStopped` (a failure; the last good
checkpoint is kept as it was), and the forgetting check past `forgetting.stop_at` ends the run cleanly (a
decision: the step is checkpointed, exported when configured, and `RunResult.stopped` says why). A third,
with `handle_sigterm`: a preemption notice (SIGTERM) ends the run before the next step (or before the export,
after the last), agreed across processes (`hooks.PreemptionNotice`), with the step reached checkpointed (the
save committed before `train` returns) and nothing evaluated or exported; `RunResult.preempted` is then set and
`--resume` continues exactly (and exports, when the schedule was complete).

Resume is exact: parameters and optimizer state come from the checkpoint, the data loader continues from
its saved grain state, and each step's RNG is `fold_in(seed key, step)`, so N steps + resume + N steps
reproduce a 2N-step run bit for bit. A resume first compares the recipe with the run's (`check_recipe`,
train/resume.py) and refuses changes that would break that, naming the keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.cache import enable_compile_cache
from jaxtune.eval import forgetting
from jaxtune.faults import fault_at
from jaxtune.files import as_path, write_text_atomic
from jaxtune.model.config import parse_dtype
from jaxtune.model.sharding import MESH_AXES, maybe_initialize_distributed, shard_batch
from jaxtune.recipe import ConfigError, RecipeConfig, dump_recipe
from jaxtune.structs import from_dict, to_dict
from jaxtune.train import metrics as metrics_lib
from jaxtune.train import resume as resume_lib
from jaxtune.train.checkpoint import Checkpointer, content_hash, provenance
from jaxtune.train.hooks import PreemptionNotice, Run, TrainState, make_hooks, run_hooks, save_checkpoint
from jaxtune.train.plan import assemble, build_mesh, micro_rows


@contextlib.contextmanager
def gc_frozen():
    """Hide every object alive now (modules, model, tokenizer, data) from the cyclic GC while the loop runs.
    Tracing the first step triggers full collections that would walk all of them; frozen, they walk only
    what the loop itself creates. Unfrozen after."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class TrainingStopped(RuntimeError):
    """The NaN guard ended the run; the last good checkpoint was left as it was."""


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    step: int
    total_steps: int
    losses: list[float]
    eval_loss: float | None
    compiles: int
    skipped_steps: int
    export_dir: Path | None = None
    stopped: str | None = None  # why the run ended before its schedule (e.g. forgetting past stop_at)
    preempted: bool = False  # a preemption notice ended it: checkpointed at `step`, to be resumed
    checkpoint_dir: str | None = None  # where its checkpoints are (a path or URL)


def train(cfg: RecipeConfig, *, resume: bool = False, stop_after: int | None = None,
          allow_changes: bool = False, handle_sigterm: bool = False) -> RunResult:
    """Run (or resume) the recipe. `stop_after` ends this invocation once that many steps are done
    (checkpointing there) without changing the schedule, as a preempted job would. A resume first checks
    the recipe against the run's (`check_recipe`); `allow_changes` lets any key differ. `handle_sigterm`
    turns SIGTERM into a checkpoint and a `RunResult` with `preempted` set, which the caller must treat as
    unfinished and exit on (the signal is consumed): `jaxtune train` does."""
    maybe_initialize_distributed()
    notes = check_recipe(cfg, allow_changes=allow_changes) if resume else []
    if cfg.train.compile_cache:
        enable_compile_cache()
    run, state = set_up(cfg, resume=resume, stop_after=stop_after)
    try:
        for line in notes:
            run.bar.log(line)
        hooks = make_hooks(run, state)
        with gc_frozen(), PreemptionNotice(enabled=handle_sigterm) as notice:
            while state.stopped is None:
                if notice.agreed(state.step):  # asked before each step, and once after the last
                    preempt(run, state)
                elif state.step < run.end:
                    run_step(run, state)
                    run_hooks(hooks, state)
                    fault_at("train.after_step", state.step)
                else:
                    break
    finally:
        run.close()
    return finish(run, state)


def check_recipe(cfg: RecipeConfig, *, allow_changes: bool) -> list[str]:
    """Compare the recipe with the one the run's latest checkpoint was trained with, before anything is
    loaded (train/resume.py says which keys may change). Returns the notes to log."""
    saved = resume_lib.saved_recipe(cfg.output.checkpoints, Path(cfg.output.run_dir))
    if saved is None:
        return []
    step, old = saved
    try:
        old = to_dict(from_dict(RecipeConfig, old))  # today's defaults for keys added since it was written
    except (ValueError, TypeError):
        pass
    return resume_lib.check_changes(Path(cfg.output.run_dir), step, old, to_dict(cfg), allow_changes=allow_changes)


# --- set-up -----------------------------------------------------------------------------------------------


def set_up(cfg: RecipeConfig, *, resume: bool, stop_after: int | None) -> tuple[Run, TrainState]:
    """Everything the loop needs, from the recipe; on `resume`, the state of the latest checkpoint."""
    from jaxtune.data.prepare import check_ceilings, prepare_dataset
    from jaxtune.lora.apply import count_params

    t = cfg.train
    run_dir = Path(cfg.output.run_dir)
    mesh = build_mesh(cfg)
    micro_rows(cfg, mesh)
    model, tokenizer, token_ids = load_model(cfg, mesh)
    train_examples, val_examples, data_report = prepare_dataset(cfg.data, tokenizer)
    check_ceilings(data_report, cfg.data)  # before any step is built: refuse data that lost too much
    loader, eval_batches = make_loaders(cfg, train_examples, val_examples, tokenizer)
    total_steps = t.steps or loader.total_steps
    parts, trainable, opt_state = assemble(cfg, model, token_ids, mesh, total_steps)
    prov = provenance(data_hash=content_hash(train_examples), tokenizer=tokenizer)
    ckpt = Checkpointer(cfg.output.checkpoints, keep_last=t.keep_last, keep_best=t.keep_best,
                        async_save=t.async_checkpoint)
    fresh = TrainState(step=0, trainable=trainable, opt_state=opt_state, key=jax.random.key(t.seed))
    try:
        state, note = restore(ckpt, loader, prov, fresh, resume=resume, run_dir=run_dir)
    except BaseException:
        ckpt.close()  # a refused resume must not leave the checkpoint manager's threads behind
        raise

    n_params, n_trainable = model.config.num_params(), count_params(trainable)
    run = Run(cfg=cfg, mesh=mesh, parts=parts, tokenizer=tokenizer, token_ids=token_ids, loader=loader,
              eval_batches=eval_batches, total_steps=total_steps,
              end=total_steps if stop_after is None else min(total_steps, stop_after), provenance=prov,
              flops_per_token=metrics_lib.train_flops_per_token(model.config, cfg.data.seq_len, n_params, n_trainable),
              peak_flops=metrics_lib.peak_flops(),
              writer=metrics_lib.MetricsWriter(run_dir, tensorboard=cfg.output.tensorboard,
                                               kept_through=state.step or None),
              bar=metrics_lib.Progress(total_steps, initial=state.step, enabled=cfg.output.progress), ckpt=ckpt)
    if metrics_lib.is_writer():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", dump_recipe(cfg))
        write_text_atomic(run_dir / "provenance.json", json.dumps(prov, indent=2, sort_keys=True) + "\n")
        write_text_atomic(run_dir / "data_report.json", json.dumps(data_report.to_dict(), indent=2) + "\n")
    run.bar.log("data:\n  " + data_report.summary().replace("\n", "\n  "))
    run.writer.text("data/report", data_report.summary(), state.step)
    if note:
        run.bar.log(note)
    run.bar.log(f"run {run_dir}: {total_steps} steps, mesh {dict(zip(MESH_AXES, mesh.devices.shape))}, "
                f"{n_trainable:,} trainable of {n_params:,} params, {len(train_examples)} train / "
                f"{len(val_examples)} val examples, {loader.steps_per_epoch} steps/epoch")
    return run, state


def load_model(cfg: RecipeConfig, mesh):
    """Tokenizer and model (added tokens, LoRA applied), placed on `mesh` by the sharding rules."""
    from jaxtune.hf.load import load_pretrained, load_tokenizer
    from jaxtune.lora.apply import apply_lora
    from jaxtune.lora.quantize import quantize_base
    from jaxtune.train.vocab import prepare_vocab

    m = cfg.model
    tokenizer = load_tokenizer(m.tokenizer or m.path)
    quantized = cfg.lora is not None and cfg.lora.quantize is not None
    model = load_pretrained(m.path, parse_dtype(m.dtype), mesh, param_dtype=parse_dtype(cfg.param_dtype),
                            allow_pickle=m.allow_pickle, scan_layers=m.scan_layers, remat=m.remat,
                            attention_impl=m.attention_impl,
                            prepare=(lambda model: quantize_base(model, cfg.lora)) if quantized else None)
    token_ids = prepare_vocab(model, tokenizer, m.add_special_tokens)
    if cfg.lora is not None:
        apply_lora(model, cfg.lora, nnx.Rngs(cfg.train.seed))
    return model, tokenizer, token_ids


def make_loaders(cfg: RecipeConfig, train_examples, val_examples, tokenizer):
    """Train loader spanning enough epochs for `train.steps`, and the eval batches (fixed, unshuffled)."""
    from jaxtune.data.loader import make_loader, pad_id_for

    d = cfg.data
    procs, index = jax.process_count(), jax.process_index()
    per_host = cfg.train.batch_size // procs
    kw = dict(packing=d.packing, pad_id=pad_id_for(tokenizer), shard_index=index, shard_count=procs)
    epochs = d.num_epochs
    while True:
        loader = make_loader(train_examples, per_host, d.seq_len, seed=d.shuffle_seed, num_epochs=epochs, **kw)
        if cfg.train.steps is None or loader.total_steps >= cfg.train.steps:
            break
        epochs = max(epochs + 1, math.ceil(cfg.train.steps / loader.steps_per_epoch))
    eval_batches = []
    if val_examples:
        micro = per_host // cfg.optim.grad_accum_steps
        val = make_loader(val_examples, micro, d.seq_len, shuffle=False, **kw)
        n = val.total_steps if cfg.train.eval_batches is None else min(val.total_steps, cfg.train.eval_batches)
        eval_batches = [val.batch_at(i) for i in range(n)]
    return loader, eval_batches


def restore(ckpt: Checkpointer, loader, prov: dict, fresh: TrainState, *, resume: bool,
            run_dir: Path | None = None) -> tuple[TrainState, str | None]:
    """`(state, note)`: `fresh` for a new run; the latest checkpoint's state (and the loader moved to its
    position) on `resume`. Refuses to start over a run dir that holds checkpoints without `resume`."""
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        raise ConfigError(f"{ckpt.directory} already holds checkpoints (latest step {latest}); pass "
                          "--resume to continue that run, or set a new output.run_dir (or output.checkpoint_dir)")
    if not resume:
        return fresh, None
    if latest is None:
        return fresh, f"--resume: no checkpoint in {ckpt.directory} yet, starting at step 0"
    # Shapes first, from the metadata: a failed orbax restore leaves threads that print tracebacks at exit.
    if bad := ckpt.shape_mismatches(latest, fresh.trainable):
        raise ConfigError(f"{ckpt.directory}: checkpoint step {latest} does not fit the model this recipe builds "
                          f"({'; '.join(bad[:3])}{'; …' if len(bad) > 3 else ''}); keys that shape the trainable "
                          "weights (lora.*, train.mode, model.*) cannot change on resume: start a new output.run_dir")
    trainable, opt_state, meta = ckpt.restore(None, fresh.trainable, fresh.opt_state)
    _check_resume(meta, prov, ckpt.directory)
    try:
        loader.set_state(meta["data_state"])
    except ValueError as e:
        raise ConfigError(f"{e}; a changed train.steps that needs more epochs of data than the run was built "
                          "with also changes the loader: keep train.steps within them, or start a new "
                          "output.run_dir") from None
    step = int(meta["step"])
    if run_dir is not None:  # a run dir that lost it (a new VM) gets the forgetting baseline back
        forgetting.restore_baseline(run_dir, meta.get("forgetting_baseline"))
    key = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
    return TrainState(step, trainable, opt_state, key, bad_in_row=int(meta.get("bad_in_row", 0)),
                      last_saved=step), f"resumed from checkpoint step {step} in {ckpt.directory}"


def _check_resume(meta: dict, prov: dict, ckpt_dir: Path) -> None:
    old = meta.get("provenance", {})
    for key, what in (("data_hash", "training data (tokenized)"), ("tokenizer_hash", "tokenizer")):
        if old.get(key) != prov.get(key):
            raise ConfigError(f"{ckpt_dir}: the {what} differs from the checkpoint's ({key} {old.get(key)} != "
                              f"{prov.get(key)}); an exact resume needs the same data and tokenizer, or start a "
                              "new output.run_dir")


# --- the step ---------------------------------------------------------------------------------------------


def to_micro(batch: dict, k: int) -> dict:
    """Host `[b, T]` → `[K, b/K, T]` for gradient accumulation (K = 1 keeps `[b, T]`)."""
    if k == 1:
        return batch
    return {name: v.reshape(k, v.shape[0] // k, *v.shape[1:]) for name, v in batch.items()}


def run_step(run: Run, s: TrainState) -> None:
    """One optimizer step on the next batch: updates `s` in place and fills `s.metrics`."""
    p, k = run.parts, run.cfg.optim.grad_accum_steps
    batch = to_micro(next(run.loader), k)
    t0 = time.perf_counter()  # tokens/s counts the batch's transfer to the devices too
    s.trainable, s.opt_state, m = p.train_step(p.graphdef, s.trainable, p.frozen, s.opt_state,
                                               shard_batch(batch, run.mesh, accum=k > 1),
                                               jax.random.fold_in(s.key, s.step))
    m = {name: float(v) for name, v in jax.device_get(m).items()}
    dt = time.perf_counter() - t0
    s.step += 1
    m["lr"] = float(p.schedule(s.step - 1))
    m["tokens_per_s"] = m["tokens"] / dt
    m["mfu"] = run.flops_per_token * m["tokens"] / dt / (run.peak_flops * run.mesh.size) if run.peak_flops else None
    nan_guard(run, s, m.pop("finite"))
    s.metrics, s.eval_loss = m, None
    s.losses.append(m["loss"])


def nan_guard(run: Run, s: TrainState, finite: bool) -> None:
    """The step left the weights as they were if its loss or gradient was not finite (train/step.py); stop
    at the first such step (`nan_policy: stop`) or after `max_bad_steps` in a row."""
    t = run.cfg.train
    if finite:
        s.bad_in_row = 0
        return
    s.bad_in_row += 1
    s.skipped += 1
    run.bar.log(f"step {s.step}: non-finite loss or gradient; update skipped ({s.bad_in_row} in a row)")
    if t.nan_policy == "stop" or s.bad_in_row >= t.max_bad_steps:
        good = (f"checkpoint step {s.last_saved} is the last good one" if s.last_saved else
                "no checkpoint was saved before it")
        raise TrainingStopped(f"stopped at step {s.step} after {s.bad_in_row} non-finite step(s) in a row "
                              f"(train.nan_policy={t.nan_policy}, max_bad_steps={t.max_bad_steps}); {good} "
                              f"(run dir {run.run_dir}; resume with --resume once the data or lr is fixed)")


def preempt(run: Run, s: TrainState) -> None:
    """The job is about to lose its machines: checkpoint the step reached (unless that step is saved already)
    and end the run; `Run.close` then waits for the save to commit."""
    saving = s.last_saved != s.step
    run.bar.log(f"preemption notice (SIGTERM) at step {s.step}: stopping"
                + (f", saving checkpoint step {s.step}" if saving else ""))
    if saving:
        save_checkpoint(run)(s)
    s.preempted = True
    s.stopped = f"preempted (SIGTERM) at step {s.step}"


# --- finish -----------------------------------------------------------------------------------------------


def finish(run: Run, s: TrainState) -> RunResult:
    """Export once the schedule is complete or a hook stopped the run (not when `stop_after` ended this
    invocation early, nor a preemption)."""
    if s.stopped is not None:
        saved = f"checkpoint step {s.step} saved in {run.ckpt.directory}" if s.step and s.last_saved == s.step \
            else "no checkpoint yet"
        run.bar.log(f"stopped early at step {s.step}/{run.total_steps}: {s.stopped}; {saved}")
    export_dir = None
    done = not s.preempted and (s.step == run.total_steps or s.stopped is not None)
    if run.cfg.output.export and done:  # every process: the weights are sharded over all of them
        export_dir = export(run.cfg, run.model(s), run.tokenizer, run.token_ids, run.bar.log)
    return RunResult(run_dir=run.run_dir, step=s.step, total_steps=run.total_steps, losses=s.losses,
                     eval_loss=s.eval_loss, compiles=run.parts.train_step._cache_size(), skipped_steps=s.skipped,
                     export_dir=export_dir, stopped=s.stopped, preempted=s.preempted,
                     checkpoint_dir=str(run.ckpt.directory))


def export(cfg: RecipeConfig, model, tokenizer, token_ids, log):
    """EXPORT/merged (HF checkpoint) and, for LoRA, EXPORT/adapter (PEFT); EXPORT is `output.export_dir` (a
    path or URL), by default RUN_DIR/export."""
    from jaxtune.data.chat import resolve_template
    from jaxtune.export import save_merged, save_peft_adapter

    out = as_path(cfg.output.exports)
    template = resolve_template(cfg.data.chat_template, tokenizer)
    # RUN/export is the run's own; `force` lets it replace an export an older jaxtune wrote there without a
    # marker (the refusals that protect models, run dirs and the working directory still apply). An
    # output.export_dir is the user's: guarded like `jaxtune export --out`.
    own = cfg.output.export_dir is None
    save_merged(model, tokenizer, out / "merged", source_dir=cfg.model.path if Path(cfg.model.path).is_dir() else None,
                chat_template=template, force=own)
    log(f"exported merged model to {out / 'merged'}")
    if cfg.lora is not None and token_ids:
        log("adapter export skipped: the run trained added-token embedding rows, which a PEFT LoRA adapter "
            "does not carry; use export/merged")
    elif cfg.lora is not None:
        save_peft_adapter(model, out / "adapter", base_model_name_or_path=cfg.model.path, tokenizer=tokenizer,
                          chat_template=template, force=own)
        log(f"exported PEFT adapter to {out / 'adapter'}")
    return out
