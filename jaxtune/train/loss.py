"""Masked next-token cross-entropy in fp32, optionally blockwise so `[B, T, V]` logits never exist at once.

Returns *sums* (NLL, correct predictions, loss tokens): callers normalise by the loss-token count of the whole
(accumulated) batch, which is what makes K micro-batches equal one K× batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _chunk_sums(logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
    """A prediction is correct when the target's logit is the row maximum: the max that logsumexp needs
    anyway, instead of an argmax (a second pass over `[B, T, V]`). It differs from
    `argmax == target` only on an exact tie, where it counts the target as correct."""
    logits = logits.astype(jnp.float32)
    top = jnp.max(logits, axis=-1)
    # logsumexp with a constant shift (as jax.nn.logsumexp does): the max cancels out of the gradient.
    shift = jax.lax.stop_gradient(top)
    lse = shift + jnp.log(jnp.sum(jnp.exp(logits - shift[..., None]), axis=-1))
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    nll = jnp.sum((lse - tgt) * m)
    correct = jnp.sum((tgt >= top) * m)
    return nll, correct


def token_loss_sums(model, hidden: Array, targets: Array, loss_mask: Array, chunk: int | None = None):
    """`(nll_sum, correct_sum, n_tokens)` from final hidden states via `model.logits`.

    With `chunk`, the sequence is processed `chunk` positions at a time under `jax.checkpoint`, so only one
    `[B, chunk, V]` block of logits is live in the forward and backward pass (152k-vocab models)."""
    n_tokens = jnp.sum(loss_mask.astype(jnp.float32))
    t = hidden.shape[1]
    if chunk is None or chunk >= t:
        nll, correct = _chunk_sums(model.logits(hidden), targets, loss_mask)
        return nll, correct, n_tokens
    if t % chunk:
        raise ValueError(f"loss chunk {chunk} must divide the sequence length {t}")
    n = t // chunk
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)  # noqa: E731

    @jax.checkpoint
    def body(carry, xs):
        h, y, m = xs
        nll, correct = _chunk_sums(model.logits(h), y, m)
        return (carry[0] + nll, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (nll, correct), _ = jax.lax.scan(body, (zero, zero), (split(hidden), split(targets), split(loss_mask)))
    return nll, correct, n_tokens


def sequence_nll(model, input_ids: Array, targets: Array, loss_mask: Array, segment_ids: Array | None = None,
                 positions: Array | None = None, chunk: int | None = None):
    """Forward + loss sums for one batch (the shared core of eval loss and perplexity)."""
    hidden = model.hidden_states(input_ids, segment_ids, positions)
    return token_loss_sums(model, hidden, targets, loss_mask, chunk)
