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
}


def reinit_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * (2 * torch.rand(p.shape, generator=g) - 1))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def build(name: str, out_dir: Path, seed: int = 0, **overrides):
    """Save a tiny random model `name` into `out_dir`; return the fp32 eager PyTorch model."""
    import transformers

    cls_name, kw = VARIANTS[name]
    cfg = getattr(transformers, cls_name)(**{**BASE, **kw, **overrides})
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
