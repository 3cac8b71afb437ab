"""stories260K ends each story with BOS (id 1) and never emits EOS, and its tokenizer starts every sequence
with BOS: for the story domain BOS is the response terminator. The `story` template with end_token "<s>"
trains the terminating BOS (never the leading one), packing keeps one example's leading BOS from being a
target of the one before, and generation stops only on a newly generated BOS."""

from __future__ import annotations

import numpy as np
import pytest

from jaxtune import load_pretrained, load_tokenizer
from jaxtune.data.chat import builtin_template
from jaxtune.data.formats import Conversation
from jaxtune.data.packing import pack_examples
from jaxtune.data.report import RecordError
from jaxtune.data.tokenize import shift, tokenize_conversation
from jaxtune.generate import SamplingParams, generate, prompt_ids, stop_token_ids, stream

BOS, EOS = 1, 2
OPENING = "Once upon a time, there was a little dog."
STORY = Conversation([{"role": "user", "content": OPENING},
                      {"role": "assistant", "content": "The dog liked to play."}], "stories.jsonl:1")
OTHER = Conversation([{"role": "user", "content": "Tom had a red ball."},
                      {"role": "assistant", "content": "He was happy."}], "stories.jsonl:2")
# The greedy story from OPENING ends with BOS after 179 new tokens; this leaves room without running long.
MAX_NEW = 256


@pytest.fixture(scope="module")
def tok(stories_dir):
    return load_tokenizer(stories_dir)


@pytest.fixture(scope="module")
def model(stories_dir):
    return load_pretrained(stories_dir)


def story_ids(conv: Conversation, tok):
    return tokenize_conversation(conv, tok, builtin_template("story"), end_token="<s>")


def test_story_template_trains_the_terminating_bos(tok):
    assert tok.bos_token_id == BOS and tok.eos_token_id == EOS
    ids, mask = story_ids(STORY, tok)
    # <s> | Once upon a time , there was a little do g . \n \n | T he do g li ked to play . <s>
    assert ids.tolist() == [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 400, 428, 426, 13, 13,
                            434, 260, 400, 428, 397, 355, 267, 337, 426, 1]
    assert mask.tolist() == [0] * 15 + [1] * 10
    assert ids[0] == BOS and mask[0] == 0 and ids[-1] == BOS and mask[-1] == 1
    assert np.flatnonzero(ids == BOS).tolist() == [0, ids.size - 1]
    assert tok.decode(ids[mask == 1]) == "The dog liked to play.<s>"

    # Without the end token the template ends the response with the tokenizer's EOS, which stories260K
    # never emits: the terminator has to be set for this domain.
    plain, plain_mask = tokenize_conversation(STORY, tok, builtin_template("story"))
    assert plain[-1] == EOS and plain_mask[-1] == 1 and (plain == BOS).sum() == 1


def test_story_generation_prompt_is_the_training_prefix(tok):
    ids, mask = story_ids(STORY, tok)
    prompt = prompt_ids(tok, OPENING, builtin_template("story"))
    assert prompt == ids[:np.argmax(mask)].tolist()  # BOS, the opening, the blank line


def test_story_template_refuses_system_turns(tok):
    conv = Conversation([{"role": "system", "content": "Be kind."}, *STORY.messages], "stories.jsonl:3")
    with pytest.raises(RecordError, match="story template supports user and assistant messages, not system"):
        story_ids(conv, tok)


def test_packing_keeps_the_next_leading_bos_out_of_the_targets(tok):
    examples = [shift(*story_ids(c, tok)) for c in (STORY, OTHER)]
    n1, n2 = (ex["input_ids"].size for ex in examples)
    batch = pack_examples(examples, seq_len=64)
    assert batch["input_ids"].shape == (1, 64)  # both in one row
    seg, tgt, loss, inp, pos = (batch[k][0] for k in ("segment_ids", "targets", "loss_mask", "input_ids",
                                                      "positions"))
    assert seg.tolist() == [1] * n1 + [2] * n2 + [0] * (64 - n1 - n2)
    assert pos[n1] == 0 and inp[n1] == BOS  # the second example starts its own segment with its BOS ...
    # ... which is an input there, never a target: the only BOS targets are each example's terminator,
    # predicted at its own segment's last position and trained on.
    assert np.flatnonzero(tgt == BOS).tolist() == [n1 - 1, n1 + n2 - 1]
    assert loss[n1 - 1] == 1 and loss[n1 + n2 - 1] == 1
    assert seg[n1 - 1] == 1 and seg[n1 + n2 - 1] == 2
    # Golden masks: prompt targets off, response and terminator on, padding off.
    assert loss.tolist() == [0] * 14 + [1] * 10 + [0] * 11 + [1] * 6 + [0] * (64 - n1 - n2)
    assert (n1, n2) == (24, 17)


def test_stop_token_ids_with_bos_as_terminator(model, tok):
    ids = stop_token_ids(model.config, tok, extra=[BOS])
    assert BOS in ids and EOS in ids
    assert BOS not in stop_token_ids(model.config, tok, builtin_template("story"))  # only when asked for


def test_leading_bos_does_not_stop_generation(model, tok):
    params = SamplingParams(max_new_tokens=8, stop_ids=(BOS, EOS))
    gen = generate(model, [[BOS]], params)
    assert gen.finish_reasons == ["length"] and len(gen.tokens[0]) == 8 and BOS not in gen.tokens[0]


def test_greedy_story_stops_on_the_generated_bos(model, tok):
    prompt = tok.encode(OPENING)
    assert prompt[0] == BOS
    gen = generate(model, [prompt], SamplingParams(max_new_tokens=MAX_NEW, stop_ids=tuple(
        stop_token_ids(model.config, tok, extra=[BOS]))))
    tokens = gen.tokens[0]
    assert gen.finish_reasons == ["stop"] and gen.stop_tokens == [BOS]
    assert 20 < len(tokens) < MAX_NEW and BOS not in tokens and EOS not in tokens
    assert list(stream(model, prompt, SamplingParams(max_new_tokens=MAX_NEW, stop_ids=(BOS, EOS)))) == tokens

    # Stopping on EOS alone, the model runs through its BOS into the next story.
    eos_only = generate(model, [prompt], SamplingParams(max_new_tokens=MAX_NEW, stop_ids=(EOS,)))
    assert eos_only.finish_reasons == ["length"] and eos_only.tokens[0][:len(tokens) + 1] == tokens + [BOS]
