"""Added special tokens: tokenizer and embedding grow, only the new rows train under LoRA, export keeps them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtune import load_pretrained, load_tokenizer
from jaxtune.lora.config import LoraConfig
from jaxtune.lora.apply import apply_lora
from jaxtune.train.partition import trainable_filter
from jaxtune.model.config import ModelConfig
from jaxtune.model.transformer import Transformer
from jaxtune.train.optim import OptimConfig, make_optimizer
from jaxtune.train.step import jit_train_step
from jaxtune.train.vocab import merge_model, prepare_vocab, resize_vocab, split_model

NEW = ["<|im_start|>", "<|im_end|>"]


def test_resize_grows_embedding_and_untied_head_with_mean_rows():
    cfg = ModelConfig("llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    old_embed, old_head = np.asarray(model.embed_tokens.weight[...]), np.asarray(model.lm_head.weight[...])
    assert resize_vocab(model, 131)
    assert model.config.vocab_size == 131
    embed, head = np.asarray(model.embed_tokens.weight[...]), np.asarray(model.lm_head.weight[...])
    assert embed.shape == (131, 32) and head.shape == (131, 32)
    np.testing.assert_array_equal(embed[:128], old_embed)
    np.testing.assert_allclose(embed[128:], np.broadcast_to(old_embed.mean(0), (3, 32)), atol=1e-7)
    np.testing.assert_allclose(head[130], old_head.mean(0), atol=1e-7)
    assert model(jnp.array([[1, 130]])).shape == (1, 2, 131)
    assert not resize_vocab(model, 131)
    with pytest.raises(ValueError, match="only grows the vocabulary"):
        resize_vocab(model, 100)


@pytest.fixture(scope="module")
def grown(stories_dir):
    tokenizer = load_tokenizer(stories_dir)
    model = load_pretrained(stories_dir)
    ids = prepare_vocab(model, tokenizer, NEW)
    return model, tokenizer, ids


def test_tokens_are_added_once_and_encode_as_single_ids(grown):
    model, tokenizer, ids = grown
    assert ids == [512, 513] and len(tokenizer) == 514 and model.config.vocab_size == 514
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [512]
    assert prepare_vocab(model, tokenizer, NEW) == ids  # idempotent
    assert len(tokenizer) == 514


def test_lora_trains_only_the_added_rows_and_exports_them(grown, tmp_path):
    model, tokenizer, ids = grown
    model = nnx.clone(model)
    apply_lora(model, LoraConfig(rank=4, dropout=0.0), nnx.Rngs(0))
    graphdef, trainable, frozen, rows = split_model(model, trainable_filter("lora"), ids)
    assert set(trainable["token_rows"]) == {"embed_tokens"}  # tied head: one matrix
    assert trainable["token_rows"]["embed_tokens"].shape == (2, 64)
    before = np.asarray(model.embed_tokens.weight[...])
    t = 32
    seq = np.random.default_rng(0).integers(3, 512, (4, t + 1)).astype(np.int32)
    seq[:, ::5] = 512
    seq[:, 3::7] = 513
    batch = {"input_ids": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": np.ones((4, t), np.int32),
             "segment_ids": np.ones((4, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (4, 1))}
    tx = make_optimizer(OptimConfig(lr=1e-2), 10, trainable)
    opt_state = tx.init(trainable)
    step = jit_train_step(tx, token_rows=rows)
    for i in range(3):
        trainable, opt_state, m = step(graphdef, trainable, frozen, opt_state, batch, jax.random.key(i))
    assert np.isfinite(float(m["loss"]))
    tuned = merge_model(graphdef, trainable, frozen, rows)
    after = np.asarray(tuned.embed_tokens.weight[...])
    np.testing.assert_array_equal(after[:512], before[:512])  # every old row bit-for-bit frozen
    assert np.abs(after[512:] - before[512:]).min() > 0  # both new rows moved
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(trainable["params"]) if x.ndim == 2)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxtune.export import save_merged

    out = save_merged(tuned, tokenizer, tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert hf.config.vocab_size == 514
    np.testing.assert_allclose(hf.get_input_embeddings().weight.detach().numpy()[512:], after[512:], atol=1e-6)
    assert AutoTokenizer.from_pretrained(out).encode("<|im_end|>", add_special_tokens=False) == [513]
