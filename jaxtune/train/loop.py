"""The training run behind `jaxtune train`: recipe → mesh, model, data → jitted steps → checkpoints, logs,
export. The shell around the pure steps in `train/step.py`.

Resume is exact: parameters and optimizer state come from the checkpoint, the data loader continues from
its saved grain state, and each step's RNG is `fold_in(seed key, step)`, so N steps + resume + N steps
reproduce a 2N-step run bit for bit.
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
import numpy as np
from flax import nnx

from jaxtune.cache import enable_compile_cache
from jaxtune.recipe import ConfigError, RecipeConfig, dump_recipe, to_dict
from jaxtune.model.config import parse_dtype
from jaxtune.model.sharding import (MESH_AXES, check_rules, make_mesh, maybe_initialize_distributed, shard_batch,
                                    tree_shardings)
from jaxtune.train import metrics as metrics_lib
from jaxtune.train.checkpoint import Checkpointer, content_hash, provenance
from jaxtune.train.vocab import merge_model


@contextlib.contextmanager
def gc_frozen():
    """Hide every object alive now (modules, model, tokenizer, data: ~0.5M objects) from the cyclic GC while
    the loop runs. Tracing the first step triggers full collections that would walk all of them (~0.25 s
    each on the stories260K job); frozen, they walk only what the loop itself creates. Unfrozen after."""
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


def build_mesh(cfg: RecipeConfig, devices=None) -> jax.sharding.Mesh:
    """The recipe's mesh. Explicit sizes smaller than this host's device count (no `-1`) use the first
    devices, e.g. `mesh: {data: 1}` to debug on one GPU of eight; multi-process jobs must use them all."""
    devices = list(devices if devices is not None else jax.devices())
    if -1 not in cfg.mesh.values() and jax.process_count() == 1:
        devices = devices[:int(np.prod(list(cfg.mesh.values()) or [1]))]
    return make_mesh(cfg.mesh, devices)


def load_model(cfg: RecipeConfig, mesh):
    """Tokenizer and model (added tokens, LoRA applied), placed on `mesh` by the sharding rules."""
    from jaxtune.hf.load import load_pretrained, load_tokenizer
    from jaxtune.lora.apply import apply_lora
    from jaxtune.train.vocab import prepare_vocab

    m = cfg.model
    tokenizer = load_tokenizer(m.tokenizer or m.path)
    model = load_pretrained(m.path, parse_dtype(m.dtype), mesh, param_dtype=parse_dtype(cfg.param_dtype),
                            allow_pickle=m.allow_pickle, scan_layers=m.scan_layers, remat=m.remat,
                            attention_impl=m.attention_impl)
    token_ids = prepare_vocab(model, tokenizer, m.add_special_tokens)
    if cfg.lora is not None:
        apply_lora(model, cfg.lora, nnx.Rngs(cfg.train.seed))
    return model, tokenizer, token_ids


def partition(cfg: RecipeConfig, model, token_ids, mesh, total_steps: int):
    """`(graphdef, trainable, frozen, token_rows, tx, schedule)` with both partitions placed by the rules."""
    from jaxtune.train.partition import split_trainable, trainable_filter
    from jaxtune.train.optim import lr_schedule, make_optimizer
    from jaxtune.train.vocab import split_model

    check_rules(nnx.state(model, nnx.Param), mesh)
    filt = trainable_filter(cfg.train.mode, cfg.train.freeze)
    split_trainable(model, filt)
    graphdef, trainable, frozen, token_rows = split_model(model, filt, token_ids)
    trainable = jax.device_put(trainable, tree_shardings(trainable, mesh))
    frozen = jax.device_put(frozen, tree_shardings(frozen, mesh))
    tx = make_optimizer(cfg.optim, total_steps, trainable)
    return graphdef, trainable, frozen, token_rows, tx, lr_schedule(cfg.optim, total_steps)


def build_steps(cfg: RecipeConfig, trainable, tx, mesh, token_rows):
    """`(opt_state, train_step, eval_step)`. The optimizer state is created with the shardings the step
    pins its outputs to, so every call sees the same input layouts and the train step compiles once (built
    without them, the second call compiles it again: ~4 s on the stories260K job)."""
    from jaxtune.train.step import jit_eval_step, jit_train_step

    trainable_sh = tree_shardings(trainable, mesh)
    opt_sh = tree_shardings(jax.eval_shape(tx.init, trainable), mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    step_fn = jit_train_step(tx, mesh=mesh, trainable_shardings=trainable_sh, opt_shardings=opt_sh,
                             loss_chunk=cfg.train.loss_chunk, token_rows=token_rows)
    return opt_state, step_fn, jit_eval_step(mesh=mesh, loss_chunk=cfg.train.loss_chunk, token_rows=token_rows)


def micro_rows(cfg: RecipeConfig, mesh) -> int:
    """Rows per micro-batch; must split evenly over data×fsdp."""
    k = cfg.optim.grad_accum_steps
    rows = cfg.train.batch_size // k
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % shards:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} / optim.grad_accum_steps={k} = {rows} rows per "
                          f"micro-batch do not split over mesh data×fsdp = {shards} devices; use a multiple of "
                          f"{shards * k}")
    if cfg.train.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must divide over {jax.process_count()} hosts")
    return rows


def to_micro(batch: dict, k: int) -> dict:
    """Host `[b, T]` → `[K, b/K, T]` for gradient accumulation (K = 1 keeps `[b, T]`)."""
    if k == 1:
        return batch
    return {name: v.reshape(k, v.shape[0] // k, *v.shape[1:]) for name, v in batch.items()}


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


def evaluate(eval_fn, graphdef, trainable, frozen, batches, mesh) -> dict | None:
    if not batches:
        return None
    nll = correct = n = 0.0
    for b in batches:
        out = jax.device_get(eval_fn(graphdef, trainable, frozen, shard_batch(b, mesh)))
        nll += float(out["nll_sum"])
        correct += float(out["correct_sum"])
        n += float(out["loss_tokens"])
    if n == 0:
        return None
    return {"loss": nll / n, "perplexity": math.exp(min(nll / n, 700.0)), "accuracy": correct / n, "loss_tokens": n}


def _check_resume(meta: dict, prov: dict, ckpt_dir: Path) -> None:
    old = meta.get("provenance", {})
    for key, what in (("data_hash", "training data (tokenized)"), ("tokenizer_hash", "tokenizer")):
        if old.get(key) != prov.get(key):
            raise ConfigError(f"{ckpt_dir}: the {what} differs from the checkpoint's ({key} {old.get(key)} != "
                              f"{prov.get(key)}); an exact resume needs the same data and tokenizer, or start a "
                              "new output.run_dir")


def export(cfg: RecipeConfig, model, tokenizer, token_ids, run_dir: Path, log) -> Path:
    """RUN_DIR/export/merged (HF checkpoint) and, for LoRA, export/adapter (PEFT)."""
    from jaxtune.data.chat import resolve_template
    from jaxtune.export import save_merged
    from jaxtune.lora.peft import save_peft_adapter

    out = run_dir / "export"
    template = resolve_template(cfg.data.chat_template, tokenizer)
    save_merged(model, tokenizer, out / "merged", source_dir=cfg.model.path if Path(cfg.model.path).is_dir() else None,
                chat_template=template)
    log(f"exported merged model to {out / 'merged'}")
    if cfg.lora is not None and token_ids:
        log("adapter export skipped: the run trained added-token embedding rows, which a PEFT LoRA adapter "
            "does not carry; use export/merged")
    elif cfg.lora is not None:
        save_peft_adapter(model, out / "adapter", base_model_name_or_path=cfg.model.path, tokenizer=tokenizer,
                          chat_template=template)
        log(f"exported PEFT adapter to {out / 'adapter'}")
    return out


def train(cfg: RecipeConfig, *, resume: bool = False, stop_after: int | None = None) -> RunResult:
    """Run (or resume) the recipe. `stop_after` ends this invocation once that many steps are done
    (checkpointing there) without changing the schedule, as a preempted job would."""
    from jaxtune.data.prepare import prepare_dataset
    from jaxtune.lora.apply import count_params

    maybe_initialize_distributed()
    t_cfg = cfg.train
    if t_cfg.compile_cache:
        enable_compile_cache()
    run_dir = Path(cfg.output.run_dir)
    mesh = build_mesh(cfg)
    micro_rows(cfg, mesh)
    model, tokenizer, token_ids = load_model(cfg, mesh)
    train_examples, val_examples, report = prepare_dataset(cfg.data, tokenizer)
    loader, eval_batches = make_loaders(cfg, train_examples, val_examples, tokenizer)
    total_steps = t_cfg.steps or loader.total_steps
    k = cfg.optim.grad_accum_steps
    graphdef, trainable, frozen, token_rows, tx, schedule = partition(cfg, model, token_ids, mesh, total_steps)
    opt_state, step_fn, eval_fn = build_steps(cfg, trainable, tx, mesh, token_rows)
    current = lambda: merge_model(graphdef, trainable, frozen, token_rows)  # noqa: E731

    prov = provenance(data_hash=content_hash(train_examples), tokenizer=tokenizer)
    ckpt = Checkpointer(run_dir / "checkpoints", keep_last=t_cfg.keep_last, keep_best=t_cfg.keep_best,
                        async_save=t_cfg.async_checkpoint)
    key = jax.random.key(t_cfg.seed)
    start, bad_in_row = 0, 0
    if ckpt.latest_step() is not None and not resume:
        raise ConfigError(f"{ckpt.directory} already holds checkpoints (latest step {ckpt.latest_step()}); pass "
                          "--resume to continue that run, or set a new output.run_dir")
    note = None
    if resume and ckpt.latest_step() is None:
        note = f"--resume: no checkpoint in {ckpt.directory} yet, starting at step 0"
    elif resume:
        trainable, opt_state, meta = ckpt.restore(None, trainable, opt_state)
        _check_resume(meta, prov, ckpt.directory)
        loader.set_state(meta["data_state"])
        key = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
        start, bad_in_row = int(meta["step"]), int(meta.get("bad_in_row", 0))

    writer = metrics_lib.MetricsWriter(run_dir, tensorboard=cfg.output.tensorboard)
    bar = metrics_lib.Progress(total_steps, initial=start, enabled=cfg.output.progress)
    if metrics_lib.is_writer():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_recipe(cfg))
        (run_dir / "provenance.json").write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
    n_trainable = count_params(trainable)
    if note:
        bar.log(note)
    bar.log(f"run {run_dir}: {total_steps} steps, mesh {dict(zip(MESH_AXES, mesh.devices.shape))}, "
            f"{n_trainable:,} trainable of {model.config.num_params():,} params, "
            f"{len(train_examples)} train / {len(val_examples)} val examples, {loader.steps_per_epoch} steps/epoch")
    flops_tok = metrics_lib.train_flops_per_token(model.config, cfg.data.seq_len, model.config.num_params(),
                                                  n_trainable)
    peak = metrics_lib.peak_flops()
    monitor = None
    if cfg.forgetting is not None and t_cfg.forgetting_every:
        from jaxtune.eval.forgetting import ForgettingMonitor

        monitor = ForgettingMonitor(tokenizer, cfg.forgetting, run_dir=run_dir, mesh=mesh)
        base = monitor.baseline(current())  # a resumed run reloads the recorded baseline from the run dir
        if start == 0:
            writer.write(0, base, "forgetting")

    def meta_for(step, eval_loss):
        return {"step": step, "rng": np.asarray(jax.random.key_data(key)).tolist(), "data_state": loader.get_state(),
                "config": to_dict(cfg), "provenance": prov, "eval_loss": eval_loss, "bad_in_row": bad_in_row}

    losses, skipped, eval_loss, last_saved = [], 0, None, start
    end = total_steps if stop_after is None else min(total_steps, stop_after)
    step = start
    with gc_frozen():
        try:
            while step < end:
                batch = to_micro(next(loader), k)
                t0 = time.perf_counter()
                trainable, opt_state, m = step_fn(graphdef, trainable, frozen, opt_state,
                                                  shard_batch(batch, mesh, accum=k > 1), jax.random.fold_in(key, step))
                m = {name: float(v) for name, v in jax.device_get(m).items()}
                dt = time.perf_counter() - t0
                step += 1
                m["lr"] = float(schedule(step - 1))
                m["tokens_per_s"] = m["tokens"] / dt
                m["mfu"] = flops_tok * m["tokens"] / dt / (peak * mesh.size) if peak else None
                if not m.pop("finite"):
                    bad_in_row += 1
                    skipped += 1
                    bar.log(f"step {step}: non-finite loss or gradient; update skipped ({bad_in_row} in a row)")
                    if t_cfg.nan_policy == "stop" or bad_in_row >= t_cfg.max_bad_steps:
                        raise TrainingStopped(
                            f"stopped at step {step} after {bad_in_row} non-finite step(s) in a row "
                            f"(train.nan_policy={t_cfg.nan_policy}, max_bad_steps={t_cfg.max_bad_steps}); "
                            f"checkpoint step {last_saved} is the last good one")
                else:
                    bad_in_row = 0
                losses.append(m["loss"])
                writer.write(step, m)
                bar.update(m)
                if step % t_cfg.log_every == 0 or step == end:
                    bar.log(metrics_lib.format_line(step, total_steps, m))
                save_now = (t_cfg.save_every and step % t_cfg.save_every == 0) or step == end
                eval_now = (t_cfg.eval_every and step % t_cfg.eval_every == 0) or step == total_steps or (
                    save_now and t_cfg.keep_best)
                eval_loss = None
                if eval_now and eval_batches:
                    ev = evaluate(eval_fn, graphdef, trainable, frozen, eval_batches, mesh)
                    if ev is not None:
                        eval_loss = ev["loss"]
                        writer.write(step, ev, "eval")
                        bar.log(metrics_lib.format_line(step, total_steps, ev, "eval"))
                if monitor is not None and step % t_cfg.forgetting_every == 0:
                    res = monitor.measure(current(), step)
                    writer.write(step, res, "forgetting")
                if save_now:
                    ckpt.save(step, trainable, opt_state, meta_for(step, eval_loss), eval_loss)
                    last_saved = step
        finally:
            bar.close()
            writer.close()
            ckpt.close()

    export_dir = None
    if cfg.output.export and step == total_steps:
        if metrics_lib.is_writer():
            export_dir = export(cfg, current(), tokenizer, token_ids, run_dir, bar.log)
    return RunResult(run_dir=run_dir, step=step, total_steps=total_steps, losses=losses, eval_loss=eval_loss,
                     compiles=step_fn._cache_size(), skipped_steps=skipped, export_dir=export_dir)
