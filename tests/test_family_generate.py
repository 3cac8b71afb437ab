"""KV-cache greedy decoding of the new families equals transformers' eager greedy `generate`, over generations
long enough to cross every sliding window several times and Phi-4-mini's longrope switch mid-decode. The same
weights with the window (or the long factors) switched off in transformers decode other tokens, so a cache
that ignored them would fail the comparison."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from jaxtune import load_pretrained
from jaxtune.generate import SamplingParams, generate

# 9 and 5 tokens: with 16 new ones both cross Gemma 2's window (5) and Gemma 3's (4) several times.
PROMPTS = [[36, 104, 86, 2, 51, 110, 71, 6, 98], [49, 106, 52, 101, 41]]
# Phi-4-mini's tiny model: 7 tokens + 16 pass its original context (16) at decode step 10, and these two decode
# other tokens from there on when the cache keeps its short-factor keys; the third is past it from the prefill on.
LONGROPE_PROMPTS = [[20, 110, 58, 114, 102, 90, 31], [63, 105, 106, 80, 91, 122, 82],
                    [int(t) for t in np.random.default_rng(1).integers(2, 128, 18)]]
NEW = 16
FAMILIES = ["gemma", "gemma2", "gemma3", "phi3", "olmo2", "mixtral", "qwen3_moe"]


def _hf_greedy(hf, prompt: list[int]) -> list[int]:
    """Greedy tokens with EOS switched off (the tiny models' EOS ids mean nothing), so every row runs to NEW."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    assert len(tokens) == NEW
    return tokens


def _ours(model, prompts) -> list[list[int]]:
    gen = generate(model, prompts, SamplingParams(max_new_tokens=NEW))
    assert gen.finish_reasons == ["length"] * len(prompts)
    return gen.tokens


def _assert_not_trivial(rows: list[list[int]]) -> None:
    """A generation that repeats one token cannot tell a broken cache from a working one."""
    for row in rows:
        assert len(set(row)) >= 3, row


def _hf_variant(hf, **change):
    """transformers' model with the same weights under a changed config (built in memory, the fixture untouched)."""
    config = copy.deepcopy(hf.config)
    for key, value in change.items():
        setattr(config, key, value)
    other = type(hf)(config).eval()
    other.load_state_dict(hf.state_dict())
    return other


@pytest.fixture(scope="module")
def granite_untied(tmp_path_factory):
    """Granite with its own LM head: the zoo's tied tiny Granite echoes its last token forever."""
    from hf_models import build

    path = tmp_path_factory.mktemp("granite_untied")
    return path, build("granite", path, tie_word_embeddings=False)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_matches_transformers_batched(hf_zoo, name):
    path, hf = hf_zoo(name)
    ours = _ours(load_pretrained(path), PROMPTS)
    _assert_not_trivial(ours)
    assert ours == [_hf_greedy(hf, p) for p in PROMPTS]


def test_granite_greedy_matches_transformers(granite_untied):
    path, hf = granite_untied
    ours = _ours(load_pretrained(path), PROMPTS)
    _assert_not_trivial(ours)
    assert ours == [_hf_greedy(hf, p) for p in PROMPTS]


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_sliding_window_changes_the_generation(hf_zoo, name):
    _, hf = hf_zoo(name)
    unwindowed = _hf_variant(hf, sliding_window=10**6)
    assert [_hf_greedy(unwindowed, p) for p in PROMPTS] != [_hf_greedy(hf, p) for p in PROMPTS]


def test_longrope_switch_during_decoding_matches_transformers(hf_zoo):
    """Longrope uses the long factors for a call once its max position + 1 passes the original context (16).
    transformers' Phi-3 `generate` also drops the cache at that step and re-encodes the whole sequence
    (`Phi3ForCausalLM.prepare_inputs_for_generation`), so every cached key is long-rotated from then on and the
    greedy tokens equal a full recompute per step. One prompt per call: in a batch the switch follows the longest
    row (transformers' re-encode test even counts the left padding)."""
    path, hf = hf_zoo("phi4_longrope")
    model = load_pretrained(path)
    assert model.config.rope_original_max_position == 16
    ours = [_ours(model, [p])[0] for p in LONGROPE_PROMPTS]
    _assert_not_trivial(ours)
    assert ours == [_hf_greedy(hf, p) for p in LONGROPE_PROMPTS]
    rope = hf.config.rope_parameters
    short_only = _hf_variant(hf, rope_parameters={**rope, "long_factor": rope["short_factor"]})
    assert [_hf_greedy(short_only, p) for p in LONGROPE_PROMPTS] != ours
