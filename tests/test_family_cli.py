"""`jaxtune info` names what sets each new family apart (norm layout, soft-caps, multipliers, partial and long
RoPE, local RoPE base, fused projections, experts) and prints none of it for Llama; `jaxtune params` counts a
dense and an MoE model as PEFT does."""

from __future__ import annotations

import copy

import pytest

from jaxtune.cli.main import main

FEATURES = {
    "gemma": ["hidden / mlp   64 / 96 (gelu_tanh)", "norms          pre, (1 + w)·x in fp32, eps 1e-05",
              "multipliers    embedding ×8"],
    "gemma2": ["norms          sandwich, (1 + w)·x in fp32", "scores scale   0.2041 (not 1/sqrt(head_dim))",
               "soft-caps      attention 1.5, final logits 2.0", "sliding window 5 on 2/3 layers\n"],
    "gemma3": ["qk-norm head", "rope           theta=100000, type=linear, factor=4\n",
               "sliding window 4 on 2/3 layers, their rope theta=50"],
    "phi3": ["rope           theta=10000, type=default, rotary dims 8/16", "fused          qkv_proj, gate_up_proj"],
    "phi4_longrope": ["type=longrope, factor=4, original context 16, attention factor 1.225, rotary dims 12/16"],
    "olmo2": ["qk-norm projection", "norms          post, w·x in fp32"],
    "granite": ["scores scale   0.3 (not", "multipliers    embedding ×3, residual ×0.5, logits ÷2.5"],
    "mixtral": ["experts        4, top-2 (renormalised), expert mlp 32, on 2/2 layers"],
    "qwen3_moe": ["hidden / mlp   64 / 96 (silu)",
                  "experts        4, top-2 (not renormalised), expert mlp 32, on 2/3 layers"],
}


def _info(path, capsys) -> str:
    assert main(["info", str(path)]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", FEATURES)
def test_info_names_each_family_feature(hf_zoo, capsys, name):
    path, hf = hf_zoo(name)
    out = _info(path, capsys)
    assert f"parameters     {hf.num_parameters():,}\n" in out
    for line in FEATURES[name]:
        assert line in out


def test_info_adds_nothing_for_llama(hf_zoo, capsys):
    out = _info(hf_zoo("llama_gqa")[0], capsys)
    assert "norms          pre, w·x, eps 1e-05" in out
    assert "sliding window none" in out
    for label in ("experts", "scores scale", "soft-caps", "multipliers", "fused", "rotary dims"):
        assert label not in out


@pytest.mark.parametrize("name,targets,experts", [
    ("gemma2", "all-linear", None),
    # Attention only: peft 0.21 turns MLP names on a transformers-5 MoE into expert target_parameters.
    ("qwen3_moe", "q_proj,k_proj,v_proj,o_proj", None),
    ("mixtral", "q_proj,v_proj", "mlp.experts.gate_up_proj,mlp.experts.down_proj"),
])
def test_params_counts_as_peft(hf_zoo, capsys, name, targets, experts):
    import peft

    path, hf = hf_zoo(name)
    extra = ["--target-parameters", experts] if experts else []
    assert main(["params", str(path), "--lora-rank", "8", "--targets", targets, "--dtype", "fp32", *extra]) == 0
    out = capsys.readouterr().out
    modules = targets if targets == "all-linear" else targets.split(",")
    trainable, total = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=8, target_modules=modules, target_parameters=experts.split(",") if experts else None)
    ).get_nb_trainable_parameters()
    assert f"{trainable:,} / {total:,}" in out
    assert f"({name}, {hf.num_parameters():,} parameters)" in out
