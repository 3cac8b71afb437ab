"""Pure SFT train and eval steps over `nnx.split` partitions, jitted once per run.

`train_step(graphdef, trainable, frozen, opt_state, batch, rng)` differentiates only the trainable
partition. A batch is `[B, T]` or `[K, B/K, T]` (K gradient-accumulation micro-batches, scanned); every
micro-batch's NLL sum is divided by the loss-token count of the *whole* batch, so K micro-batches give the
loss and gradients of one K× batch however unevenly the tokens fall. A non-finite loss or gradient leaves
parameters and optimizer state untouched (the loop decides whether to stop).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtune.model.moe import load_balancing_loss
from jaxtune.model.sharding import constrain_activations
from jaxtune.train.loss import token_loss_sums
from jaxtune.train.optim import accumulate_grads
from jaxtune.train.vocab import TokenRows, merge_model


def as_microbatches(batch: dict) -> dict:
    """`[B, T]` → `[1, B, T]`; `[K, b, T]` stays (shape-static, so this never retraces)."""
    return {k: (v[None] if v.ndim == 2 else v) for k, v in batch.items()}


def loss_sums(model, mb: dict, rng=None, loss_chunk: int | None = None, mesh: Mesh | None = None):
    """`(nll_sum, correct_sum, n_loss_tokens, router_aux_loss)` in fp32 for one `[b, T]` micro-batch; the
    auxiliary loss is HF's load-balancing loss over this micro-batch's real tokens (0 for a dense model)."""
    hidden, stats = model.hidden_states(mb["input_ids"], mb["segment_ids"], mb["positions"], dropout_rng=rng,
                                        router_stats=True)
    hidden = constrain_activations(hidden, mesh)
    aux = jnp.zeros((), jnp.float32) if stats is None else load_balancing_loss(stats)
    return (*token_loss_sums(model, hidden, mb["targets"], mb["loss_mask"], loss_chunk), aux)


def loss_and_grads(graphdef, trainable, frozen, batch: dict, rng, *, loss_chunk: int | None = None,
                   mesh: Mesh | None = None, token_rows: TokenRows | None = None):
    """Gradients of (total NLL / total loss tokens + the MoE auxiliary loss, weighted by the config's
    `router_aux_loss_coef` and averaged over micro-batches) w.r.t. `trainable` over the micro-batches (see
    `optim.accumulate_grads`), plus `(loss, correct, n_loss_tokens, n_tokens, router_aux_loss)`."""
    batch = as_microbatches(batch)
    k = batch["input_ids"].shape[0]
    rngs = jax.random.split(rng, k)
    # accumulate_grads divides the summed objective by the batch's loss tokens: the auxiliary term enters
    # pre-multiplied by that count, known from the mask before any forward.
    n_total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

    def sums(params, mb):
        mb, r = mb
        model = merge_model(graphdef, params, frozen, token_rows)
        nll, correct, n, aux = loss_sums(model, mb, r, loss_chunk, mesh)
        metrics = {"correct": correct, "tokens": jnp.sum((mb["segment_ids"] > 0).astype(jnp.float32)),
                   "router_aux_loss": aux / k}
        return nll + model.config.router_aux_loss_coef * n_total / k * aux, n, metrics

    loss, grads, n_loss, m = accumulate_grads(sums, trainable, (batch, rngs))
    return grads, (loss, m["correct"], n_loss, m["tokens"], m["router_aux_loss"])


def train_step(graphdef, trainable, frozen, opt_state, batch: dict, rng, *, tx: optax.GradientTransformation,
               loss_chunk: int | None = None, mesh: Mesh | None = None, token_rows: TokenRows | None = None):
    """One optimizer step (`token_rows`: see `vocab.split_model`)."""
    grads, (loss, correct, n_loss, n_tokens, aux) = loss_and_grads(graphdef, trainable, frozen, batch, rng,
                                                              loss_chunk=loss_chunk, mesh=mesh,
                                                              token_rows=token_rows)
    # `clip_by_global_norm` inside `tx` computes this norm again in the branch below (XLA cannot share a value
    # across the branch boundary): one more read of the gradients, far cheaper than the copies a select cost.
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update():
        updates, new_opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), new_opt_state

    # A branch, not a select per leaf: with `jnp.where(apply, new, old)` XLA copied every donated moment
    # buffer each step (2 per parameter) to keep `old` alive next to the in-place `new`.
    new_params, new_opt_state = jax.lax.cond(finite & (n_loss > 0), update, lambda: (trainable, opt_state))
    metrics = {
        "loss": loss,
        "accuracy": correct / jnp.maximum(n_loss, 1.0),
        "grad_norm": grad_norm,
        "loss_tokens": n_loss,
        "tokens": n_tokens,
        "finite": finite,
    }
    if merge_model(graphdef, trainable, frozen, token_rows).config.router_aux_loss_coef:
        metrics["router_aux_loss"] = aux
    return new_params, new_opt_state, metrics


def eval_step(graphdef, trainable, frozen, batch: dict, *, loss_chunk: int | None = None,
              mesh: Mesh | None = None, token_rows: TokenRows | None = None) -> dict:
    """NLL and correct-prediction *sums* and the loss-token count, so callers can average over a dataset."""
    model = merge_model(graphdef, trainable, frozen, token_rows)
    batch = as_microbatches(batch)
    sums = [loss_sums(model, {k: v[i] for k, v in batch.items()}, None, loss_chunk, mesh)
            for i in range(batch["input_ids"].shape[0])]
    nll, correct, n = (sum(s[j] for s in sums) for j in range(3))  # the MoE auxiliary loss is a training term
    return {"nll_sum": nll, "correct_sum": correct, "loss_tokens": n}


def jit_train_step(tx: optax.GradientTransformation, *, mesh: Mesh | None = None, trainable_shardings=None,
                   opt_shardings=None, loss_chunk: int | None = None, token_rows: TokenRows | None = None):
    """`train_step` jitted once: graphdef static, trainable and optimizer state donated, and outputs pinned
    to the input shardings so step 2 sees the same layouts as step 1 (no recompilation)."""
    fn = functools.partial(train_step, tx=tx, loss_chunk=loss_chunk, mesh=mesh, token_rows=token_rows)
    kw = {}
    if mesh is not None and trainable_shardings is not None:
        kw["out_shardings"] = (trainable_shardings, opt_shardings, NamedSharding(mesh, P()))
    return jax.jit(fn, static_argnums=0, donate_argnums=(1, 3), **kw)


def jit_eval_step(*, mesh: Mesh | None = None, loss_chunk: int | None = None, token_rows: TokenRows | None = None):
    return jax.jit(functools.partial(eval_step, loss_chunk=loss_chunk, mesh=mesh, token_rows=token_rows),
                   static_argnums=0)
