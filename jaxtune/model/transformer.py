"""The decoder-only transformer shared by every supported family (nanoGPT-sized on purpose).

Tree (HF names minus the `model.` prefix): `embed_tokens.weight`, `layers[i].self_attn.{q,k,v,o}_proj`,
`layers[i].mlp.{gate,up,down}_proj`, `layers[i].{input,post_attention}_layernorm`, `norm`, `lm_head`.
With `scan_layers` the layers are one stacked `DecoderLayer` whose leaves carry a leading layer axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.model.attention import attention
from jaxtune.model.attention import prepare as prepare_attention
from jaxtune.model.config import ModelConfig
from jaxtune.model.layers import MLP, Embed, Linear, RMSNorm, apply_rope, rope_inv_freq

Array = jax.Array
_LINEARS_PER_LAYER = 7


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, cfg.num_attention_heads * hd, bias=cfg.qkv_bias, axes=("q_heads", "embed"), **kw)
        self.k_proj = Linear(d, cfg.num_key_value_heads * hd, bias=cfg.qkv_bias, axes=("kv_heads", "embed"), **kw)
        self.v_proj = Linear(d, cfg.num_key_value_heads * hd, bias=cfg.qkv_bias, axes=("kv_heads", "embed"), **kw)
        self.o_proj = Linear(cfg.num_attention_heads * hd, d, bias=cfg.o_bias, axes=("embed", "q_heads"), **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype, axes=("head_dim",))
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype, axes=("head_dim",))

    def __call__(self, x, *, positions, q_idx, q_seg, sliding, kv, rngs):
        cfg = self.cfg
        b, t, _ = x.shape
        r = rngs or (None,) * 4
        q = self.q_proj(x, r[0]).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x, r[1]).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x, r[2]).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_inv_freq(cfg)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k_idx, k_seg, new_kv = q_idx, q_seg, None
        if kv is not None:
            k, v, k_idx, k_seg, new_kv = write_kv(kv, k, v)
        window = cfg.sliding_window if any(cfg.sliding_layers) else None
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), q_idx=q_idx, k_idx=k_idx, q_seg=q_seg,
                        k_seg=k_seg, window=window, sliding=sliding, impl=cfg.attention_impl)
        return self.o_proj(out.reshape(b, t, -1), r[3]), new_kv


def write_kv(kv: dict, k: Array, v: Array):
    """This step's keys and values written into one layer's cache at `kv["index"]`: the whole cache's keys,
    values, slot indices and segment ids, and the updated `{"k", "v"}`."""
    start = kv["index"]
    k_all = jax.lax.dynamic_update_slice_in_dim(kv["k"], k.astype(kv["k"].dtype), start, axis=1)
    v_all = jax.lax.dynamic_update_slice_in_dim(kv["v"], v.astype(kv["v"].dtype), start, axis=1)
    k_seg = kv["segment_ids"]
    k_idx = jnp.broadcast_to(jnp.arange(k_all.shape[1], dtype=jnp.int32), k_seg.shape)
    return k_all, v_all, k_idx, k_seg, {"k": k_all, "v": v_all}


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, **kw)

    def __call__(self, x, *, positions, q_idx, q_seg, sliding, kv=None, dropout_rng=None):
        r = (None,) * _LINEARS_PER_LAYER  # one dropout key per LoRA linear: q, k, v, o, gate, up, down
        if dropout_rng is not None:
            r = tuple(jax.random.split(dropout_rng, _LINEARS_PER_LAYER))
        h, new_kv = self.self_attn(self.input_layernorm(x), positions=positions, q_idx=q_idx, q_seg=q_seg,
                                   sliding=sliding, kv=kv, rngs=r[:4])
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), r[4:])
        return x, new_kv


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
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stack(r):
                return DecoderLayer(cfg, rngs=r, **kw)

            self.layers = stack(rngs)
            _prepend_layer_axis(self.layers)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False, axes=("vocab", "embed"), rngs=rngs, **kw)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """Preallocated KV cache: `[layers, batch, max_len, kv_heads, head_dim]`, empty slots segment 0."""
        cfg = self.config
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        dtype = dtype or self.dtype
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                "segment_ids": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.zeros((), jnp.int32)}

    def hidden_states(self, input_ids: Array, segment_ids: Array | None = None, positions: Array | None = None,
                      *, cache: dict | None = None, dropout_rng: Array | None = None):
        """Final-normed hidden states `[B, T, d]` (and the updated cache when one is given)."""
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
        layer_rngs = None if dropout_rng is None else jax.random.split(dropout_rng, cfg.num_hidden_layers)
        layer = self._layer_fn(positions=positions, q_idx=q_idx, q_seg=seg)
        run_layers = self._scan_layers if cfg.scan_layers else self._loop_layers
        x, new_kv = run_layers(layer, x, cache, kv_seg, start, layer_rngs)
        x = self.norm(x)
        if cache is None:
            return x
        return x, {"k": new_kv[0], "v": new_kv[1], "segment_ids": kv_seg, "index": start + t}

    def _traced_sliding(self) -> bool:
        """Which layers use the window is known at trace time, so it stays a Python bool (kernels pick one
        variant instead of a `lax.cond` between two, and `blockwise` skips blocks outside the window) except
        under scan over layers that differ, where it must be a scanned array."""
        return self.config.scan_layers and len(set(self.config.sliding_layers)) > 1

    def _layer_fn(self, **inputs):
        """`(layer, x, sliding, kv, rng) -> (x, new_kv)`: one decoder layer on the step's shared `inputs`,
        rematerialised as `config.remat` asks."""
        cfg = self.config

        def run(layer, x, sliding, kv, rng):
            return layer(x, sliding=sliding, kv=kv, dropout_rng=rng, **inputs)

        if cfg.remat == "none":
            return run
        return nnx.remat(run, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers,
                         static_argnums=() if self._traced_sliding() else (2,))

    def _scan_layers(self, run, x, cache, kv_seg, start, layer_rngs):
        """The stacked layers under `lax.scan` (the layer traces once); returns x and the new cache's (k, v)."""
        cfg = self.config
        graphdef, state = nnx.split(self.layers)
        traced = self._traced_sliding()

        def body(x, xs):
            st, sliding, kv, rng = xs
            return run(nnx.merge(graphdef, st), x, sliding if traced else cfg.sliding_layers[0], kv, rng)

        kvs = None
        if cache is not None:
            n = cfg.num_hidden_layers
            kvs = {"k": cache["k"], "v": cache["v"], "segment_ids": jnp.broadcast_to(kv_seg, (n, *kv_seg.shape)),
                   "index": jnp.broadcast_to(start, (n,))}
        sliding = jnp.asarray(cfg.sliding_layers) if traced else None
        x, outs = jax.lax.scan(body, x, (state, sliding, kvs, layer_rngs))
        return x, None if cache is None else (outs["k"], outs["v"])

    def _loop_layers(self, run, x, cache, kv_seg, start, layer_rngs):
        """The layers one after another; returns x and the new cache's (k, v)."""
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else {"k": cache["k"][i], "v": cache["v"][i], "segment_ids": kv_seg,
                                             "index": start}
            x, out = run(layer, x, self.config.sliding_layers[i], kv, None if layer_rngs is None else layer_rngs[i])
            if out is not None:
                new_k.append(out["k"])
                new_v.append(out["v"])
        return x, None if cache is None else (jnp.stack(new_k), jnp.stack(new_v))

    def logits(self, hidden: Array) -> Array:
        if self.lm_head is None:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

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
