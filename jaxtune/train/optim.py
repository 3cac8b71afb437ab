"""Optimizer from the recipe's `optim:` section: AdamW / Adafactor / SGD, warmup + decay, clipping, decay mask.

Built on the trainable partition only (see `lora.split_trainable`), so frozen base weights never get
optimizer state. Gradient accumulation is `accumulate_grads`: summed token NLL over micro-batches divided
by the loss-token count of the whole batch, not `optax.MultiSteps` (a mean of per-micro-batch means, which
over-weights the tokens of short examples).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax


OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """`eps`, `b1`, `b2` are AdamW's; `momentum` is SGD's (0 = plain SGD); `max_grad_norm` 0 disables
    clipping; `min_lr_ratio` is the final learning rate as a fraction of `lr` for cosine/linear decay."""

    name: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum_steps: int = 1

    def __post_init__(self):
        def need(ok: bool, field: str, rule: str):
            if not ok:
                raise ValueError(f"optim.{field}={getattr(self, field)!r}: {rule}; "
                                 "fix the optim: section of the recipe")

        need(self.name in OPTIMIZERS, "name", f"expected one of {OPTIMIZERS}")
        need(self.schedule in SCHEDULES, "schedule", f"expected one of {SCHEDULES}")
        for f in ("lr", "weight_decay", "b1", "b2", "eps", "momentum", "min_lr_ratio", "max_grad_norm"):
            need(isinstance(getattr(self, f), (int, float)) and not isinstance(getattr(self, f), bool), f,
                 "must be a number")
        for f in ("warmup_steps", "grad_accum_steps"):
            need(isinstance(getattr(self, f), int) and not isinstance(getattr(self, f), bool), f,
                 "must be an integer")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0 <= self.b1 < 1, "b1", "must be in [0, 1)")
        need(0 <= self.b2 < 1, "b2", "must be in [0, 1)")
        need(self.eps > 0, "eps", "must be > 0")
        need(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        need(self.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")


def lr_schedule(cfg: OptimConfig, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine/linear decay to `lr·min_lr_ratio` at
    `total_steps` (optimizer steps), or constant."""
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}: the run must have at least one optimizer step")
    if cfg.warmup_steps > total_steps:
        raise ValueError(f"optim.warmup_steps={cfg.warmup_steps} exceeds the run's {total_steps} optimizer steps")
    peak, end, warm = cfg.lr, cfg.lr * cfg.min_lr_ratio, cfg.warmup_steps
    decay_steps = max(total_steps - warm, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def make_optimizer(cfg: OptimConfig, total_steps: int, params=None) -> optax.GradientTransformation:
    """Clip by global norm, then the chosen optimizer with decoupled weight decay masked by `decay_mask`.

    `params` (the trainable partition), when given, is checked to be non-empty: an optimizer built on
    nothing would train nothing silently."""
    if params is not None and not jax.tree.leaves(params):
        raise ValueError("make_optimizer: the trainable partition is empty (nothing would be trained)")
    lr = lr_schedule(cfg, total_steps)
    wd = cfg.weight_decay
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=decay_mask)
    elif cfg.name == "adafactor":
        opt = optax.adafactor(lr, multiply_by_parameter_scale=False, weight_decay_rate=wd or None,
                              weight_decay_mask=decay_mask)
    else:
        opt = optax.chain(optax.add_decayed_weights(wd, mask=decay_mask) if wd else optax.identity(),
                          optax.sgd(lr, momentum=cfg.momentum or None))
    if cfg.max_grad_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
    return opt


def accumulate_grads(loss_sums_fn, params, micro_batches):
    """Mean token loss and its gradient over K micro-batches (leading axis of every `micro_batches` leaf).

    `loss_sums_fn(params, batch) -> (nll_sum, n_tokens, metrics)` returns sums (see
    `train.loss.token_loss_sums`). Gradients of the NLL sums are accumulated in fp32 by a scan and divided
    once by the batch's total loss tokens, so K micro-batches equal one K× batch whatever the example
    lengths. Returns `(loss, grads, n_tokens, metrics)` with grads in each parameter's dtype and `metrics`
    summed over micro-batches."""

    def f(p, batch):
        nll, n, metrics = loss_sums_fn(p, batch)
        return nll, (n, metrics)

    grad_fn = jax.value_and_grad(f, has_aux=True)

    def body(carry, batch):
        g_acc, nll_acc, n_acc, m_acc = carry
        (nll, (n, metrics)), g = grad_fn(params, batch)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        m_acc = jax.tree.map(jnp.add, m_acc, metrics)
        return (g_acc, nll_acc + nll, n_acc + n, m_acc), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    if jax.tree.leaves(micro_batches)[0].shape[0] == 1:
        # One micro-batch: no scan. A loop body is a fusion and buffer-assignment boundary for XLA, and the
        # loop costs compile time; the arithmetic is the same as the scan's first iteration.
        (nll, (n, metrics)), g = grad_fn(params, first)
        g = jax.tree.map(lambda b: b.astype(jnp.float32), g)
    else:
        _, (_, metrics_shape) = jax.eval_shape(f, params, first)
        zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), jnp.zeros((), jnp.float32),
                 jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape))
        (g, nll, n, metrics), _ = jax.lax.scan(body, zeros, micro_batches)
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda a, p: (a / denom).astype(p.dtype), g, params)
    return nll / denom, grads, n, metrics

def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def decay_mask(params):
    """Pytree of bools, True where weight decay applies: matrices only, never norms, biases or embeddings
    (LoRA A/B and untied lm_head decay). Works on any pytree whose key paths carry the NNX names."""

    def decays(path, leaf) -> bool:
        names = [_key_name(k) for k in path]
        if any("norm" in n or n in ("bias", "embed_tokens") for n in names):
            return False
        return getattr(leaf, "ndim", 0) >= 2

    return jax.tree_util.tree_map_with_path(decays, params)
