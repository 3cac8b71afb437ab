"""Autoregressive decoding with a preallocated KV cache: one jitted prefill, then one decode step per token.

The decode step is a pure function of `(graphdef, state, carry)`. `generate` runs it inside a
`lax.while_loop` (whole batch on device, no host round trips); `stream` calls the same step, jitted on its own,
once per token so a chat can print as it goes. Prompts of different lengths are left-padded: pad slots get
segment 0 (invisible to attention) and each row counts its own positions from its first real token, so a row's
logits do not depend on the other rows in the batch (greedy batched = one by one). Prompt lengths are rounded
up to a bucket and sampling knobs are traced values, so similar requests reuse one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
MAX_STOP_IDS = 8
_NO_TOKEN = -1


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` is greedy; `top_k == 0` and `top_p == 1` switch those filters off."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 means no top-k filter)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 means no nucleus filter)")
        if len(self.stop_ids) > MAX_STOP_IDS:
            raise ValueError(f"{len(self.stop_ids)} stop ids given; at most {MAX_STOP_IDS} are supported")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class Generation:
    """New tokens per prompt (stop token excluded), why each row ended ("stop" or "length") and the stop
    token it ended on (None for "length")."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    stop_tokens: list[int | None]


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def stop_token_ids(model_config, tokenizer=None, chat_template: str | None = None, extra=(),
                   generation: dict | None = None) -> list[int]:
    """The one stop-token rule: every id generation stops at, in order without duplicates: the config's and
    generation config's EOS (`generation`, else the one the model was loaded with), `extra`, the tokenizer's
    EOS, and the end-of-turn markers the chat template
    (`chat_template`, else the tokenizer's) actually emits (e.g. `<|im_end|>` next to `<|endoftext|>`)."""
    from jaxtune.data.chat import END_OF_TURN

    loaded = getattr(model_config, "generation_eos_token_id", ())
    ids = _ids(model_config.eos_token_id) + _ids((generation or {}).get("eos_token_id", list(loaded))) + _ids(extra)
    if tokenizer is not None:
        ids += _ids(getattr(tokenizer, "eos_token_id", None))
        template = chat_template or getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = "\n".join(template.values())
        if template:
            vocab = tokenizer.get_vocab()
            ids += [vocab[m] for m in END_OF_TURN if m in template and m in vocab]
    return list(dict.fromkeys(ids))


def sample_logits(logits: Array, key: Array, temperature: Array, top_k: Array, top_p: Array, greedy: bool) -> Array:
    """`[B, V]` fp32 logits → `[B]` token ids. Filters apply in HF's order: temperature, top-k, then top-p.

    `top_k`/`top_p`/`temperature` are traced scalars, so changing them does not recompile."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    vocab = logits.shape[-1]
    logits = logits / temperature
    ranked = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jax.lax.dynamic_index_in_dim(ranked, k - 1, axis=-1, keepdims=True)
    ranked = jnp.where(jnp.arange(vocab) < k, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
    nucleus_min = jnp.take_along_axis(ranked, n_keep - 1, axis=-1)
    cutoff = jnp.maximum(kth, nucleus_min)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _knobs(params: SamplingParams) -> tuple[Array, Array, Array, Array, Array]:
    stop = np.full((MAX_STOP_IDS,), _NO_TOKEN, np.int32)
    stop[: len(params.stop_ids)] = params.stop_ids
    return (jnp.asarray(max(params.temperature, 1e-6), jnp.float32), jnp.asarray(params.top_k, jnp.int32),
            jnp.asarray(params.top_p, jnp.float32), jnp.asarray(stop), jax.random.key(params.seed))


def _pick(logits, step, knobs, greedy):
    """Step `step`'s token; its key is `fold_in(seed key, step)`, so both decode paths draw the same numbers."""
    temperature, top_k, top_p, _, seed_key = knobs
    key = jax.random.fold_in(seed_key, step)
    return sample_logits(logits.astype(jnp.float32), key, temperature, top_k, top_p, greedy)


def prefill(graphdef, state, ids, seg, pos, knobs, *, cache_len: int, max_new: int, greedy: bool) -> dict:
    """Run the padded prompts through the model, sample the first new token, return the decode carry."""
    model = nnx.merge(graphdef, state)
    b = ids.shape[0]
    logits, cache = model(ids, seg, pos, cache=model.init_cache(b, cache_len))
    tok = _pick(logits[:, -1], 0, knobs, greedy)
    tokens = jnp.full((b, max_new), _NO_TOKEN, jnp.int32).at[:, 0].set(tok)
    carry = {"cache": cache, "last": tok, "pos": pos[:, -1] + 1, "done": jnp.isin(tok, knobs[3]),
             "step": jnp.ones((), jnp.int32), "tokens": tokens}
    if model.config.rope_type == "longrope":
        carry["prompt"] = (ids, seg, pos)
    return carry


def _reencode(model, carry: dict):
    """longrope's switch as transformers makes it: on the first step past the original context it drops the
    cache and re-encodes prompt and output so far, every key rotated with the long factors. Returns the
    logits of the step's last token and the rebuilt cache, positioned where the cached step would leave it."""
    ids, seg, pos = carry["prompt"]
    (b, p), n = ids.shape, carry["tokens"].shape[1]
    written = (jnp.arange(n) < carry["step"]) & (carry["tokens"] != _NO_TOKEN)
    full = (jnp.concatenate([ids, jnp.where(written, carry["tokens"], 0)], 1),
            jnp.concatenate([seg, written.astype(jnp.int32)], 1),
            jnp.concatenate([pos, pos[:, -1:] + 1 + jnp.arange(n, dtype=pos.dtype)], 1))
    logits, cache = model(*full, cache=model.init_cache(b, carry["cache"]["segment_ids"].shape[1]))
    end = p + carry["step"]
    return jax.lax.dynamic_slice_in_dim(logits, end - 1, 1, axis=1), {**cache, "index": end}


def decode_step(graphdef, state, carry: dict, knobs, *, greedy: bool) -> dict:
    """Feed each row's last token, sample the next; finished rows keep their output and record nothing."""
    model = nnx.merge(graphdef, state)
    b = carry["last"].shape[0]

    def cached():
        return model(carry["last"][:, None], jnp.ones((b, 1), jnp.int32), carry["pos"][:, None],
                     cache=carry["cache"])

    if "prompt" in carry:
        switch = jnp.max(carry["pos"]) == model.config.rope_original_max_position
        logits, cache = jax.lax.cond(switch, lambda: _reencode(model, carry), cached)
    else:
        logits, cache = cached()
    tok = _pick(logits[:, 0], carry["step"], knobs, greedy)
    done = carry["done"]
    written = jnp.where(done, _NO_TOKEN, tok)
    tokens = jax.lax.dynamic_update_slice_in_dim(carry["tokens"], written[:, None], carry["step"], axis=1)
    return {**carry, "cache": cache, "last": jnp.where(done, carry["last"], tok), "pos": carry["pos"] + 1,
            "done": done | jnp.isin(tok, knobs[3]), "step": carry["step"] + 1, "tokens": tokens}


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "max_new", "greedy"))
def _generate_jit(graphdef, state, ids, seg, pos, knobs, *, cache_len, max_new, greedy):
    carry = prefill(graphdef, state, ids, seg, pos, knobs, cache_len=cache_len, max_new=max_new, greedy=greedy)

    def cond(c):
        return (c["step"] < max_new) & ~jnp.all(c["done"])

    carry = jax.lax.while_loop(cond, lambda c: decode_step(graphdef, state, c, knobs, greedy=greedy), carry)
    return carry["tokens"], carry["done"]


_prefill_jit = jax.jit(prefill, static_argnames=("graphdef", "cache_len", "max_new", "greedy"))


@functools.lru_cache(maxsize=16)
def _stepper(graphdef, greedy: bool):
    """`decode_step` jitted with the graphdef bound: hashing a GraphDef costs milliseconds, so streaming
    hashes it once per reply instead of once per token."""
    return jax.jit(functools.partial(decode_step, graphdef, greedy=greedy), donate_argnums=(1,))


def pad_prompts(prompts: Sequence[Sequence[int]], bucket: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad to a multiple of `bucket`: `(ids, segment_ids, positions)` int32 `[B, P]`, pads segment 0."""
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. the BOS id)")
    longest = max(len(p) for p in prompts)
    width = -(-longest // bucket) * bucket
    ids = np.zeros((len(prompts), width), np.int32)
    seg = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = np.asarray(p, np.int32)
        seg[i, width - len(p):] = 1
    pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return ids, seg, pos


def _finish(tokens: np.ndarray, done: np.ndarray) -> Generation:
    out, reasons, stops = [], [], []
    for row, stopped in zip(tokens.tolist(), done.tolist()):
        row = [t for t in row if t != _NO_TOKEN]
        stops.append(row.pop() if stopped else None)
        out.append(row)
        reasons.append("stop" if stopped else "length")
    return Generation(out, reasons, stops)


def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams = SamplingParams(), *,
             bucket: int = 32) -> Generation:
    """Decode a batch of token-id prompts (any lengths) on device in one call."""
    ids, seg, pos = pad_prompts(prompts, bucket)
    graphdef, state = nnx.split(model)
    tokens, done = _generate_jit(graphdef, state, ids, seg, pos, _knobs(params),
                                 cache_len=ids.shape[1] + params.max_new_tokens, max_new=params.max_new_tokens,
                                 greedy=params.greedy)
    return _finish(np.asarray(tokens), np.asarray(done))


def stream(model, prompt: Sequence[int], params: SamplingParams = SamplingParams(), *,
           bucket: int = 32) -> Iterator[int]:
    """Yield new tokens of one prompt as they are sampled (stop token not yielded); same step as `generate`."""
    ids, seg, pos = pad_prompts([prompt], bucket)
    graphdef, state = nnx.split(model)
    knobs = _knobs(params)
    carry = _prefill_jit(graphdef, state, ids, seg, pos, knobs, cache_len=ids.shape[1] + params.max_new_tokens,
                         max_new=params.max_new_tokens, greedy=params.greedy)
    step_fn = _stepper(graphdef, params.greedy)
    for step in range(params.max_new_tokens):
        if step:
            carry = step_fn(state, carry, knobs)
        done, last = jax.device_get((carry["done"], carry["last"]))
        if done[0]:
            return
        yield int(last[0])


def generate_text(model, tokenizer, prompts: Sequence[str], params: SamplingParams | None = None, *,
                  add_special_tokens: bool = True, bucket: int = 32) -> list[str]:
    """Text in, text out; stops on the model's and tokenizer's EOS unless `params.stop_ids` says otherwise."""
    params = params or SamplingParams()
    if not params.stop_ids:
        params = dataclasses.replace(params, stop_ids=tuple(stop_token_ids(model.config, tokenizer)))
    encoded = [tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
    result = generate(model, encoded, params, bucket=bucket)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]


def generate_many(model, prompts: Sequence[Sequence[int]], params: SamplingParams, *, batch_size: int = 8,
                  bucket: int = 32) -> Generation:
    """Many prompts in length-sorted batches (less padding, few distinct shapes); results in input order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batch_size = max(1, min(batch_size, len(prompts)))
    tokens: list[list[int] | None] = [None] * len(prompts)
    reasons: list[str | None] = [None] * len(prompts)
    stops: list[int | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = [prompts[i] for i in idx]
        # Top up the last batch so every batch has one shape (rows are independent, the extras are dropped).
        batch += [batch[-1]] * (batch_size - len(batch))
        gen = generate(model, batch, params, bucket=bucket)
        for j, i in enumerate(idx):
            tokens[i], reasons[i], stops[i] = gen.tokens[j], gen.finish_reasons[j], gen.stop_tokens[j]
    return Generation(tokens, reasons, stops)


def prompt_ids(tokenizer, user_text: str, template: str | None = None, history: Sequence[dict] = ()) -> list[int]:
    """Token ids that ask the model for the next assistant turn, tokenized as training tokenizes them.

    `template` is Jinja text (see `data.chat.resolve_template`); None means a raw completion prompt."""
    if template is None:
        return list(tokenizer.encode(user_text))
    from jaxtune.data.tokenize import adds_bos

    messages = [*history, {"role": "user", "content": user_text}]
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if adds_bos(tokenizer) and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def load_for_inference(model_dir: str, adapter: str | None = None, *, tokenizer: str | None = None,
                       dtype: str = "float32"):
    """`(model, tokenizer)` from an HF model dir, optionally with a PEFT adapter on top. The tokenizer comes
    from `tokenizer`, else the adapter dir when it carries one (jaxtune's export saves the training chat
    template there), else the model dir."""
    from pathlib import Path

    from jaxtune.hf.load import load_pretrained, load_tokenizer
    from jaxtune.model.config import parse_dtype

    model = load_pretrained(model_dir, parse_dtype(dtype, "--dtype"))
    if adapter:
        from jaxtune.lora.peft import load_peft_adapter

        model = load_peft_adapter(model, adapter)
    if tokenizer is None:
        tokenizer = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_dir
    return model, load_tokenizer(tokenizer)
