"""Tiny random HF checkpoints for parity tests, built offline with `transformers` config classes.

Weights are re-initialised at std 0.1 (norms 1 ± 0.1): at HF's default 0.02, features such as llama3 rope
scaling move logits by only ~5e-5, so a 1e-4 parity test could not tell them apart.
"""

from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, rms_norm_eps=1e-5)

# name → (config class name, kwargs). Each entry is one row of the parity matrix.
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama_mha": ("LlamaConfig", dict(num_key_value_heads=4)),
    "llama_gqa": ("LlamaConfig", dict(num_key_value_heads=2)),
    "llama_mqa": ("LlamaConfig", dict(num_key_value_heads=1)),
    "llama_tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "llama_linear_rope": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "llama_bias": ("LlamaConfig", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "smollm": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True, hidden_size=48,
                                   num_attention_heads=3, rope_parameters=dict(rope_type="default",
                                                                               rope_theta=100000.0))),
    "mistral_window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=7, head_dim=16)),
    "qwen2_bias": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2_window": ("Qwen2Config", dict(num_key_value_heads=2, num_hidden_layers=3, use_sliding_window=True,
                                         sliding_window=5, max_window_layers=1, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),
    "qwen3_window": ("Qwen3Config", dict(num_key_value_heads=1, head_dim=16, num_hidden_layers=3,
                                         layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                                         use_sliding_window=True, sliding_window=6, tie_word_embeddings=False)),
    # head_dim ≠ hidden/heads, GeGLU (tanh), (1 + w) norms, √d embedding scale.
    "gemma": ("GemmaConfig", dict(num_key_value_heads=2, head_dim=24)),
    # Scores × query_pre_attn_scalar^-½, capped; final logits capped; sandwich norms; layer 0 sliding.
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=16, num_hidden_layers=3, sliding_window=5,
                                    query_pre_attn_scalar=24, attn_logit_softcapping=1.5,
                                    final_logit_softcapping=2.0)),
    # q/k norms, a local RoPE base on sliding layers and linear scaling on global ones, the pattern from layer_types.
    "gemma3": ("Gemma3TextConfig", dict(num_key_value_heads=1, head_dim=16, num_hidden_layers=3, sliding_window=4,
                                        query_pre_attn_scalar=20,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                        rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0,
                                                                                rope_theta=100000.0),
                                                         "sliding_attention": dict(rope_type="default",
                                                                                   rope_theta=50.0)})),
    # Fused qkv_proj / gate_up_proj, half of each head rotated.
    # A multimodal Gemma 3 checkpoint: the text tower under `language_model.`, a vision tower beside it.
    "gemma3_vision": ("Gemma3Config", dict(
        text_config=dict(num_key_value_heads=1, head_dim=16, num_hidden_layers=2, sliding_window=4,
                         query_pre_attn_scalar=16, vocab_size=300),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)),
    "phi3": ("Phi3Config", dict(num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0,
                                bos_token_id=1, eos_token_id=2, partial_rotary_factor=0.5)),
    # Phi-4-mini's shape of RoPE: a quarter of each head unrotated, longrope past 16 positions (T = 24 crosses it).
    "phi4_longrope": ("Phi3Config", dict(num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0,
                                         max_position_embeddings=64, original_max_position_embeddings=16,
                                         rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                              partial_rotary_factor=0.75,
                                                              short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                                              long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0]))),
    "olmo2": ("Olmo2Config", dict(num_key_value_heads=2, pad_token_id=0)),
    "granite": ("GraniteConfig", dict(num_key_value_heads=2, embedding_multiplier=3.0, residual_multiplier=0.5,
                                      attention_multiplier=0.3, logits_scaling=2.5, tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                      intermediate_size=32)),
    # Dense layer 1 among MoE layers, top-k weights not renormalised.
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_key_value_heads=2, head_dim=16, num_hidden_layers=3, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False,
                                         mlp_only_layers=[1], tie_word_embeddings=False)),
}


def reinit_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * (2 * torch.rand(p.shape, generator=g) - 1))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def make_config(name: str, **overrides):
    """The `transformers` config of variant `name` (BASE sizes, then its own kwargs, then `overrides`)."""
    import transformers

    cls_name, kw = VARIANTS[name]
    if "text_config" in kw:  # multimodal: the tiny sizes describe its text model
        return getattr(transformers, cls_name)(**{**kw, "text_config": {**BASE, **kw["text_config"]}}, **overrides)
    return getattr(transformers, cls_name)(**{**BASE, **kw, **overrides})


def build(name: str, out_dir: Path, seed: int = 0, **overrides):
    """Save a tiny random model `name` into `out_dir`; return the fp32 eager PyTorch model."""
    import transformers

    cfg = make_config(name, **overrides)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    reinit_(model, seed)
    model.eval()
    model.save_pretrained(out_dir)
    return model


def torch_logits(model, ids, attention_mask=None, position_ids=None):
    import numpy as np

    with torch.no_grad():
        kw = {}
        if attention_mask is not None:
            kw["attention_mask"] = torch.tensor(np.asarray(attention_mask))
        if position_ids is not None:
            kw["position_ids"] = torch.tensor(np.asarray(position_ids))
        return model(torch.tensor(np.asarray(ids)), **kw).logits.float().numpy()
