"""Response scores (CE with and without the instruction, perplexity, IFD) equal a by-hand computation from the
model's own logits on the exact token sequences, with and without a tokenizer BOS; unscorable records are
None and counted by reason."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.curate.report import CurateReport
from jaxtune.curate.score import distribution, response_scores, response_sequences
from jaxtune.data.formats import Conversation

TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def word_tokenizer(bos: bool):
    """Word-level tokenizer inside the tiny model's 128-token vocab; `bos` adds <s> like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant"] + [f"w{i}" for i in range(50)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def model(hf_zoo):
    from jaxtune import load_pretrained

    return load_pretrained(hf_zoo("llama_gqa")[0])


def chat(*turns: str, source: str = "t") -> Conversation:
    roles = ["user", "assistant"] * len(turns)
    return Conversation([{"role": r, "content": c} for r, c in zip(roles, turns)], source)


def ids_of(tok, tokens: list[str]) -> list[int]:
    return tok.convert_tokens_to_ids(tokens)


def by_hand(model, ids: list[int], scored: list[int]) -> float:
    """Mean NLL of tokens at positions `scored`, from the model's logits on exactly `ids`."""
    logits = np.asarray(model(jnp.asarray([ids])), np.float64)[0]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(-np.mean([logp[i - 1, ids[i]] for i in scored]))


def rendered(*turns: str) -> list[str]:
    roles = ["user", "assistant"] * len(turns)
    return [t for r, c in zip(roles, turns) for t in ["<|im_start|>", r, *c.split(), "<|im_end|>"]]


CONVS = [chat("w1 w2 w3", "w4 w5"), chat("w7", "w8 w9 w10 w11 w12 w13"),
         chat("w1 w2", "w3", "w20 w21 w22", "w23 w24 w25")]  # multi-turn: only the last response is scored


def test_sequences_with_bos():
    tok = word_tokenizer(bos=True)
    cond, cond_mask, uncond, uncond_mask = response_sequences(CONVS[0], tok, TEMPLATE)
    assert cond.tolist() == ids_of(tok, ["<s>", *rendered("w1 w2 w3", "w4 w5")])
    assert tok.convert_ids_to_tokens(cond[cond_mask == 1].tolist()) == ["w4", "w5", "<|im_end|>"]
    # the unconditioned sequence is BOS and the response's own token ids, end token included
    assert tok.convert_ids_to_tokens(uncond.tolist()) == ["<s>", "w4", "w5", "<|im_end|>"]
    assert uncond_mask.tolist() == [0, 1, 1, 1]


def test_sequences_without_bos_skip_the_first_response_token_on_both_sides():
    tok = word_tokenizer(bos=False)
    cond, cond_mask, uncond, uncond_mask = response_sequences(CONVS[0], tok, TEMPLATE)
    assert cond.tolist() == ids_of(tok, rendered("w1 w2 w3", "w4 w5"))
    assert tok.convert_ids_to_tokens(uncond.tolist()) == ["w4", "w5", "<|im_end|>"]
    assert uncond_mask.tolist() == [0, 1, 1]
    assert tok.convert_ids_to_tokens(cond[cond_mask == 1].tolist()) == ["w5", "<|im_end|>"]


@pytest.mark.parametrize("bos", [True, False])
def test_scores_match_hand_computation(model, bos):
    tok = word_tokenizer(bos)
    # batch_size 4 over 6 sequences: one full batch, one with two padding rows; lengths differ per batch
    scores = response_scores(model, tok, CONVS, batch_size=4, seq_len=64)
    for conv, score in zip(CONVS, scores):
        turns = [m["content"] for m in conv.messages]
        full = (["<s>"] if bos else []) + rendered(*turns)
        response = [*turns[-1].split(), "<|im_end|>"]
        cond, uncond = ids_of(tok, full), ids_of(tok, (["<s>"] if bos else []) + response)
        skip = 0 if bos else 1  # no BOS: the first response token has no context on the unconditioned side
        n = len(response) - skip
        ce_cond = by_hand(model, cond, list(range(len(cond) - n, len(cond))))
        ce_uncond = by_hand(model, uncond, list(range(len(uncond) - n, len(uncond))))
        assert score.n_tokens == n
        assert score.ce_cond == pytest.approx(ce_cond, abs=1e-5)
        assert score.ce_uncond == pytest.approx(ce_uncond, abs=1e-5)
        assert score.ppl == pytest.approx(math.exp(ce_cond), rel=1e-5)
        assert score.ifd == pytest.approx(ce_cond / ce_uncond, rel=1e-5)
    assert len({round(s.ifd, 6) for s in scores}) == len(scores)  # not one value repeated


def test_unscorable_records_are_none_and_counted(model):
    tok = word_tokenizer(bos=False)
    long = chat(" ".join(f"w{i}" for i in range(40)), "w1 w2")
    convs = [CONVS[0], long, Conversation([], "plain", text="w1 w2 w3"), chat("w1", "w2")]
    report = CurateReport("x", records_in=len(convs))
    scores = response_scores(model, tok, convs, seq_len=16, report=report)
    assert [s is None for s in scores] == [False, True, True, False]
    assert scores[3].n_tokens == 1  # one word and the end token: the end token is scored
    assert report.rejected == {"not scored (longer than seq_len)": 1, "not scored (plain text)": 1}
    assert "48 tokens, more than seq_len 16 holds" in report.rejects[0].detail
    assert response_scores(model, tok, [long], seq_len=64)[0] is not None  # fits once seq_len allows


def test_distribution():
    d = distribution([1.0, 2.0, 3.0, 4.0, float("inf")])
    assert d == {"n": 4, "mean": 2.5, "median": 2.5, "p10": 1.3, "p90": 3.7}
    assert distribution([]) == {"n": 0}
