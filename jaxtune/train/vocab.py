"""Added special tokens: grow the tokenizer and the embedding / output head, and train just those rows.

A base model often lacks the tokens its chat template needs (`<|im_start|>`…), or has them but never
trained them. Such tokens are added to the tokenizer, the embedding (and an untied `lm_head`) grows to the
tokenizer's size with the new rows set to the mean of the old ones (an average token, so the new logits
start in range), and just those rows join the trainable tree (`TokenRows`): with LoRA the rest of the
embedding stays bit-for-bit frozen, and the optimizer keeps state for `n_new × d` values, not the whole
vocabulary. (The PEFT adapter format cannot carry such rows; export them through the merged model.)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.model.sharding import variable_sharding

EMBEDDING_PATHS = (("embed_tokens", "weight"), ("lm_head", "weight"))


def add_special_tokens(tokenizer, tokens: Sequence[str]) -> list[int]:
    """Add the `tokens` the tokenizer lacks as special tokens (never split); return every token's id."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_tokens(list(missing), special_tokens=True)
    return [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]


def _grow(var: nnx.Variable, rows: int) -> None:
    old = var[...]
    mean = jnp.mean(old.astype(jnp.float32), axis=0, keepdims=True).astype(old.dtype)
    new = jnp.concatenate([old, jnp.repeat(mean, rows - old.shape[0], axis=0)], axis=0)
    sharding = getattr(old, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        new = jax.device_put(new, variable_sharding(var, sharding.mesh))
    var.set_value(new)


def resize_vocab(model, vocab_size: int) -> bool:
    """Grow `embed_tokens` (and an untied `lm_head`) to `vocab_size` rows in place; False if already that
    size. Shrinking is refused: it would drop rows the tokenizer may still emit."""
    current = model.config.vocab_size
    if vocab_size == current:
        return False
    if vocab_size < current:
        raise ValueError(f"tokenizer has {vocab_size} tokens but the model's embedding has {current} rows; "
                         "jaxtune only grows the vocabulary (extra embedding rows are harmless)")
    _grow(model.embed_tokens.weight, vocab_size)
    if model.lm_head is not None:
        _grow(model.lm_head.weight, vocab_size)
        model.lm_head.out_features = vocab_size
    model.config = model.config.replace(vocab_size=vocab_size)
    return True


def prepare_vocab(model, tokenizer, tokens: Sequence[str]) -> list[int]:
    """Add `tokens` to the tokenizer, grow the model to match, and return the ids whose rows must train."""
    if not tokens:
        return []
    ids = add_special_tokens(tokenizer, tokens)
    resize_vocab(model, max(len(tokenizer), model.config.vocab_size))
    return ids


def _is_embedding(path, value) -> bool:
    return isinstance(value, nnx.Param) and tuple(map(str, path[-2:])) in EMBEDDING_PATHS


@dataclasses.dataclass(frozen=True)
class TokenRows:
    """Embedding rows that train although their matrix is frozen: the trainable tree holds just those rows
    (`{"embed_tokens": [n, d], "lm_head": [n, d]}`) and `apply` scatters them into the frozen matrices
    inside the step, so neither a vocabulary-sized gradient nor optimizer state ever exists."""

    ids: tuple[int, ...]
    paths: tuple[tuple[str, ...], ...]

    def init(self, frozen: nnx.State) -> dict:
        """The rows' current values (abstract shapes for an abstract model)."""
        flat = dict(nnx.to_flat_state(frozen))
        idx = np.asarray(self.ids)

        def take(value):
            if isinstance(value, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct((len(idx), *value.shape[1:]), value.dtype)
            return jnp.asarray(value[idx])

        return {path[0]: take(flat[path].get_value()) for path in self.paths}

    def apply(self, frozen: nnx.State, rows: dict) -> nnx.State:
        flat = dict(nnx.to_flat_state(frozen))
        idx = np.asarray(self.ids)
        for path in self.paths:
            var = flat[path]
            flat[path] = var.replace(var[...].at[idx].set(rows[path[0]].astype(var.dtype)))
        return nnx.from_flat_state(flat)


def split_model(model, trainable_filter, token_ids: Sequence[int] = ()):
    """`(graphdef, trainable, frozen, token_rows)`. Without rows to train (no added tokens, or the
    embeddings already train in full), `trainable` is the filter's State and `token_rows` None; otherwise
    `trainable` is `{"params": State, "token_rows": {matrix: rows}}`."""
    graphdef, params, frozen = nnx.split(model, trainable_filter, ...)
    paths = tuple(tuple(map(str, p)) for p, v in nnx.to_flat_state(frozen) if _is_embedding(p, v))
    if not token_ids or not paths:
        return graphdef, params, frozen, None
    rows = TokenRows(tuple(int(i) for i in token_ids), paths)
    return graphdef, {"params": params, "token_rows": rows.init(frozen)}, frozen, rows


def merge_model(graphdef, trainable, frozen, token_rows: TokenRows | None = None):
    """The model a step sees: `nnx.merge` of the partitions, with trained token rows scattered in."""
    if token_rows is None:
        return nnx.merge(graphdef, trainable, frozen)
    return nnx.merge(graphdef, trainable["params"], token_rows.apply(frozen, trainable["token_rows"]))
