"""Golden loss masks per chat template, with small word-level tokenizers carrying each template's real special
tokens and (public) chat template, plus the real stories260K tokenizer with the built-in templates."""

import json
import re

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from jaxtune.data.chat import builtin_template
from jaxtune.data.config import DataConfig
from jaxtune.data.formats import Conversation, load_records
from jaxtune.data.prepare import prepare_dataset
from jaxtune.data.report import RecordError
from jaxtune.data.tokenize import adds_bos, tokenize_conversation

# ----------------------------------------------------------------------------------------- templates
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Qwen3, dense and MoE (Qwen3-30B-A3B, Qwen3-235B-A22B ship the same template).
QWEN3 = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

CHATML_GENERATION = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_GENERATION = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Gemma 1, 1.1 and 2 (-it): one template, no system role.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

PHI4_MINI = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# OLMo 2 (-Instruct, Tülu 3 format): the role tags are plain text, BOS and EOS are both <|endoftext|>.
OLMO2 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{% if not loop.last %}"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)

# Granite 3.1 (-instruct), abridged: the documents branches are left out and the tool instructions cut to their
# first sentence (the tests pass neither tools nor documents).
GRANITE3 = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = "Knowledge Cutoff Date: April 2024.\\nToday's Date: " + strftime_now('%B %d, %Y') + ".\\nYou are Granite, developed by IBM." %}
    {%- if tools %}
        {%- set system_message = system_message + " You are a helpful AI assistant with access to the following tools." %}
    {%- else %}
        {%- set system_message = system_message + " You are a helpful AI assistant." %}
    {%- endif %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '<|start_of_role|>system<|end_of_role|>' + system_message + '<|end_of_text|>\\n' }}
{%- if tools %}
    {{- '<|start_of_role|>tools<|end_of_role|>' }}
    {{- tools | tojson(indent=4) }}
    {{- '<|end_of_text|>\\n' }}
{%- endif %}
{%- for message in loop_messages %}
    {{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\\n' }}
    {%- if loop.last and add_generation_prompt %}
        {{- '<|start_of_role|>assistant<|end_of_role|>' }}
    {%- endif %}
{%- endfor %}"""

# Mixtral-8x7B-Instruct-v0.1 (its revised template): an optional system message joins the first [INST].
MIXTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
QWEN3_SPECIALS = QWEN_SPECIALS + ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
                                  "</tool_response>"]
MISTRAL_SPECIALS = ["<s>", "</s>", "[INST]", "[/INST]"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
PHI3_SPECIALS = ["<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
PHI4_SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"]
GRANITE_SPECIALS = ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"]

PIECES = Regex(r"\s+|\w+|[^\w\s]")

SYSTEM = {"role": "system", "content": "You are terse."}
TWO_TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Germany?"},
    {"role": "assistant", "content": "Berlin."},
]


def word_tokenizer(template, specials, convs, *, bos=None, eos=None, post_bos=False):
    """Word-level tokenizer (words, punctuation and whitespace runs are tokens) whose vocabulary covers the
    rendered conversations; `post_bos` adds BOS like Llama 3's post-processor."""

    def build(vocab):
        tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tk.pre_tokenizer = pre_tokenizers.Split(PIECES, behavior="isolated")
        tk.decoder = decoders.Fuse()
        tk.add_special_tokens(specials)
        if post_bos:
            tk.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
        return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token="[UNK]",
                                       chat_template=template)

    vocab = {t: i for i, t in enumerate(["[UNK]", *specials])}
    probe = build(vocab)
    for conv in convs:
        for gen in (False, True):
            text = probe.apply_chat_template(conv.messages, tools=conv.tools, tokenize=False,
                                             add_generation_prompt=gen)
            for piece, _ in probe.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text):
                vocab.setdefault(piece, len(vocab))
    return build(vocab)


def runs(tokenizer, ids, mask):
    """Masked token runs as text (tokens joined), e.g. ['Paris.<|im_end|>']."""
    toks = tokenizer.convert_ids_to_tokens(ids.tolist())
    out, cur = [], []
    for t, m in zip(toks, mask):
        if m:
            cur.append(t)
        elif cur:
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return out


def before_runs(tokenizer, ids, mask, n=3):
    """The n tokens just before each masked run (the end of the turn header)."""
    toks = tokenizer.convert_ids_to_tokens(ids.tolist())
    starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    return ["".join(toks[max(0, s - n):s]) for s in starts]


def marked(tokenizer, ids, mask):
    """The tokens as text with each trained run in «», e.g. '…model\n«Paris.<end_of_turn>»\n…': the whole golden
    mask in one string."""
    out, on = [], False
    for t, m in zip(tokenizer.convert_ids_to_tokens(ids.tolist()), mask):
        if m != on:
            out.append("«" if m else "»")
            on = bool(m)
        out.append(t)
    return "".join(out) + ("»" if on else "")


def conv(messages, tools=None):
    return Conversation(messages=messages, source="inline:1", tools=tools)


# ----------------------------------------------------------------------------------------- golden masks

def test_llama31_golden_mask_with_date_header_and_single_bos():
    c = conv([SYSTEM, *TWO_TURNS])
    tok = word_tokenizer(LLAMA31, LLAMA3_SPECIALS, [c], bos="<|begin_of_text|>", eos="<|eot_id|>", post_bos=True)
    assert adds_bos(tok)
    ids, mask = tokenize_conversation(c, tok, LLAMA31)
    text = tok.decode(ids)
    assert "Today Date: 26 Jul 2024" in text
    assert runs(tok, ids, mask) == ["Paris.<|eot_id|>", "Berlin.<|eot_id|>"]
    assert before_runs(tok, ids, mask) == ["assistant<|end_header_id|>\n\n"] * 2
    assert (ids == tok.convert_tokens_to_ids("<|begin_of_text|>")).sum() == 1 and mask[0] == 0


def test_llama3_builtin_template_golden_mask():
    c = conv([SYSTEM, *TWO_TURNS])
    template = builtin_template("llama3")
    tok = word_tokenizer(template, LLAMA3_SPECIALS, [c], bos="<|begin_of_text|>", eos="<|eot_id|>")
    ids, mask = tokenize_conversation(c, tok, template)
    assert runs(tok, ids, mask) == ["Paris.<|eot_id|>", "Berlin.<|eot_id|>"]
    assert tok.convert_ids_to_tokens(int(ids[0])) == "<|begin_of_text|>"


def test_qwen2_chatml_golden_mask_with_default_system_prompt():
    c = conv(TWO_TURNS)
    tok = word_tokenizer(QWEN2, QWEN_SPECIALS, [c], eos="<|im_end|>")
    ids, mask = tokenize_conversation(c, tok, QWEN2)
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert runs(tok, ids, mask) == ["Paris.<|im_end|>", "Berlin.<|im_end|>"]
    assert before_runs(tok, ids, mask, 2) == ["assistant\n"] * 2
    # train_on variants
    ids_l, mask_l = tokenize_conversation(c, tok, QWEN2, "last_turn")
    assert runs(tok, ids_l, mask_l) == ["Berlin.<|im_end|>"]
    ids_a, mask_a = tokenize_conversation(c, tok, QWEN2, "all")
    assert mask_a.all() and np.array_equal(ids_a, ids)


def test_qwen3_strips_earlier_think_and_trains_final_reasoning():
    c = conv([
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "<think>\nFrance is in Europe.\n</think>\n\nParis."},
        {"role": "user", "content": "And of Germany?"},
        {"role": "assistant", "content": "Berlin.", "reasoning_content": "Germany's capital."},
    ])
    tok = word_tokenizer(QWEN3, QWEN3_SPECIALS, [c], eos="<|im_end|>")
    ids, mask = tokenize_conversation(c, tok, QWEN3)
    assert "France is in Europe" not in tok.decode(ids)
    assert runs(tok, ids, mask) == [
        "Paris.<|im_end|>",
        "<think>\nGermany's capital.\n</think>\n\nBerlin.<|im_end|>",
    ]
    assert before_runs(tok, ids, mask, 2) == ["assistant\n"] * 2


def test_qwen3_tool_call_turn_is_trained_and_tool_result_is_not():
    c = conv([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ])
    tok = word_tokenizer(QWEN3, QWEN3_SPECIALS, [c], eos="<|im_end|>")
    ids, mask = tokenize_conversation(c, tok, QWEN3)
    assert runs(tok, ids, mask) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "<think>\n\n</think>\n\nIt is sunny.<|im_end|>",
    ]


def test_mistral_inst_golden_mask_and_template_refusal():
    c = conv(TWO_TURNS)
    tok = word_tokenizer(MISTRAL, MISTRAL_SPECIALS, [c], bos="<s>", eos="</s>")
    ids, mask = tokenize_conversation(c, tok, MISTRAL)
    assert tok.decode(ids).startswith("<s>[INST] What is the capital of France? [/INST]Paris.</s>")
    assert runs(tok, ids, mask) == ["Paris.</s>", "Berlin.</s>"]
    assert before_runs(tok, ids, mask, 2) == [" [/INST]"] * 2
    with pytest.raises(RecordError, match=r"inline:1: template error.*roles must alternate"):
        tokenize_conversation(conv([SYSTEM, *TWO_TURNS]), tok, MISTRAL)


@pytest.mark.parametrize("template,specials,kw,with_system,golden", [
    (PHI3, PHI3_SPECIALS, {"bos": "<s>", "eos": "<|endoftext|>"}, True,
     ("<|system|>\nYou are terse.<|end|>\n<|user|>\nWhat is the capital of France?<|end|>\n"
      "<|assistant|>\n«Paris.<|end|>»\n<|user|>\nAnd of Germany?<|end|>\n"
      "<|assistant|>\n«Berlin.<|end|>»\n<|endoftext|>")),
    (PHI4_MINI, PHI4_SPECIALS, {"bos": "<|endoftext|>", "eos": "<|endoftext|>"}, True,
     ("<|system|>You are terse.<|end|><|user|>What is the capital of France?<|end|>"
      "<|assistant|>«Paris.<|end|>»<|user|>And of Germany?<|end|><|assistant|>«Berlin.<|end|>»<|endoftext|>")),
    (OLMO2, ["<|endoftext|>", "<|pad|>"], {"bos": "<|endoftext|>", "eos": "<|endoftext|>"}, True,
     ("<|endoftext|><|system|>\nYou are terse.\n<|user|>\nWhat is the capital of France?\n"
      "<|assistant|>\n«Paris.<|endoftext|>»\n<|user|>\nAnd of Germany?\n<|assistant|>\n«Berlin.<|endoftext|>»")),
    (MIXTRAL, ["<s>", "</s>"], {"bos": "<s>", "eos": "</s>", "post_bos": True}, True,
     ("<s> [INST] You are terse.\n\nWhat is the capital of France? [/INST] «Paris.</s>»"
      " [INST] And of Germany? [/INST] «Berlin.</s>»")),
    (MIXTRAL, ["<s>", "</s>"], {"bos": "<s>", "eos": "</s>", "post_bos": True}, False,
     "<s> [INST] What is the capital of France? [/INST] «Paris.</s>» [INST] And of Germany? [/INST] «Berlin.</s>»"),
], ids=["phi3-mini", "phi4-mini", "olmo2", "mixtral-system", "mixtral"])
def test_family_templates_golden_masks(template, specials, kw, with_system, golden):
    """Only each assistant text and its end-of-turn marker are trained: never the role headers, the prompt, the
    system message, the BOS or a trailing EOS the template adds after the last turn (Phi)."""
    c = conv([SYSTEM, *TWO_TURNS] if with_system else TWO_TURNS)
    tok = word_tokenizer(template, specials, [c], **kw)
    ids, mask = tokenize_conversation(c, tok, template)
    assert marked(tok, ids, mask) == golden


def test_gemma_golden_mask_trims_content_and_keeps_one_bos():
    c = conv([*TWO_TURNS[:3], {"role": "assistant", "content": "  Berlin.\n"}])
    tok = word_tokenizer(GEMMA, GEMMA_SPECIALS, [c], bos="<bos>", eos="<eos>", post_bos=True)
    assert adds_bos(tok)
    ids, mask = tokenize_conversation(c, tok, GEMMA)
    assert marked(tok, ids, mask) == (
        "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
        "«Paris.<end_of_turn>»\n<start_of_turn>user\nAnd of Germany?<end_of_turn>\n<start_of_turn>model\n"
        "«Berlin.<end_of_turn>»\n")


def test_gemma_system_message_is_a_one_line_record_error(tmp_path):
    """Gemma 1/2's template raises on a system role: with on_error raise the record is named in one line (the
    CLI prints a ValueError as one line), with skip it is counted and the rest trains."""
    good, bad = {"messages": TWO_TURNS}, {"messages": [SYSTEM, *TWO_TURNS]}
    path = tmp_path / "gemma.jsonl"
    path.write_text(f"{json.dumps(good)}\n{json.dumps(bad)}\n")
    tok = word_tokenizer(GEMMA, GEMMA_SPECIALS, [conv(TWO_TURNS)], bos="<bos>", eos="<eos>", post_bos=True)
    cfg = {"train": str(path), "seq_len": 64, "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(RecordError) as err:
        prepare_dataset(DataConfig(**cfg), tok)
    assert re.fullmatch(re.escape(f"{path}:2: template error (messages): the chat template refused this "
                                  "conversation: System role not supported. Fix the record, ") + ".*", str(err.value))
    assert "\n" not in str(err.value)
    train, _, report = prepare_dataset(DataConfig(**cfg, on_error="skip"), tok)
    assert len(train) == 1 and report.skipped == {"template error": 1}


def test_gemma3_folds_the_system_message_into_the_first_user_turn():
    c = conv([SYSTEM, *TWO_TURNS])
    tok = word_tokenizer(GEMMA3, GEMMA_SPECIALS, [c], bos="<bos>", eos="<eos>", post_bos=True)
    ids, mask = tokenize_conversation(c, tok, GEMMA3)
    assert marked(tok, ids, mask) == (
        "<bos><start_of_turn>user\nYou are terse.\n\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\n«Paris.<end_of_turn>»\n<start_of_turn>user\nAnd of Germany?<end_of_turn>\n"
        "<start_of_turn>model\n«Berlin.<end_of_turn>»\n")


def test_granite3_golden_mask_with_its_default_system_message():
    own = conv([SYSTEM, *TWO_TURNS])
    c = conv(TWO_TURNS)
    tok = word_tokenizer(GRANITE3, GRANITE_SPECIALS, [c, own], bos="<|end_of_text|>", eos="<|end_of_text|>")
    turns = ("<|start_of_role|>user<|end_of_role|>What is the capital of France?<|end_of_text|>\n"
             "<|start_of_role|>assistant<|end_of_role|>«Paris.<|end_of_text|>»\n"
             "<|start_of_role|>user<|end_of_role|>And of Germany?<|end_of_text|>\n"
             "<|start_of_role|>assistant<|end_of_role|>«Berlin.<|end_of_text|>»\n")
    ids, mask = tokenize_conversation(c, tok, GRANITE3)
    system, rest = marked(tok, ids, mask).split("<|end_of_text|>\n", 1)
    assert re.fullmatch(r"<\|start_of_role\|>system<\|end_of_role\|>Knowledge Cutoff Date: April 2024\.\n"
                        r"Today's Date: \S+ \d\d, \d{4}\.\nYou are Granite, developed by IBM\. "
                        r"You are a helpful AI assistant\.", system)
    assert rest == turns
    ids, mask = tokenize_conversation(own, tok, GRANITE3)
    assert marked(tok, ids, mask) == (
        "<|start_of_role|>system<|end_of_role|>You are terse.<|end_of_text|>\n" + turns)


def test_alpaca_prompt_golden_mask_with_and_without_input(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"instruction": "Name a color.", "input": "", "output": "Red."},\n'
                    ' {"instruction": "Translate.", "input": "chat", "output": "cat."}]')
    convs, _ = load_records(path)
    template = builtin_template("alpaca")
    tok = word_tokenizer(template, ["<s>", "</s>"], convs, bos="<s>", eos="</s>")
    ids, mask = tokenize_conversation(convs[0], tok, template)
    assert tok.decode(ids) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a color.\n\n### Response:\nRed.</s>")
    assert runs(tok, ids, mask) == ["Red.</s>"]
    assert before_runs(tok, ids, mask, 4) == [" Response:\n"] and "#" in tok.decode(ids[:-3])
    ids, mask = tokenize_conversation(convs[1], tok, template)
    assert "paired with an input" in tok.decode(ids)
    assert "### Instruction:\nTranslate.\n\n### Input:\nchat\n\n### Response:\ncat.</s>" in tok.decode(ids)
    assert runs(tok, ids, mask) == ["cat.</s>"]
    # a configurable end-of-response token replaces eos
    ids, mask = tokenize_conversation(convs[0], tok, template, end_token="<s>")
    assert runs(tok, ids, mask) == ["Red.<s>"]


@pytest.mark.parametrize("template,specials,kw", [
    (CHATML_GENERATION, QWEN_SPECIALS, {"eos": "<|im_end|>"}),
    (LLAMA3_GENERATION, LLAMA3_SPECIALS, {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>"}),
])
def test_span_masks_agree_with_generation_markers(template, specials, kw):
    c = conv([SYSTEM, *TWO_TURNS, {"role": "user", "content": "Thanks!"},
              {"role": "assistant", "content": "  You are welcome.  "}])
    tok = word_tokenizer(template, specials, [c], **kw)
    ids, mask = tokenize_conversation(c, tok, template)
    hf = tok.apply_chat_template(c.messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids.tolist() == list(hf["input_ids"])
    assert mask.tolist() == list(hf["assistant_masks"])
    assert sum(mask) > 0


# ----------------------------------------------------------------------------------------- refusals

def test_template_that_drops_tool_calls_is_refused():
    c = conv([{"role": "user", "content": "Weather?"},
              {"role": "assistant", "content": "Checking.", "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": {}}}]},
              {"role": "tool", "content": "sunny"},
              {"role": "assistant", "content": "Sunny."}])
    template = builtin_template("llama3")
    tok = word_tokenizer(template, LLAMA3_SPECIALS, [c], bos="<|begin_of_text|>", eos="<|eot_id|>")
    with pytest.raises(RecordError, match=r"inline:1: template drops content \(messages\[1\].tool_calls\)"):
        tokenize_conversation(c, tok, template)
    c.messages[1]["content"] = ""
    with pytest.raises(RecordError, match=r"\(messages\[1\].tool_calls\).*tool calls verbatim"):
        tokenize_conversation(c, tok, template)


def test_chatml_builtin_renders_tools_tool_calls_and_reasoning():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    c = conv([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny.", "reasoning_content": "The tool said so."},
    ], tools=tools)
    template = builtin_template("chatml")
    tok = word_tokenizer(template, QWEN3_SPECIALS, [c], eos="<|im_end|>")
    ids, mask = tokenize_conversation(c, tok, template)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n# Tools") and '"name": "get_weather"' in text.split("<|im_end|>")[0]
    assert "<|im_start|>tool\nsunny<|im_end|>" in text
    assert runs(tok, ids, mask) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "<think>\nThe tool said so.\n</think>\n\nIt is sunny.<|im_end|>",
    ]


def test_template_that_drops_reasoning_or_a_turn_is_refused():
    tok = word_tokenizer(QWEN2, QWEN_SPECIALS, [conv(TWO_TURNS)], eos="<|im_end|>")
    reasoning = conv([TWO_TURNS[0], {"role": "assistant", "content": "Paris.", "reasoning_content": "Easy."}])
    with pytest.raises(RecordError, match=r"messages\[1\].reasoning_content"):
        tokenize_conversation(reasoning, tok, QWEN2)
    no_system = ("{% for m in messages %}{% if m.role != 'system' %}"
                 "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(RecordError, match=r"messages\[0\].content.*system message"):
        tokenize_conversation(conv([SYSTEM, *TWO_TURNS]), tok, no_system)


def test_assistant_turn_without_end_marker_is_refused():
    template = "{% for m in messages %}{{ m.role + ': ' + m.content + '\n' }}{% endfor %}"
    c = conv(TWO_TURNS)
    tok = word_tokenizer(template, ["</s>"], [c], eos="</s>")
    with pytest.raises(RecordError, match="no end of turn"):
        tokenize_conversation(c, tok, template)


def test_missing_template_names_the_fix():
    c = conv(TWO_TURNS)
    tok = word_tokenizer(None, ["</s>"], [], eos="</s>")
    with pytest.raises(ValueError, match="no chat template; set data.chat_template"):
        tokenize_conversation(c, tok, None)


# ----------------------------------------------------------------------------------------- real tokenizer

@pytest.fixture(scope="module")
def stories_tok(stories_dir):
    return AutoTokenizer.from_pretrained(stories_dir)


@pytest.mark.parametrize("name,end", [("alpaca", "</s>"), ("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_stories260k_builtin_templates(stories_tok, assets_dir, name, end):
    convs, _ = load_records(assets_dir / "data" / "alpaca_data_1k.json")
    template = builtin_template(name)
    for c in convs[:20]:
        ids, mask = tokenize_conversation(c, stories_tok, template)
        answer = c.messages[-1]["content"]
        assert ids[0] == stories_tok.bos_token_id and (ids == stories_tok.bos_token_id).sum() == 1
        # (this tokenizer's normalizer collapses repeated spaces, so compare whitespace-normalised)
        assert stories_tok.decode(ids[mask == 1]).split() == (answer + end).split()
        # the masked tokens are one contiguous run ending at the last token (or before chatml's newline)
        on = np.flatnonzero(mask)
        assert np.array_equal(on, np.arange(on[0], on[-1] + 1))
        assert "Response" not in stories_tok.decode(ids[mask == 1]) or "Response" in answer
