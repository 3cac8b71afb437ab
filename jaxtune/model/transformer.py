"""The decoder-only transformer shared by every supported family (nanoGPT-sized on purpose).

Tree (HF names minus the `model.` prefix): `embed_tokens.weight`, `layers[i].self_attn.{q,k,v,o}_proj` (or
Phi-3's fused `qkv_proj`), `layers[i].mlp.{gate,up,down}_proj` (or `gate_up_proj`, or an MoE's `gate` and
`experts`), the layer's norms where its layout puts them (`NORM_SLOTS`), `norm`, `lm_head`.
With `scan_layers` the layers are one stacked `DecoderLayer` whose leaves carry a leading layer axis (two
stacks, `layers` and `dense_layers`, where dense and MoE layers are mixed: see `ModelConfig.layer_stacks`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.model.attention import attention
from jaxtune.model.attention import prepare as prepare_attention
from jaxtune.model.config import ModelConfig
from jaxtune.model.layers import MLP, Embed, Linear, RMSNorm, apply_rope, rope_frequencies
from jaxtune.model.moe import MoE

Array = jax.Array
_LINEARS_PER_LAYER = 7


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.fused_qkv:
            self.qkv_proj = Linear(d, q + 2 * kv, bias=cfg.qkv_bias, axes=("q_heads", "embed"), **kw)
        else:
            self.q_proj = Linear(d, q, bias=cfg.qkv_bias, axes=("q_heads", "embed"), **kw)
            self.k_proj = Linear(d, kv, bias=cfg.qkv_bias, axes=("kv_heads", "embed"), **kw)
            self.v_proj = Linear(d, kv, bias=cfg.qkv_bias, axes=("kv_heads", "embed"), **kw)
        self.o_proj = Linear(q, d, bias=cfg.o_bias, axes=("embed", "q_heads"), **kw)
        norm = dict(param_dtype=param_dtype, style=cfg.norm_style)
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, axes=("head_dim",), **norm)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, axes=("head_dim",), **norm)
        elif cfg.qk_norm == "projection":  # a norm over all heads: a cross-shard reduction under tensor parallelism
            self.q_norm = RMSNorm(q, cfg.rms_norm_eps, axes=("q_heads",), **norm)
            self.k_norm = RMSNorm(kv, cfg.rms_norm_eps, axes=("kv_heads",), **norm)

    def _qkv(self, x, r):
        cfg = self.cfg
        if cfg.fused_qkv:
            q_size = cfg.num_attention_heads * cfg.head_dim
            return jnp.split(self.qkv_proj(x, r[0]), [q_size, q_size + cfg.num_key_value_heads * cfg.head_dim], -1)
        return self.q_proj(x, r[0]), self.k_proj(x, r[1]), self.v_proj(x, r[2])

    def __call__(self, x, *, positions, q_idx, q_seg, sliding, kv, rngs):
        cfg = self.cfg
        b, t, _ = x.shape
        r = rngs or (None,) * 4
        q, k, v = self._qkv(x, r)
        if cfg.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_frequencies(cfg, positions, sliding)
        q = apply_rope(q, positions, inv_freq, cfg.rope_attention_factor)
        k = apply_rope(k, positions, inv_freq, cfg.rope_attention_factor)
        k_idx, k_seg, new_kv = q_idx, q_seg, None
        if kv is not None:
            k, v, k_idx, k_seg, new_kv = write_kv(kv, k, v, q_idx, q_seg)
        window = cfg.sliding_window if any(cfg.sliding_layers) else None
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), q_idx=q_idx, k_idx=k_idx, q_seg=q_seg,
                        k_seg=k_seg, window=window, sliding=sliding, impl=cfg.attention_impl,
                        scale=cfg.attention_scale, softcap=cfg.attn_softcap)
        return self.o_proj(out.reshape(b, t, -1), r[3]), new_kv


def write_kv(kv: dict, k: Array, v: Array, q_idx: Array, q_seg: Array):
    """This step's keys and values written into one layer's cache: the keys, values, slot indices and segment
    ids to attend over, and the updated `{"k", "v"}`.

    A full cache holds every slot and is written at `kv["index"]`. A rolling cache (`"where"` in `kv`, sliding
    layers) holds the last W slots: the step attends over the old ring followed by its own keys (ring entries
    the window has left are masked by their slot index), then writes its last min(T, W) keys at `where`."""
    if "where" in kv:
        where = kv["where"]
        m = where.shape[0]
        new = {"k": kv["k"].at[:, where].set(k[:, -m:].astype(kv["k"].dtype)),
               "v": kv["v"].at[:, where].set(v[:, -m:].astype(kv["v"].dtype))}
        return (jnp.concatenate([kv["k"], k.astype(kv["k"].dtype)], 1),
                jnp.concatenate([kv["v"], v.astype(kv["v"].dtype)], 1),
                jnp.concatenate([kv["slots"], q_idx], 1), jnp.concatenate([kv["segment_ids"], q_seg], 1), new)
    start = kv["index"]
    k_all = jax.lax.dynamic_update_slice_in_dim(kv["k"], k.astype(kv["k"].dtype), start, axis=1)
    v_all = jax.lax.dynamic_update_slice_in_dim(kv["v"], v.astype(kv["v"].dtype), start, axis=1)
    k_seg = kv["segment_ids"]
    k_idx = jnp.broadcast_to(jnp.arange(k_all.shape[1], dtype=jnp.int32), k_seg.shape)
    return k_all, v_all, k_idx, k_seg, {"k": k_all, "v": v_all}


# Each layout's norms by where they sit (attention input, attention output, MLP input, MLP output) → HF name.
# `post_attention_layernorm` is the MLP's input norm in Llama but the attention's output norm in Gemma 2/OLMo 2.
NORM_SLOTS = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),
}


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, moe: bool = False, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.slots, self.residual_multiplier = NORM_SLOTS[cfg.norm_layout], cfg.residual_multiplier
        for name in filter(None, self.slots):
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype,
                                        style=cfg.norm_style))
        self.self_attn = Attention(cfg, **kw)
        self.moe = moe
        self.mlp = MoE(cfg, **kw) if moe else MLP(cfg, **kw)

    def norm(self, slot: int, x: Array) -> Array:
        name = self.slots[slot]
        return x if name is None else getattr(self, name)(x)

    def feed_forward(self, x, q_seg, rngs):
        """The MLP's output and, for routed experts, the routing statistics of this layer's real tokens."""
        if self.moe:
            return self.mlp(x, q_seg > 0)
        return self.mlp(x, rngs), None

    def __call__(self, x, *, positions, q_idx, q_seg, sliding, kv=None, dropout_rng=None):
        """`(x, new_kv, routing stats or None)`."""
        r = (None,) * _LINEARS_PER_LAYER  # one dropout key per LoRA linear: q, k, v, o, gate, up, down
        if dropout_rng is not None:
            r = tuple(jax.random.split(dropout_rng, _LINEARS_PER_LAYER))
        h, new_kv = self.self_attn(self.norm(0, x), positions=positions, q_idx=q_idx, q_seg=q_seg,
                                   sliding=sliding, kv=kv, rngs=r[:4])
        x = x + self.norm(1, h) * self.residual_multiplier
        h, stats = self.feed_forward(self.norm(2, x), q_seg, r[4:])
        x = x + self.norm(3, h) * self.residual_multiplier
        return x, new_kv, stats


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _prepend_layer_axis(module: nnx.Module) -> None:
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable) and "axes" in var.get_metadata():
            var.set_metadata("axes", ("layers", *var.axes))


class Transformer(nnx.Module):
    """`logits = model(input_ids, segment_ids=None, positions=None)` → `[batch, seq, vocab]`."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs | None = None):
        prepare_attention(cfg.attention_impl)
        rngs = rngs or nnx.Rngs(0)
        param_dtype = param_dtype or dtype
        self.config, self.dtype = cfg, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)

        def stacked(n: int, moe: bool):
            @nnx.split_rngs(splits=n)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stack(r):
                return DecoderLayer(cfg, moe=moe, rngs=r, **kw)

            return stack(rngs)

        for name, layers in cfg.layer_stacks.items():
            setattr(self, name, stacked(len(layers), cfg.moe_layers[layers[0]]))
            _prepend_layer_axis(getattr(self, name))
        if not cfg.scan_layers:
            self.layers = nnx.List([DecoderLayer(cfg, moe=moe, rngs=rngs, **kw) for moe in cfg.moe_layers])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, style=cfg.norm_style)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, axes=("vocab", "embed"), rngs=rngs, **kw)

    def rolling_layers(self, max_len: int) -> tuple[bool, ...]:
        """Which layers' caches are rolling buffers of `sliding_window` slots: the sliding layers when the
        window is shorter than the cache, in the per-layer layout (a scanned stack shares one cache shape)."""
        cfg = self.config
        # longrope decoding re-encodes the whole sequence at its switch (generate._reencode), which a ring of
        # the last W slots cannot take in one write.
        if cfg.scan_layers or cfg.sliding_window is None or cfg.sliding_window >= max_len or \
                cfg.rope_type == "longrope":
            return (False,) * cfg.num_hidden_layers
        return cfg.sliding_layers

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """Preallocated KV cache, empty slots segment 0: `k`/`v` `[full layers, batch, max_len, kv_heads,
        head_dim]`, and for sliding layers (`rolling_layers`) `window_k`/`window_v` with `sliding_window`
        slots each, whose slot indices and segment ids are `window_slots`/`window_segment_ids`."""
        cfg = self.config
        dtype = dtype or self.dtype
        rolling = self.rolling_layers(max_len)
        per_layer = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        full = (rolling.count(False), *per_layer)
        cache = {"k": jnp.zeros(full, dtype), "v": jnp.zeros(full, dtype),
                 "segment_ids": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.zeros((), jnp.int32)}
        if any(rolling):
            w = cfg.sliding_window
            ring = (rolling.count(True), batch, w, *per_layer[2:])
            cache.update(window_k=jnp.zeros(ring, dtype), window_v=jnp.zeros(ring, dtype),
                         window_slots=jnp.zeros((batch, w), jnp.int32),
                         window_segment_ids=jnp.zeros((batch, w), jnp.int32))
        return cache

    def hidden_states(self, input_ids: Array, segment_ids: Array | None = None, positions: Array | None = None,
                      *, cache: dict | None = None, dropout_rng: Array | None = None, router_stats: bool = False):
        """Final-normed hidden states `[B, T, d]`, then the updated cache when one is given, then (with
        `router_stats`) the MoE routing statistics summed over layers (None for a dense model)."""
        cfg = self.config
        b, t = input_ids.shape
        seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        start = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
        q_idx = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if positions is None:
            positions = q_idx if segment_ids is None else segment_positions(seg)
        kv_seg = None
        if cache is not None:
            kv_seg = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], seg, start, axis=1)
        x = self.embed_tokens(input_ids)
        if cfg.embedding_multiplier != 1.0:  # Gemma's √d, cast to the activations' dtype as HF does
            x = x * jnp.asarray(cfg.embedding_multiplier, x.dtype)
        layer_rngs = None if dropout_rng is None else jax.random.split(dropout_rng, cfg.num_hidden_layers)
        layer = self._layer_fn(positions=positions, q_idx=q_idx, q_seg=seg)
        run_layers = self._scan_layers if cfg.scan_layers else self._loop_layers
        ring = self._ring_update(cache, seg, start) if cache is not None and "window_k" in cache else None
        x, new_cache, stats = run_layers(layer, x, cache, kv_seg, start, layer_rngs, ring)
        out = (self.norm(x),)
        if cache is not None:
            out += ({**new_cache, "segment_ids": kv_seg, "index": start + t},)
        if router_stats:
            out += (stats,)
        return out[0] if len(out) == 1 else out

    def _runs(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """Under scan, the layers in order as runs of consecutive layers of one stack: (stacked attribute,
        index of the run's first layer in it, the run's layers)."""
        runs: list = []
        for i in range(self.config.num_hidden_layers):
            name, j = self.config.stack_slot(i)
            if runs and runs[-1][0] == name:
                runs[-1] = (name, runs[-1][1], (*runs[-1][2], i))
            else:
                runs.append((name, j, (i,)))
        return runs

    def _traced_sliding(self) -> bool:
        """Which layers use the window is known at trace time, so it stays a Python bool (kernels pick one
        variant instead of a `lax.cond` between two, and `blockwise` skips blocks outside the window) except
        under scan over layers that differ, where it must be a scanned array."""
        cfg = self.config
        return cfg.scan_layers and any(len({cfg.sliding_layers[i] for i in layers}) > 1
                                       for _, _, layers in self._runs())

    def _layer_fn(self, **inputs):
        """`(layer, x, sliding, kv, rng) -> (x, new_kv, stats)`: one decoder layer on the step's shared `inputs`,
        rematerialised as `config.remat` asks."""
        cfg = self.config

        def run(layer, x, sliding, kv, rng):
            return layer(x, sliding=sliding, kv=kv, dropout_rng=rng, **inputs)

        if cfg.remat == "none":
            return run

        def pure(graphdef, state, x, sliding, kv, rng):
            return run(nnx.merge(graphdef, state), x, sliding, kv, rng)

        checkpointed = jax.checkpoint(pure, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers,
                                      static_argnums=(0,) if self._traced_sliding() else (0, 3))

        def rematerialised(layer, x, sliding, kv, rng):
            return checkpointed(*nnx.split(layer), x, sliding, kv, rng)

        return rematerialised

    def _scan_layers(self, run, x, cache, kv_seg, start, layer_rngs, ring=None):
        """Each run of stacked layers under `lax.scan` (a layer traces once per stack); returns x, the new
        cache's `{"k", "v"}` and the routing statistics summed over layers."""
        cfg = self.config
        traced = self._traced_sliding()
        kvs, stats = [], []
        for name, j0, layers in self._runs():
            i0, n = layers[0], len(layers)
            graphdef, state = nnx.split(getattr(self, name))
            if n < len(cfg.layer_stacks[name]):
                state = jax.tree.map(lambda a: a[j0:j0 + n], state)

            def body(x, xs, graphdef=graphdef, fixed=cfg.sliding_layers[i0]):
                st, sliding, kv, rng = xs
                x, new_kv, s = run(nnx.merge(graphdef, st), x, sliding if traced else fixed, kv, rng)
                return x, (new_kv, s)

            kv = None
            if cache is not None:
                kv = {"k": cache["k"][i0:i0 + n], "v": cache["v"][i0:i0 + n],
                      "segment_ids": jnp.broadcast_to(kv_seg, (n, *kv_seg.shape)),
                      "index": jnp.broadcast_to(start, (n,))}
            sliding = jnp.asarray(cfg.sliding_layers[i0:i0 + n]) if traced else None
            rngs = None if layer_rngs is None else layer_rngs[i0:i0 + n]
            x, (new_kv, s) = jax.lax.scan(body, x, (state, sliding, kv, rngs))
            kvs.append(new_kv)
            if s is not None:
                stats.append(jax.tree.map(lambda a: jnp.sum(a, axis=0), s))
        total = jax.tree.map(lambda *s: sum(s), *stats) if stats else None
        if cache is None:
            return x, None, total
        return x, {part: jnp.concatenate([kv[part] for kv in kvs]) for part in ("k", "v")}, total

    def _loop_layers(self, run, x, cache, kv_seg, start, layer_rngs, ring=None):
        """The layers one after another; returns what `_scan_layers` does."""
        cfg = self.config
        rolling = self.rolling_layers(cache["segment_ids"].shape[1]) if cache else (False,) * cfg.num_hidden_layers
        new = {"k": [], "v": [], "window_k": [], "window_v": []}
        stats = []
        for i, layer in enumerate(self.layers):
            kv = None
            if cache is not None and rolling[i]:
                j = rolling[:i].count(True)
                kv = {"k": cache["window_k"][j], "v": cache["window_v"][j], **ring["attend"]}
            elif cache is not None:
                j = rolling[:i].count(False)
                kv = {"k": cache["k"][j], "v": cache["v"][j], "segment_ids": kv_seg, "index": start}
            x, out, s = run(layer, x, cfg.sliding_layers[i], kv, None if layer_rngs is None else layer_rngs[i])
            if out is not None:
                prefix = "window_" if rolling[i] else ""
                new[prefix + "k"].append(out["k"])
                new[prefix + "v"].append(out["v"])
            if s is not None:
                stats.append(s)
        total = jax.tree.map(lambda *s: sum(s), *stats) if stats else None
        if cache is None:
            return x, None, total
        out = {name: jnp.stack(arrays) if arrays else cache[name] for name, arrays in new.items() if name in cache}
        return x, {**out, **(ring["state"] if ring else {})}, total

    @staticmethod
    def _ring_update(cache: dict, seg: Array, start: Array) -> dict:
        """For rolling caches: what each sliding layer attends over besides its own keys (`attend`: the old
        ring's slot indices and segment ids, and `where` the step's last min(T, W) keys go), and the new ring."""
        b, t = seg.shape
        w = cache["window_slots"].shape[1]
        m = min(t, w)
        where = (start + t - m + jnp.arange(m, dtype=jnp.int32)) % w
        slots = start + jnp.broadcast_to(jnp.arange(t - m, t, dtype=jnp.int32), (b, m))
        return {"attend": {"slots": cache["window_slots"], "segment_ids": cache["window_segment_ids"],
                           "where": where},
                "state": {"window_slots": cache["window_slots"].at[:, where].set(slots),
                          "window_segment_ids": cache["window_segment_ids"].at[:, where].set(seg[:, t - m:])}}

    def logits(self, hidden: Array) -> Array:
        cfg = self.config
        logits = self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        if cfg.logits_divisor != 1.0:
            logits = logits / cfg.logits_divisor
        if cfg.final_softcap is not None:
            logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits

    def __call__(self, input_ids: Array, segment_ids: Array | None = None, positions: Array | None = None,
                 *, cache: dict | None = None, dropout_rng: Array | None = None):
        out = self.hidden_states(input_ids, segment_ids, positions, cache=cache, dropout_rng=dropout_rng)
        if cache is None:
            return self.logits(out)
        return self.logits(out[0]), out[1]


def segment_positions(segment_ids: Array) -> Array:
    """Positions restarting at 0 at each new segment (packed rows); padding gets 0 where it starts a run."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    starts = jax.lax.cummax(jnp.where(new, idx, 0), axis=1)
    return idx - starts
