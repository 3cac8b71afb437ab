"""The supported families, one `Family` entry per HF model_type (SmolLM and SmolLM2 are `llama`).

An entry holds everything that is specific to a family: its config translation (shared Llama-style parts
from `hf/config.py` plus its own), its tensor table (`hf/tensors.py`: names, prefixes, transforms) and the
linear modules LoRA targets. Adding a family means adding an entry here and, where its math differs, a flag
on ModelConfig. NNX paths are the HF names minus the prefix, so the Flax tree reads like the checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from jaxtune.hf.config import (
    DIMS,
    LLAMA_CORE,
    PARTIAL_ROPE,
    ROPE,
    SILU_MLP,
    TOKENS,
    Part,
    activation,
    fixed,
    get,
    layer_types,
    read_parts,
    rope_fields,
    rope_parameters,
    rope_params,
    write_parts,
)
from jaxtune.hf.tensors import STACK, Table, chain, fuse, renames, rule
from jaxtune.model.config import ModelConfig, UnsupportedConfigError

# Linear modules of one decoder layer, as PEFT names them; "all-linear" means these (never lm_head).
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
LINEAR_NAMES = (*ATTENTION_LINEARS, "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the `architectures` entry an exported config.json names
    config: tuple[Part, ...]  # HF config ↔ ModelConfig, both directions
    tensors: Table
    linear_names: tuple[str, ...] = LINEAR_NAMES
    # Checkpoint tensors that carry no learned weights (buffers some exporters write).
    ignored: tuple[str, ...] = (r".*rotary_emb\.inv_freq",)

    # Where the text model's config sits: the config itself, or a multimodal config's `text_config`.
    text_config: bool = False
    # Checkpoint tensors outside the language model (a vision tower): not loaded, copied through by a merged
    # export from its source so `transformers` reloads the whole model.
    kept: tuple[str, ...] = ()
    # The body prefix of transformers' module names (what PEFT adapter keys use) where it differs from the
    # checkpoint's (a multimodal Gemma 3 holds `language_model.model.` as `model.language_model.`).
    module_prefix: str | None = None

    def from_hf(self, hf: Any) -> dict:
        """ModelConfig fields from a `transformers` config, refusing what this family cannot reproduce."""
        return read_parts(self.config, get(hf, "text_config") if self.text_config else hf)

    def to_hf(self, cfg: ModelConfig) -> dict:
        """`transformers` config kwargs that `from_hf` reads back to `cfg`'s fields."""
        fields = write_parts(self.config, cfg)
        return {"text_config": fields} if self.text_config else fields

    def ignores(self, name: str) -> bool:
        return self.keeps(name) or any(re.fullmatch(p, name) for p in self.ignored)

    def keeps(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.kept)


# ---------------------------------------------------------------------------------------- config parts


def _attention_bias(hf: Any) -> dict:
    on = bool(get(hf, "attention_bias", False))
    return dict(qkv_bias=on, o_bias=on)


# `attention_bias` puts a bias on q, k, v and o alike.
ATTENTION_BIAS = Part(_attention_bias, lambda cfg: {"attention_bias": cfg.qkv_bias})
MLP_BIAS = Part(lambda hf: {"mlp_bias": bool(get(hf, "mlp_bias", False))}, lambda cfg: {"mlp_bias": cfg.mlp_bias})


def _refuse_attention_bias(hf: Any) -> dict:
    if get(hf, "attention_bias", False):
        raise UnsupportedConfigError("attention_bias=True: Mistral has no attention bias")
    return {}


def _refuse_window(hf: Any) -> dict:
    window = get(hf, "sliding_window")
    if window is not None:
        raise UnsupportedConfigError(f"sliding_window={window}: the llama family has no sliding window")
    return {}


NO_WINDOW = Part(_refuse_window)


def _read_layer_types(hf: Any) -> dict:
    types = layer_types(hf)
    if types is None:
        raise UnsupportedConfigError("layer_types is missing; this family names each layer's attention type")
    sliding = tuple(t == "sliding_attention" for t in types)
    return dict(sliding_window=get(hf, "sliding_window") if any(sliding) else None, sliding_layers=sliding)


# A window on the layers `layer_types` marks `sliding_attention` (Gemma 2/3).
LAYER_TYPES = Part(_read_layer_types, lambda cfg: dict(
    sliding_window=cfg.sliding_window,
    layer_types=["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers]))
# One window on every layer (or none).
UNIFORM_WINDOW = Part(lambda hf: {"sliding_window": get(hf, "sliding_window")},
                      lambda cfg: {"sliding_window": cfg.sliding_window})


def _read_layer_windows(hf: Any) -> dict:
    window, layers = get(hf, "sliding_window"), get(hf, "num_hidden_layers")
    types = layer_types(hf)
    if types is None:
        use = bool(get(hf, "use_sliding_window", False)) and window is not None
        first = get(hf, "max_window_layers", layers)
        types = ["sliding_attention" if use and i >= first else "full_attention" for i in range(layers)]
    sliding = tuple(t == "sliding_attention" for t in types)
    return dict(sliding_window=window if any(sliding) else None, sliding_layers=sliding)


def _write_layer_windows(cfg: ModelConfig) -> dict:
    if not any(cfg.sliding_layers):
        return dict(sliding_window=None, use_sliding_window=False)
    return dict(sliding_window=cfg.sliding_window, use_sliding_window=True,
                layer_types=["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers])


# A window on the layers `layer_types` marks `sliding_attention` (older configs: from `max_window_layers` on).
LAYER_WINDOWS = Part(_read_layer_windows, _write_layer_windows)



def _gemma(hf: Any) -> dict:
    """(1 + w) norms in fp32 and embeddings scaled by √hidden (cast to the activations' dtype)."""
    if get(hf, "use_bidirectional_attention", False):
        raise UnsupportedConfigError("use_bidirectional_attention=True: jaxtune tunes causal language models only")
    return dict(norm_style="gemma", embedding_multiplier=float(get(hf, "hidden_size")) ** 0.5)


GEMMA = Part(_gemma)


def _softcaps(hf: Any) -> dict:
    return dict(attention_scale=float(get(hf, "query_pre_attn_scalar")) ** -0.5, norm_layout="sandwich",
                attn_softcap=get(hf, "attn_logit_softcapping"), final_softcap=get(hf, "final_logit_softcapping"))


def _whole(x: float) -> int | float:
    """An int where `x` is one up to float error: transformers types query_pre_attn_scalar as int."""
    return round(x) if abs(x - round(x)) < 1e-6 else x


# Gemma 2/3: scores scaled by query_pre_attn_scalar^-½ and soft-capped, four norms per layer.
GEMMA2_ATTENTION = Part(_softcaps, lambda cfg: dict(
    query_pre_attn_scalar=_whole(cfg.attention_scale ** -2), attn_logit_softcapping=cfg.attn_softcap,
    final_logit_softcapping=cfg.final_softcap))


def _gemma3_rope(hf: Any) -> dict:
    """transformers 5 nests Gemma 3's RoPE by layer type: global layers may scale theirs, local ones differ in
    base only. Read flat, one base would apply to every layer."""
    local = rope_params(hf, "sliding_attention")
    if local["rope_type"] != "default":
        raise UnsupportedConfigError(f"rope_parameters.sliding_attention rope_type={local['rope_type']!r}: "
                                     "only the default RoPE is supported on sliding layers")
    return dict(rope_fields(rope_params(hf, "full_attention")), sliding_rope_theta=float(local["rope_theta"]))


GEMMA3_ROPE = Part(_gemma3_rope, lambda cfg: {"rope_parameters": {
    "full_attention": rope_parameters(cfg),
    "sliding_attention": {"rope_type": "default", "rope_theta": cfg.sliding_rope_theta}}})


def _granite(hf: Any) -> dict:
    return dict(attention_scale=float(get(hf, "attention_multiplier")),
                embedding_multiplier=float(get(hf, "embedding_multiplier")),
                residual_multiplier=float(get(hf, "residual_multiplier")),
                logits_divisor=float(get(hf, "logits_scaling")))


GRANITE = Part(_granite, lambda cfg: dict(
    attention_multiplier=cfg.attention_scale, embedding_multiplier=cfg.embedding_multiplier,
    residual_multiplier=cfg.residual_multiplier, logits_scaling=cfg.logits_divisor))


def _moe(experts_field: str, expert_size_field: str, renormalise: bool | None):
    """A routed-experts Part: `renormalise` None reads Qwen3-MoE's `norm_topk_prob`; Mixtral always does."""

    def read(hf: Any) -> dict:
        if get(hf, "router_jitter_noise", 0.0):
            raise UnsupportedConfigError("router_jitter_noise != 0 is not supported")
        n, layers = get(hf, experts_field), get(hf, "num_hidden_layers")
        dense, step = set(get(hf, "mlp_only_layers", None) or ()), get(hf, "decoder_sparse_step", 1) or 1
        moe = tuple(i not in dense and n > 0 and (i + 1) % step == 0 for i in range(layers))
        return dict(num_experts=n, num_experts_per_tok=get(hf, "num_experts_per_tok"),
                    moe_intermediate_size=get(hf, expert_size_field), moe_layers=moe,
                    norm_topk_prob=bool(get(hf, "norm_topk_prob")) if renormalise is None else renormalise,
                    router_aux_loss_coef=float(get(hf, "router_aux_loss_coef", 0.0))
                    if get(hf, "output_router_logits", False) else 0.0)

    def write(cfg: ModelConfig) -> dict:
        out = {experts_field: cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
               "output_router_logits": cfg.router_aux_loss_coef > 0,
               "router_aux_loss_coef": cfg.router_aux_loss_coef or 0.001}
        if expert_size_field != "intermediate_size":
            out[expert_size_field] = cfg.moe_intermediate_size
        if renormalise is None:
            out.update(norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
                       mlp_only_layers=[i for i, m in enumerate(cfg.moe_layers) if not m])
        return out

    return Part(read, write)


# ---------------------------------------------------------------------------------------- tensor tables

_LLAMA_TENSORS = (
    rule("lm_head.weight", head=True),
    *renames("embed_tokens.weight", "norm.weight", "layers.{i}.input_layernorm.weight",
             "layers.{i}.post_attention_layernorm.weight",
             *(f"layers.{{i}}.self_attn.{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
               for w in ("weight", "bias")),
             *(f"layers.{{i}}.mlp.{p}.{w}" for p in ("gate_proj", "up_proj", "down_proj") for w in ("weight", "bias"))),
)
_QK_NORM_TENSORS = renames("layers.{i}.self_attn.q_norm.weight", "layers.{i}.self_attn.k_norm.weight")
_SANDWICH_TENSORS = renames("layers.{i}.pre_feedforward_layernorm.weight",
                            "layers.{i}.post_feedforward_layernorm.weight")
# OLMo 2 has no input norm: its post_attention_layernorm normalises the attention's output.
_OLMO2_TENSORS = tuple(r for r in _LLAMA_TENSORS if "input_layernorm" not in r.hf[0]) + renames(
    "layers.{i}.post_feedforward_layernorm.weight") + _QK_NORM_TENSORS
_PHI3_TENSORS = (
    rule("lm_head.weight", head=True),
    *renames("embed_tokens.weight", "norm.weight", "layers.{i}.input_layernorm.weight",
             "layers.{i}.post_attention_layernorm.weight", "layers.{i}.self_attn.qkv_proj.weight",
             "layers.{i}.self_attn.o_proj.weight", "layers.{i}.mlp.gate_up_proj.weight",
             "layers.{i}.mlp.down_proj.weight"),
)
_ATTENTION_TENSORS = tuple(r for r in _LLAMA_TENSORS if ".mlp." not in r.hf[0])


def _experts(prefix: str, gate: str, up: str, down: str) -> tuple:
    """Per-expert Hub tensors ↔ the stacked `[E, 2I, H]` gate_up and `[E, H, I]` down transformers 5 holds."""
    e = f"layers.{{i}}.{prefix}.experts.{{e}}"
    return (
        rule(f"layers.{{i}}.{prefix}.gate.weight", "layers/{i}/mlp/gate/weight"),
        rule((f"{e}.{gate}.weight", f"{e}.{up}.weight"), "layers/{i}/mlp/experts/gate_up_proj",
             chain(STACK, fuse(1, 2))),
        rule(f"{e}.{down}.weight", "layers/{i}/mlp/experts/down_proj", STACK),
    )

_GEMMA3 = (DIMS, TOKENS, GEMMA3_ROPE, activation("hidden_activation"), ATTENTION_BIAS, LAYER_TYPES, GEMMA,
           GEMMA2_ATTENTION, fixed(qk_norm="head"))
_GEMMA3_TENSORS = _LLAMA_TENSORS + _SANDWICH_TENSORS + _QK_NORM_TENSORS

# ---------------------------------------------------------------------------------------- the families

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", (*LLAMA_CORE, ATTENTION_BIAS, MLP_BIAS, NO_WINDOW), Table(_LLAMA_TENSORS)),
    Family("mistral", "MistralForCausalLM", (*LLAMA_CORE, Part(_refuse_attention_bias), UNIFORM_WINDOW),
           Table(_LLAMA_TENSORS)),
    Family("qwen2", "Qwen2ForCausalLM", (*LLAMA_CORE, fixed(qkv_bias=True), LAYER_WINDOWS), Table(_LLAMA_TENSORS)),
    Family("qwen3", "Qwen3ForCausalLM", (*LLAMA_CORE, ATTENTION_BIAS, LAYER_WINDOWS, fixed(qk_norm="head")),
           Table(_LLAMA_TENSORS + _QK_NORM_TENSORS)),
    Family("gemma", "GemmaForCausalLM", (DIMS, TOKENS, ROPE, activation("hidden_act"), ATTENTION_BIAS, NO_WINDOW,
                                         GEMMA), Table(_LLAMA_TENSORS)),
    Family("gemma2", "Gemma2ForCausalLM", (DIMS, TOKENS, ROPE, activation("hidden_activation"), ATTENTION_BIAS,
                                           LAYER_TYPES, GEMMA, GEMMA2_ATTENTION),
           Table(_LLAMA_TENSORS + _SANDWICH_TENSORS)),
    Family("gemma3_text", "Gemma3ForCausalLM", _GEMMA3, Table(_GEMMA3_TENSORS)),
    # The text tower of a multimodal Gemma 3 checkpoint; its vision tower is kept as it is.
    Family("gemma3", "Gemma3ForConditionalGeneration", _GEMMA3,
           Table(_GEMMA3_TENSORS, prefix="language_model.model.", head_prefix="language_model."),
           text_config=True, kept=(r"vision_tower\..*", r"multi_modal_projector\..*"),
           module_prefix="model.language_model."),
    Family("phi3", "Phi3ForCausalLM", (DIMS, TOKENS, SILU_MLP, PARTIAL_ROPE, UNIFORM_WINDOW,
                                       fixed(fused_qkv=True, fused_gate_up=True)),
           Table(_PHI3_TENSORS), linear_names=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    Family("olmo2", "Olmo2ForCausalLM", (*LLAMA_CORE, ATTENTION_BIAS, NO_WINDOW,
                                         fixed(norm_style="fp32", norm_layout="post", qk_norm="projection")),
           Table(_OLMO2_TENSORS)),
    Family("granite", "GraniteForCausalLM", (*LLAMA_CORE, ATTENTION_BIAS, MLP_BIAS, NO_WINDOW, GRANITE),
           Table(_LLAMA_TENSORS)),
    Family("mixtral", "MixtralForCausalLM", (*LLAMA_CORE, Part(_refuse_attention_bias), UNIFORM_WINDOW,
                                             _moe("num_local_experts", "intermediate_size", True)),
           Table(_ATTENTION_TENSORS + _experts("block_sparse_moe", "w1", "w3", "w2")),
           linear_names=ATTENTION_LINEARS),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", (*LLAMA_CORE, ATTENTION_BIAS, LAYER_WINDOWS,
                                                fixed(qk_norm="head", router_fp32_weights=False),
                                                _moe("num_experts", "moe_intermediate_size", None)),
           Table(_LLAMA_TENSORS + _QK_NORM_TENSORS + _experts("mlp", "gate_proj", "up_proj", "down_proj"))),
)}


def family(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise UnsupportedConfigError(
            f"model_type={model_type!r} is not supported; jaxtune supports {', '.join(FAMILIES)} "
            "(SmolLM/SmolLM2 are model_type 'llama')")
    return FAMILIES[model_type]


def from_hf_config(hf: Any, **runtime: Any) -> ModelConfig:
    """A `transformers.PretrainedConfig` → ModelConfig (`runtime`: scan_layers, remat, attention_impl)."""
    fam = family(get(hf, "model_type"))
    try:
        fields = fam.from_hf(hf)
    except (TypeError, AttributeError, KeyError) as e:  # a field missing or of the wrong type
        raise UnsupportedConfigError(f"model_type={fam.model_type!r}: a config field is missing or malformed ({e})") \
            from None
    return ModelConfig(model_type=fam.model_type, **fields, **runtime)


def nnx_to_hf(model_type: str, path: tuple, layer: int | None = None) -> str:
    """The `transformers` module name of an NNX parameter (what PEFT adapter keys use): a per-layer path, or
    a scanned path plus the layer index."""
    if layer is not None:
        path = ("layers", layer, *path[1:])
    fam = family(model_type)
    try:
        name = fam.tensors.hf_name_of(path)
    except KeyError as e:
        raise KeyError(f"{e.args[0]} in the {model_type} table") from None
    if fam.module_prefix is not None and name.startswith(fam.tensors.prefix):
        name = fam.module_prefix + name[len(fam.tensors.prefix):]
    return name
