"""The model each recipe in configs/ names, as transformers config keyword arguments (what its config.json says),
and the memory of the hardware its header names: recipes are compiled from these (no download) by
tests/test_recipes.py on fake CPU devices and by scripts/bench_tpu_compile.py for real TPU topologies."""

from __future__ import annotations

# The architecture each recipe's model directory holds, as transformers configs (what config.json says).
LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False}
# meta-llama/Llama-3.1-70B-Instruct's config.json.
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "max_position_embeddings": 131072,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}
ARCHITECTURES = {
    "quickstart.yaml": ("LlamaConfig", {
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 5,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8, "max_position_embeddings": 512,
        "tie_word_embeddings": True}),
    "full-ft-small.yaml": ("LlamaConfig", {
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192, "rope_theta": 100000.0,
        "tie_word_embeddings": True}),
    "llama3-8b-lora.yaml": ("LlamaConfig", LLAMA3_8B),
    "llama3-8b-qlora.yaml": ("LlamaConfig", LLAMA3_8B),
    "llama3-70b-lora-v5p-64.yaml": ("LlamaConfig", LLAMA3_70B),
    "tpu-v5e-8-lora.yaml": ("LlamaConfig", {
        **LLAMA3_8B, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}}),
    "qwen2.5-7b-lora.yaml": ("Qwen2Config", {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "tie_word_embeddings": False}),
    # google/gemma-3-1b-it's config.json; its Hub copy gives the 5:1 pattern as sliding_window_pattern=6 and the
    # bases as rope_theta / rope_local_base_freq, which transformers 5 reads into these fields.
    "gemma3-1b-lora-v5e-8.yaml": ("Gemma3TextConfig", {
        "vocab_size": 262144, "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
        "sliding_window": 512,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
        "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}),
    # microsoft/Phi-4-mini-instruct's config.json as remembered (no network here; sliding_window 262144, past any
    # position, is the least certain). The longrope factors are stand-ins of the real length (48: 3/4 of each
    # 128-wide head rotated); shapes and shardings do not depend on their values.
    "phi4-mini-lora.yaml": ("Phi3Config", {
        "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
        "num_attention_heads": 24, "num_key_value_heads": 8, "partial_rotary_factor": 0.75, "rope_theta": 10000.0,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48,
                         "long_factor": [32.0 ** (i / 47) for i in range(48)]},
        "original_max_position_embeddings": 4096, "max_position_embeddings": 131072, "sliding_window": 262144,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "bos_token_id": 199999, "eos_token_id": 199999,
        "pad_token_id": 199999}),
    # Qwen/Qwen3-30B-A3B's config.json: every layer routed (intermediate_size is the unused dense width).
    "qwen3-30b-a3b-lora.yaml": ("Qwen3MoeConfig", {
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "router_aux_loss_coef": 0.001, "output_router_logits": False,
        "max_position_embeddings": 40960, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "use_sliding_window": False,
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645}),
}


# Per-device memory of the hardware a recipe's header names; its compiled estimate must fit.
DEVICE_MEMORY = {
    "tpu-v5e-8-lora.yaml": 16 * 2**30,  # TPU v5e: 16 GiB HBM per chip
    "gemma3-1b-lora-v5e-8.yaml": 16 * 2**30,
    "phi4-mini-lora.yaml": 24 * 10**9,  # one 24 GB GPU (RTX 3090/4090, L4, A10)
    "qwen3-30b-a3b-lora.yaml": 95 * 10**9,  # TPU v5p: 95 GB HBM per chip
    "llama3-70b-lora-v5p-64.yaml": 95 * 10**9,
}

# The TPU slice each TPU recipe is written for, as a libtpu topology name (chips, not cores: a v5p-16 is 8 chips).
TPU_TOPOLOGIES = {
    "tpu-v5e-8-lora.yaml": "v5e:2x4",
    "gemma3-1b-lora-v5e-8.yaml": "v5e:2x4",
    "qwen3-30b-a3b-lora.yaml": "v5p:2x2x2",
    "llama3-70b-lora-v5p-64.yaml": "v5p:2x4x4",
}
