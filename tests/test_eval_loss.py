"""Eval loss/perplexity: equals transformers' loss, every text token scored once, padding rows count nothing,
instruction datasets go through the training data path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from jaxtune import load_pretrained, load_tokenizer
from jaxtune.eval.loss import (batches_of, dataset_loss, evaluate_loss, read_text_slice, sequence_rows, text_loss,
                               text_windows)

LILY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module")
def stories(stories_dir):
    return load_pretrained(stories_dir), load_tokenizer(stories_dir)


@pytest.fixture(scope="module")
def hf_stories(stories_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()


def _hf_loss(hf, ids):
    with torch.no_grad():
        t = torch.tensor([ids])
        return float(hf(t, labels=t).loss)


def test_text_loss_matches_transformers(stories, hf_stories):
    model, tok = stories
    ours = text_loss(model, tok, LILY, seq_len=64, batch_size=2)
    ids = tok.encode(LILY)
    assert ours.tokens == len(ids) - 1
    assert ours.loss == pytest.approx(_hf_loss(hf_stories, ids), abs=1e-4)
    assert 0.1 < ours.loss < 0.3  # SOURCES.md: about 0.18 for this sentence
    assert ours.perplexity == pytest.approx(math.exp(ours.loss))


def test_windows_score_every_token_once():
    ids = list(range(10, 33))  # 23 tokens
    with_bos = text_windows(ids, 8, bos_id=1)
    assert [w[0] for w in with_bos] == [1, 1, 1] and sum(len(w) - 1 for w in with_bos) == 23
    without = text_windows(ids, 8)
    assert sum(len(w) - 1 for w in without) == 22
    assert [w[0] for w in without] == [10, 18, 26]
    assert len(text_windows(ids, 8, bos_id=1, max_windows=2)) == 2


def test_windowed_loss_is_the_token_weighted_mean(stories, hf_stories):
    model, tok = stories
    ids = tok.encode(LILY, add_special_tokens=False)
    windows = text_windows(ids, 9, tok.bos_token_id)
    assert len(windows) > 2
    ours = text_loss(model, tok, LILY, seq_len=9, batch_size=2)
    with torch.no_grad():
        nll = sum(_hf_loss(hf_stories, w) * (len(w) - 1) for w in windows)
    assert ours.tokens == len(ids)
    assert ours.loss == pytest.approx(nll / len(ids), abs=1e-4)


def test_padding_rows_and_batch_size_do_not_change_the_result(stories):
    model, tok = stories
    seqs = [tok.encode(s) for s in (LILY, "The dog ran to the park.", "Tom had a red ball")]
    rows = sequence_rows(seqs, 32)
    one = evaluate_loss(model, batches_of(rows, 1))
    four = evaluate_loss(model, batches_of(rows, 4))
    assert one.tokens == four.tokens == sum(len(s) - 1 for s in seqs)
    assert one.loss == pytest.approx(four.loss, abs=1e-5)
    assert one.accuracy == pytest.approx(four.accuracy)
    shapes = {b["input_ids"].shape for b in batches_of(rows, 2)}
    assert shapes == {(2, 32)}


def test_errors_name_the_problem(stories, tmp_path):
    model, tok = stories
    with pytest.raises(ValueError, match="sequence 1 has 1 token"):
        sequence_rows([[1, 2, 3], [5]], 8)
    with pytest.raises(ValueError, match="no loss tokens"):
        evaluate_loss(model, [])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_text_slice(tmp_path / "missing.txt")


def test_general_text_slice(assets_dir, stories):
    model, tok = stories
    text = read_text_slice(assets_dir / "data" / "tinyshakespeare_input.txt", 0, 2000)
    assert text.startswith("First Citizen:") and len(text) == 2000
    res = text_loss(model, tok, text, seq_len=64, batch_size=8, max_windows=4)
    assert res.tokens == 4 * 64
    assert res.loss > text_loss(model, tok, LILY, seq_len=64).loss  # Shakespeare is off-domain for TinyStories


def test_dataset_loss_uses_the_training_data_path(stories, tmp_path):
    model, tok = stories
    path = tmp_path / "tiny.jsonl"
    records = [{"instruction": "Tell a story.", "input": "", "output": LILY},
               {"instruction": "Name a pet.", "input": "", "output": "A dog named Max."}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    res = dataset_loss(model, tok, str(path), seq_len=256, batch_size=2, chat_template="alpaca")
    # Only response tokens (plus the end token) are scored, so fewer than all tokens of the rendered text.
    full = sum(len(tok.encode(r["output"], add_special_tokens=False)) for r in records)
    assert full <= res.tokens <= full + 2 * 3
    everything = dataset_loss(model, tok, str(path), seq_len=256, batch_size=2, chat_template="alpaca",
                              train_on="all")
    assert everything.tokens > res.tokens
    assert np.isfinite(res.loss)
