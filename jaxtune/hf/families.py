"""HF tensor name ↔ NNX path, one invertible table per family.

NNX keeps HF names (minus the `model.` prefix) and HF's `[out, in]` layout, so every rule is a rename with
no transpose. `{i}` is the layer index: in the per-layer layout it is part of the NNX path
(`layers/3/self_attn/q_proj/weight`); in the scanned layout it indexes the leading axis of
`layers/self_attn/q_proj/weight`.
"""

from __future__ import annotations

import re

# Linear modules of one decoder layer, as PEFT names them; "all-linear" means these (never lm_head).
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_LLAMA = (
    ("model.embed_tokens.weight", "embed_tokens/weight"),
    ("model.norm.weight", "norm/weight"),
    ("lm_head.weight", "lm_head/weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers/{i}/input_layernorm/weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/{i}/post_attention_layernorm/weight"),
    *((f"model.layers.{{i}}.self_attn.{p}.{w}", f"layers/{{i}}/self_attn/{p}/{w}")
      for p in ("q_proj", "k_proj", "v_proj", "o_proj") for w in ("weight", "bias")),
    *((f"model.layers.{{i}}.mlp.{p}.{w}", f"layers/{{i}}/mlp/{p}/{w}")
      for p in ("gate_proj", "up_proj", "down_proj") for w in ("weight", "bias")),
)
_QK_NORM = (
    ("model.layers.{i}.self_attn.q_norm.weight", "layers/{i}/self_attn/q_norm/weight"),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers/{i}/self_attn/k_norm/weight"),
)
TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA + _QK_NORM,
}
# Buffers some exporters write that carry no learned weights.
IGNORED_HF = re.compile(r".*rotary_emb\.inv_freq$")


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_HF_RX = {fam: [(_compile(h), n) for h, n in rules] for fam, rules in TABLES.items()}
_NNX_RX = {fam: [(_compile(n), h) for h, n in rules] for fam, rules in TABLES.items()}


def hf_to_nnx(family: str, name: str, scanned: bool = False) -> tuple[tuple, int | None] | None:
    """`model.layers.3.mlp.up_proj.weight` → (`('layers', 3, 'mlp', 'up_proj', 'weight')`, None) or, scanned,
    (`('layers', 'mlp', 'up_proj', 'weight')`, 3). None if the family has no such tensor."""
    for rx, template in _HF_RX[family]:
        m = rx.match(name)
        if m:
            layer = int(m.group("i")) if "i" in rx.groupindex else None
            parts = template.split("/")
            path = tuple(p for p in parts if p != "{i}") if scanned else tuple(
                layer if p == "{i}" else p for p in parts)
            return path, (layer if scanned else None)
    return None


def nnx_to_hf(family: str, path: tuple, layer: int | None = None) -> str:
    """Inverse of `hf_to_nnx`: a per-layer path, or a scanned path plus the layer index."""
    if layer is not None:
        path = (path[0], layer, *path[1:])
    key = "/".join(str(p) for p in path)
    for rx, template in _NNX_RX[family]:
        m = rx.match(key)
        if m:
            return template.replace("{i}", m.group("i")) if "i" in rx.groupindex else template
    raise KeyError(f"no HF name for NNX path {key!r} in the {family} table")
