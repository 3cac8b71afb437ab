"""What a training run does between steps, as hooks: the metrics row and log line, evaluation, the
forgetting check and checkpointing. `make_hooks` is the one list of them; a new periodic action is a
`Hook` added there.

The loop and the hooks share two objects: `Run`, fixed for the run (built by `loop.set_up`), and
`TrainState`, which each step changes. A hook is called with the state after a step whose number its
interval divides or where its `also` condition holds (e.g. the last step). Hooks run in list order: the
forgetting check comes first, since past `forgetting.stop_at` it ends the run (`state.stopped`) and the
evaluation and checkpoint then run for that last step; evaluation comes before the checkpoint, which ranks
itself by that step's eval loss.

A preemption notice (SIGTERM) is not a hook: `PreemptionNotice` turns it into a flag the loop reads before
each step, agreed across processes, and the loop then checkpoints the step reached and ends the run.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxtune.eval import forgetting
from jaxtune.model.sharding import shard_batch
from jaxtune.recipe import ConfigError, RecipeConfig
from jaxtune.structs import to_dict
from jaxtune.train import metrics as metrics_lib
from jaxtune.train.checkpoint import Checkpointer
from jaxtune.train.plan import Parts
from jaxtune.train.vocab import merge_model


@dataclasses.dataclass
class TrainState:
    """What changes as the run goes: the step's inputs and outputs, and what the hooks report back."""

    step: int  # optimizer steps done
    trainable: Any
    opt_state: Any
    key: jax.Array  # the run's seed key; step n uses fold_in(key, n)
    bad_in_row: int = 0  # non-finite steps in a row (the NaN guard's count, kept across a resume)
    last_saved: int = 0
    metrics: dict = dataclasses.field(default_factory=dict)  # the last step's train metrics
    eval_loss: float | None = None  # the last step's, when the eval hook ran on it
    losses: list[float] = dataclasses.field(default_factory=list)  # this invocation's train losses
    skipped: int = 0
    stopped: str | None = None  # why the run ends early (set by a hook; the loop ends after this step)
    preempted: bool = False  # ended by a preemption notice: checkpointed, not finished (no eval, no export)


@dataclasses.dataclass
class Run:
    """What stays fixed through a run: the recipe, placement, assembled steps, data and outputs."""

    cfg: RecipeConfig
    mesh: jax.sharding.Mesh
    parts: Parts
    tokenizer: Any
    token_ids: list[int]
    loader: Any
    eval_batches: list[dict]
    total_steps: int  # the schedule's length
    end: int  # where this invocation stops (`stop_after`, else total_steps)
    provenance: dict
    flops_per_token: float
    peak_flops: float | None
    writer: metrics_lib.MetricsWriter
    bar: metrics_lib.Progress
    ckpt: Checkpointer

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output.run_dir)

    def model(self, state: TrainState):
        """The model as it stands (an `nnx.merge` of the partitions), for generation and export."""
        p = self.parts
        return merge_model(p.graphdef, state.trainable, p.frozen, p.token_rows)

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
        self.ckpt.close()


def _never(state: TrainState) -> bool:
    return False


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(state)` after each step that `every` divides (0: none) and each one where `also(state)` holds."""

    name: str
    fn: Callable[[TrainState], None]
    every: int = 0
    also: Callable[[TrainState], bool] = _never

    def due(self, state: TrainState) -> bool:
        return bool(self.every and state.step % self.every == 0) or self.also(state)


def make_hooks(run: Run, state: TrainState) -> list[Hook]:
    """The run's hooks in the order they run. The forgetting hook measures its baseline here, before step 1."""
    t = run.cfg.train
    last = lambda s: s.step == run.end  # noqa: E731

    def final(s: TrainState) -> bool:  # the last step of this invocation, or one a hook ended the run at
        return s.step == run.end or s.stopped is not None

    save = Hook("checkpoint", save_checkpoint(run), every=t.save_every, also=final)
    hooks = [Hook("metrics", write_metrics(run), every=1),
             Hook("log", log_line(run), every=t.log_every, also=last)]
    if run.cfg.forgetting is not None and t.forgetting_every:
        hooks.append(Hook("forgetting", forgetting_hook(run, state), every=t.forgetting_every))
    if run.eval_batches:
        def at(s: TrainState) -> bool:
            # keep_best ranks checkpoints by eval loss, so every save is evaluated first; the step a hook
            # stopped the run at is evaluated like the schedule's last.
            return s.step == run.total_steps or s.stopped is not None or bool(t.keep_best and save.due(s))

        hooks.append(Hook("eval", evaluate_hook(run), every=t.eval_every, also=at))
    hooks.append(save)
    return hooks


def run_hooks(hooks: list[Hook], state: TrainState) -> None:
    for hook in hooks:
        if hook.due(state):
            hook.fn(state)


# --- the hooks ------------------------------------------------------------------------------------------


def write_metrics(run: Run):
    """Every step: the `train` row of metrics.jsonl / TensorBoard, and the progress bar."""
    def fn(s: TrainState) -> None:
        run.writer.write(s.step, s.metrics)
        run.bar.update(s.metrics)

    return fn


def log_line(run: Run):
    def fn(s: TrainState) -> None:
        run.bar.log(metrics_lib.format_line(s.step, run.total_steps, s.metrics))

    return fn


def evaluate(eval_fn, graphdef, trainable, frozen, batches, mesh) -> dict | None:
    """Loss, perplexity and accuracy over `batches`, weighted by loss tokens (None without any)."""
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


def evaluate_hook(run: Run):
    """Validation loss on the fixed eval batches; sets `state.eval_loss` for the checkpoint hook."""
    def fn(s: TrainState) -> None:
        p = run.parts
        ev = evaluate(p.eval_step, p.graphdef, s.trainable, p.frozen, run.eval_batches, run.mesh)
        if ev is not None:
            s.eval_loss = ev["loss"]
            run.writer.write(s.step, ev, "eval")
            run.bar.log(metrics_lib.format_line(s.step, run.total_steps, ev, "eval"))

    return fn


def forgetting_hook(run: Run, state: TrainState):
    """Drift from the base model (eval/forgetting.py). The baseline is measured now, on the base, and written
    as step 0; a resumed run reloads the one recorded in the run dir instead. Each check is one log line
    (`forgetting.assess`); at or above `forgetting.stop_at` it sets `state.stopped`."""
    cfg = run.cfg.forgetting
    monitor = forgetting.ForgettingMonitor(run.tokenizer, cfg, run_dir=run.run_dir, mesh=run.mesh)
    if state.step > 0 and not monitor.recorded():  # measured now, the "base" would be the trained model
        raise ConfigError(f"resuming at step {state.step}: the forgetting baseline {run.run_dir}/forgetting/"
                          "baseline.json is missing (a new run dir, and a checkpoint that does not carry it) and "
                          "cannot be measured on a trained model; copy forgetting/ from the first run dir, or "
                          "resume with --set train.forgetting_every=0")
    base = monitor.baseline(run.model(state))
    if state.step == 0:
        run.writer.write(0, base, "forgetting")

    def fn(s: TrainState) -> None:
        result = monitor.measure(run.model(s), s.step)
        run.writer.write(s.step, result, "forgetting")
        line, stop = forgetting.assess(result, cfg, s.step)
        run.bar.log(line)
        if stop is not None:
            s.stopped = stop

    return fn


def save_checkpoint(run: Run):
    """Weights, optimizer state and what an exact resume needs: the RNG key, the data loader's position,
    the NaN guard's count, the forgetting baseline; plus the recipe and provenance, and the eval loss keep_best
    ranks by."""
    def fn(s: TrainState) -> None:
        meta = {"step": s.step, "rng": np.asarray(jax.random.key_data(s.key)).tolist(),
                "data_state": run.loader.get_state(), "config": to_dict(run.cfg), "provenance": run.provenance,
                "eval_loss": s.eval_loss, "bad_in_row": s.bad_in_row,
                "forgetting_baseline": forgetting.baseline_files(run.run_dir) if run.cfg.forgetting else None}
        run.ckpt.save(s.step, s.trainable, s.opt_state, meta, s.eval_loss)
        s.last_saved = s.step

    return fn


# --- preemption ------------------------------------------------------------------------------------------


class PreemptionNotice:
    """SIGTERM, the notice a spot or TPU VM gets before it is taken away, as a decision to stop that every
    process of the job takes at the same step (`agreed(step)`, called by all of them before each step).

    Where `jax.distributed` runs with its preemption service (on by default; jaxtune starts it on every TPU VM
    and multi-process job) JAX owns SIGTERM and `reached_preemption_sync_point` names the step. Otherwise a
    Python handler sets a flag (nothing else: no saving inside a signal handler), restored to the previous
    handler on exit, and several processes any-reduce their flags each step; one process reads its flag only.
    A handler can be installed in the main thread only, and not over one installed outside Python; then the
    notice is not watched."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.received = False
        self.multi = jax.process_count() > 1
        # Once jax.distributed runs (every TPU VM, one host or many) its preemption service owns SIGTERM.
        self.jax_sync = jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)
        self._previous = None

    def _flag(self, signum, frame) -> None:
        self.received = True

    def __enter__(self):
        if (self.enabled and not self.jax_sync and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) is not None):
            self._previous = signal.signal(signal.SIGTERM, self._flag)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def agreed(self, step: int) -> bool:
        """Whether the job stops before this step (`step` optimizer steps done)."""
        if not self.enabled or not (self.jax_sync or self.multi):
            return self.received
        from jax.experimental import multihost_utils

        if self.jax_sync:
            return multihost_utils.reached_preemption_sync_point(step)
        return bool(np.any(multihost_utils.process_allgather(np.asarray([self.received]))))
