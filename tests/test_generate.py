"""Generation: HF greedy parity, batching/padding invariance, cache = recompute, sampling filters, stop ids,
streaming = while_loop, LoRA vs merged, mesh, and compile reuse."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from jaxtune import load_pretrained, load_tokenizer
from jaxtune.generate import (SamplingParams, _generate_jit, _stepper, stop_token_ids, generate, generate_text,
                              pad_prompts, sample_logits, stream)
from jaxtune.model.config import ModelConfig

# llama2.c test_all.py `expected_stdout`: `run stories260K.bin -t 0 -n 200` (200 tokens after BOS).
LLAMA2C_STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high.\nLily's mom said, \"Lily, let's go to the "
    "park.\" Lily was sad and didn't know what to do. She said, \"I want to play with your ball, but I can't find "
    "it.\"\nLily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she")

PROMPTS = [[1, 17, 33, 5, 90], [1, 64], [1, 3, 99, 42, 7, 12, 8, 100, 77]]
NEW = 16  # longer than every sliding window in the zoo
STORY_NEW = 24  # one length for the stories260K tests, so they share compiled programs


@pytest.fixture(scope="module")
def stories(stories_dir):
    return load_pretrained(stories_dir), load_tokenizer(stories_dir)


def _hf_greedy(hf, prompt, n, eos):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, eos_token_id=list(eos), pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bias", "mistral_window", "qwen3_window"])
def test_greedy_matches_transformers_batched(hf_zoo, name):
    path, hf = hf_zoo(name)
    model = load_pretrained(path)
    eos = tuple(stop_token_ids(model.config))
    gen = generate(model, PROMPTS, SamplingParams(max_new_tokens=NEW, stop_ids=eos))
    for i, prompt in enumerate(PROMPTS):
        # HF keeps the EOS a row stopped on as its last token.
        stop = gen.stop_tokens[i]
        ours = gen.tokens[i] + ([stop] if stop is not None else [])
        assert ours == _hf_greedy(hf, prompt, NEW, eos), f"{name} prompt {i}"


def test_stories260k_greedy_is_llama2c_story(stories):
    model, tok = stories
    gen = generate(model, [[tok.bos_token_id]], SamplingParams(max_new_tokens=200, stop_ids=(2,)))
    assert gen.finish_reasons == ["length"]
    assert tok.decode(gen.tokens[0]) == LLAMA2C_STORY


def test_stories260k_matches_transformers_on_a_prompt(stories, stories_dir):
    from transformers import AutoModelForCausalLM

    model, tok = stories
    hf = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    prompt = tok.encode("Once upon a time, a small dog")
    ours = generate(model, [prompt], SamplingParams(max_new_tokens=STORY_NEW, stop_ids=(2,))).tokens[0]
    assert ours == _hf_greedy(hf, prompt, STORY_NEW, (2,))


def test_batched_equals_one_by_one_and_full_recompute(hf_zoo):
    path, _ = hf_zoo("qwen3_window")
    model = load_pretrained(path)
    params = SamplingParams(max_new_tokens=NEW)
    batched = generate(model, PROMPTS, params).tokens
    for prompt, row in zip(PROMPTS, batched):
        assert generate(model, [prompt], params).tokens[0] == row

    # Full recompute: the whole sequence right-padded to one fixed width, argmax at the last real token.
    width = max(map(len, PROMPTS)) + NEW
    forward = jax.jit(lambda ids, seg: model(ids, segment_ids=seg))
    for prompt, row in zip(PROMPTS, batched):
        seq = list(prompt)
        for _ in range(NEW):
            ids = np.zeros((1, width), np.int32)
            ids[0, :len(seq)] = seq
            seg = (np.arange(width) < len(seq)).astype(np.int32)[None]
            seq.append(int(jnp.argmax(forward(ids, seg)[0, len(seq) - 1])))
        assert seq[len(prompt):] == row


def test_left_padding_layout():
    ids, seg, pos = pad_prompts([[5, 6, 7], [9]], bucket=4)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 9]]
    assert seg.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert pos[:, -1].tolist() == [2, 0]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pad_prompts([[1], []])


def test_scanned_layers_generate_the_same(hf_zoo):
    path, _ = hf_zoo("llama_gqa")
    params = SamplingParams(max_new_tokens=8)
    assert (generate(load_pretrained(path, scan_layers=True), PROMPTS, params).tokens
            == generate(load_pretrained(path), PROMPTS, params).tokens)


def _draws(logits, n=4000, **kw):
    batch = jnp.broadcast_to(jnp.log(jnp.asarray(logits, jnp.float32)), (n, len(logits)))
    args = dict(temperature=jnp.float32(1.0), top_k=jnp.int32(0), top_p=jnp.float32(1.0))
    args.update({k: jnp.asarray(v) for k, v in kw.items()})
    toks = sample_logits(batch, jax.random.key(0), args["temperature"], args["top_k"], args["top_p"], greedy=False)
    return np.bincount(np.asarray(toks), minlength=len(logits)) / n


def test_sampling_filters_and_temperature():
    probs = np.array([0.5, 0.3, 0.1, 0.06, 0.04])
    np.testing.assert_allclose(_draws(probs), probs, atol=0.03)
    top_k = _draws(probs, top_k=np.int32(2))
    np.testing.assert_allclose(top_k, [0.625, 0.375, 0, 0, 0], atol=0.03)
    top_p = _draws(probs, top_p=np.float32(0.85))  # 0.5 + 0.3 < 0.85, so the 0.1 token is the last one kept
    assert top_p[3:].sum() == 0 and top_p[2] > 0.05
    cold = _draws(probs, temperature=np.float32(0.5))
    np.testing.assert_allclose(cold, probs**2 / (probs**2).sum(), atol=0.03)
    assert _draws(probs, top_k=np.int32(1))[0] == 1.0


def test_sampling_is_seeded_and_streaming_matches(stories):
    model, tok = stories
    prompt = tok.encode("Once upon a time")
    params = SamplingParams(max_new_tokens=STORY_NEW, temperature=1.0, top_k=40, top_p=0.95, seed=7)
    a = generate(model, [prompt], params).tokens[0]
    assert generate(model, [prompt], params).tokens[0] == a
    assert generate(model, [prompt], dataclasses.replace(params, seed=8)).tokens[0] != a
    assert list(stream(model, prompt, params)) == a


def test_stop_ids_end_rows_independently(stories):
    model, tok = stories
    prompts = [tok.encode("Once upon a time"), tok.encode("The cat")]
    free = generate(model, prompts, SamplingParams(max_new_tokens=STORY_NEW)).tokens
    # Stop each row at a token that first appears at a different step in each row.
    stop_a = next(t for i, t in enumerate(free[0]) if i >= 3 and t not in free[0][:i] and t not in free[1][:12])
    stop_b = next(t for i, t in enumerate(free[1]) if i >= 12 and t not in free[1][:i] and t not in free[0])
    gen = generate(model, prompts, SamplingParams(max_new_tokens=STORY_NEW, stop_ids=(stop_a, stop_b)))
    assert gen.tokens[0] == free[0][:free[0].index(stop_a)]
    assert gen.tokens[1] == free[1][:free[1].index(stop_b)]
    assert gen.finish_reasons == ["stop", "stop"] and gen.stop_tokens == [stop_a, stop_b]
    streamed = stream(model, prompts[0], SamplingParams(max_new_tokens=STORY_NEW, stop_ids=(stop_a,)))
    assert list(streamed) == gen.tokens[0]


def test_generate_text_uses_eos_and_tokenizer(stories):
    model, tok = stories
    text = generate_text(model, tok, ["Once upon a time"], SamplingParams(max_new_tokens=STORY_NEW))[0]
    assert text.startswith(", there was a little girl named Lily")


def test_lora_adapted_equals_merged(hf_zoo):
    path, _ = hf_zoo("llama_gqa")
    lora, merged = load_pretrained(path), load_pretrained(path)
    rng = np.random.default_rng(0)
    for i in range(lora.config.num_hidden_layers):
        lin, target = lora.layers[i].self_attn.q_proj, merged.layers[i].self_attn.q_proj
        a = rng.normal(0, 0.3, (4, lin.in_features)).astype(np.float32)
        b = rng.normal(0, 0.3, (lin.out_features, 4)).astype(np.float32)
        lin.lora_A = nnx.data(nnx.LoRAParam(jnp.asarray(a)))
        lin.lora_B = nnx.data(nnx.LoRAParam(jnp.asarray(b)))
        lin.lora_scale = 2.0
        target.weight.set_value(target.weight[...] + 2.0 * jnp.asarray(b @ a))
    params = SamplingParams(max_new_tokens=10)
    tuned = generate(lora, PROMPTS, params).tokens
    assert tuned == generate(merged, PROMPTS, params).tokens
    assert tuned != generate(load_pretrained(path), PROMPTS, params).tokens


def test_generation_under_a_mesh(stories, stories_dir):
    from jaxtune.model.sharding import make_mesh

    model, tok = stories
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = load_pretrained(stories_dir, mesh=mesh)
    assert len(sharded.layers[0].mlp.up_proj.weight[...].sharding.device_set) == 8
    prompts = [tok.encode("Once upon a time"), tok.encode("The big dog")]
    params = SamplingParams(max_new_tokens=STORY_NEW)
    want = generate(model, prompts, params).tokens
    assert generate(sharded, prompts, params).tokens == want
    with jax.set_mesh(mesh):
        assert generate(sharded, prompts, params).tokens == want


def test_repeated_calls_reuse_the_compiled_program(stories):
    model, tok = stories
    params = SamplingParams(max_new_tokens=STORY_NEW, temperature=0.7, top_k=5, seed=1)
    generate(model, [tok.encode("Once upon a time")], params)
    before = _generate_jit._cache_size()
    generate(model, [tok.encode("The dog ran")], dataclasses.replace(params, temperature=0.9, top_k=3, seed=2))
    assert _generate_jit._cache_size() == before
    # Streaming: one compiled step per (graphdef, mode), reused across replies.
    list(stream(model, tok.encode("Once upon a time"), params))
    list(stream(model, tok.encode("The dog ran"), dataclasses.replace(params, seed=3)))
    step = _stepper(nnx.graphdef(model), False)
    assert step._cache_size() == 1


def test_invalid_sampling_params_are_named():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="stop ids"):
        SamplingParams(stop_ids=tuple(range(20)))


GEMMA_TURNS = ("{% for m in messages %}{{ '<start_of_turn>' + m.role + '\\n' + m.content | trim + '<end_of_turn>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")


def _gemma3_stop_setup(chat_template=None):
    """A ModelConfig whose config.json eos is 1 and a word-level tokenizer with Gemma 3's special-token ids
    (<eos> 1, <start_of_turn> 105, <end_of_turn> 106)."""
    names = [f"w{i}" for i in range(107)]
    names[:4] = ["<pad>", "<eos>", "<bos>", "<unk>"]
    names[105:] = ["<start_of_turn>", "<end_of_turn>"]
    backend = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    backend.add_special_tokens(names[:4] + names[105:])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", chat_template=chat_template)
    cfg = ModelConfig(model_type="gemma3_text", vocab_size=107, hidden_size=8, intermediate_size=16,
                      num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=8, eos_token_id=1)
    return cfg, tok


def test_stop_ids_take_a_gemma_generation_config_eos_list(tmp_path):
    cfg, tok = _gemma3_stop_setup()
    (tmp_path / "generation_config.json").write_text('{"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}')
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert stop_token_ids(cfg, tok) == [1]
    assert stop_token_ids(cfg, tok, generation=generation) == [1, 106]
    assert stop_token_ids(cfg, generation=generation) == [1, 106]


def test_chat_template_end_of_turn_marker_is_a_stop_id():
    """`<end_of_turn>` stops generation when the template in use emits it: the tokenizer's own template, or the
    `chat_template` argument, which replaces the tokenizer's."""
    cfg, plain = _gemma3_stop_setup()
    _, templated = _gemma3_stop_setup(GEMMA_TURNS)
    assert stop_token_ids(cfg, plain) == [1]
    assert stop_token_ids(cfg, templated) == [1, 106]
    assert stop_token_ids(cfg, plain, chat_template=GEMMA_TURNS) == [1, 106]
    assert stop_token_ids(cfg, templated, chat_template="{{ messages[0].content }}") == [1]
    rendered = templated.apply_chat_template([{"role": "user", "content": "w7"}], tokenize=False)
    assert rendered == "<start_of_turn>user\nw7<end_of_turn>\n"
