"""Read instruction data and normalise every record to one `Conversation` type.

Readers (`data/readers.py`) yield `(source, record)` with source `file:line` (JSON, JSONL, text, CSV) or
`file:row N` (Parquet, `datasets`), so every error names the exact record. Layouts: Alpaca (`instruction`/`input`/`output`, also
self-instruct `instances` and LLaMA-Factory `history`), ShareGPT (`conversations` with `from`/`value`), OpenAI
`messages` (`role`/`content`, tool calls, `reasoning_content`), prompt/completion pairs and plain text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from jaxtune.data.readers import iter_records
from jaxtune.data.report import RecordError, Report, write_rejects

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")
ON_ERROR = ("raise", "skip")

# Canonical column names; `columns` in the config maps any of them to the file's own name.
COLUMNS = ("instruction", "input", "output", "system", "history", "instances", "conversations", "messages",
           "role", "content", "prompt", "completion", "text", "tools", "category", "task_type")
_ALIASES = {"completion": ("completion", "response")}
_ROLE_NAMES = {
    "system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
    "tool": "tool", "observation": "tool", "function_call": "assistant",
}
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Conversation:
    """A normalised record: chat `messages` (role/content dicts), or `text` for plain-text records."""

    messages: list[dict]
    source: str
    text: str | None = None
    tools: list | None = None
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- normalisation

def _col(columns: dict, name: str) -> str:
    return columns.get(name, name)


def detect_format(record: dict, columns: dict, source: str) -> str:
    """The layout of a record from its keys (after the config's column renames)."""
    keys = set(record)
    for fmt, key in (("messages", "messages"), ("sharegpt", "conversations"), ("alpaca", "instruction"),
                     ("prompt_completion", "prompt"), ("text", "text")):
        if _col(columns, key) in keys:
            return fmt
    raise RecordError(source, None, f"cannot tell the data format from keys {sorted(keys)}; set data.format "
                      f"to one of {', '.join(FORMATS)} and map field names with data.columns", "unknown format")


def _field(record: dict, name: str, source: str, *, required: bool = True, kinds=(str,), what=None):
    """A record field, checked for presence and type; `None` counts as missing."""
    value = record.get(name)
    label = what or name
    if value is None:
        if required:
            raise RecordError(source, label, f"not present (the record has {sorted(map(str, record))})",
                              "missing field")
        return None
    if not isinstance(value, kinds):
        want = " or ".join(k.__name__ for k in kinds)
        raise RecordError(source, label, f"expected {want}, got {type(value).__name__}", "wrong type")
    return value


def _check_unicode(value, source: str, where: str = "") -> None:
    """Lone surrogates mark bytes that were not UTF-8 in the file (or escaped halves of a pair). Walked with
    a stack, not recursion, so a record nested as deep as json allows is still checked."""
    stack = [(where, value)]
    while stack:
        at, v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise RecordError(source, at or None, "text is not valid UTF-8", "invalid UTF-8")
        elif isinstance(v, dict):
            for k in v:
                if isinstance(k, str) and _SURROGATE.search(k):
                    raise RecordError(source, at or None, "a key is not valid UTF-8", "invalid UTF-8")
            stack.extend((f"{at}.{k}" if at else str(k), x) for k, x in reversed(list(v.items())))
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{at}[{i}]", x) for i, x in reversed(list(enumerate(v))))


def _alpaca(record: dict, columns: dict, source: str) -> list[Conversation]:
    instr_key = _col(columns, "instruction")
    instruction = _field(record, instr_key, source)
    if not instruction.strip():
        raise RecordError(source, instr_key, "empty instruction", "empty turn")
    system = _field(record, _col(columns, "system"), source, required=False)
    history = _field(record, _col(columns, "history"), source, required=False, kinds=(list,))
    prefix = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(history or []):
        where = f"{_col(columns, 'history')}[{i}]"
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise RecordError(source, where, "expected a [user, assistant] pair of strings", "wrong type")
        if not turn[1].strip():
            raise RecordError(source, where, "assistant reply is empty", "empty assistant turn")
        prefix += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    out_key, inst_key = _col(columns, "output"), _col(columns, "instances")
    if record.get(out_key) is None and record.get(inst_key) is not None:
        instances = _field(record, inst_key, source, kinds=(list,))
        pairs = []
        for k, inst in enumerate(instances):
            where = f"{inst_key}[{k}]"
            if not isinstance(inst, dict):
                raise RecordError(source, where, f"expected an object, got {type(inst).__name__}", "wrong type")
            pairs.append((f"{source} instance {k + 1}" if len(instances) > 1 else source,
                          _field(inst, _col(columns, "input"), source, required=False, what=f"{where}.input"),
                          _field(inst, out_key, source, what=f"{where}.{out_key}"), f"{where}.{out_key}"))
        if not pairs:
            raise RecordError(source, inst_key, "no instances", "missing field")
    else:
        pairs = [(source, _field(record, _col(columns, "input"), source, required=False),
                  _field(record, out_key, source), out_key)]
    convs = []
    meta = _meta(record, columns)
    for src, inp, output, out_label in pairs:
        if not output.strip():
            raise RecordError(source, out_label, "empty assistant turn", "empty assistant turn")
        user = {"role": "user", "content": instruction}
        if inp and inp.strip():
            # Merged content serves chat templates; the separate fields let the Alpaca prompt keep its
            # "### Input:" section.
            user = {"role": "user", "content": f"{instruction}\n\n{inp}", "instruction": instruction, "input": inp}
        convs.append(Conversation(prefix + [user, {"role": "assistant", "content": output}], src, meta=meta))
    return convs


def _content(msg: dict, key: str, source: str, where: str) -> str | None:
    value = msg.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RecordError(source, f"{where}.{key}[{j}]", f"content part of type {kind!r} is not "
                                  "supported (text parts only)", "wrong type")
        return "".join(parts)
    raise RecordError(source, f"{where}.{key}", f"expected string, got {type(value).__name__}", "wrong type")


def _tool_calls(value, source: str, where: str) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RecordError(source, where, f"tool call is not valid JSON ({e.msg})", "wrong type") from None
    calls = value if isinstance(value, list) else [value]
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            raise RecordError(source, f"{where}[{j}]", "a tool call needs a function name", "wrong type")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise RecordError(source, f"{where}[{j}].arguments", "tool call arguments are not valid JSON",
                                  "wrong type") from None
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _messages(items: list, list_key: str, columns: dict, source: str) -> list[dict]:
    """OpenAI `role`/`content` or ShareGPT `from`/`value` turns to canonical message dicts."""
    role_key, content_key = _col(columns, "role"), _col(columns, "content")
    out = []
    for i, msg in enumerate(items):
        where = f"{list_key}[{i}]"
        if not isinstance(msg, dict):
            raise RecordError(source, where, f"expected an object, got {type(msg).__name__}", "wrong type")
        rk = role_key if role_key in msg else ("from" if "from" in msg else role_key)
        ck = content_key if content_key in msg else ("value" if "value" in msg else content_key)
        raw_role = _field(msg, rk, source, what=f"{where}.{rk}")
        if raw_role not in _ROLE_NAMES:
            raise RecordError(source, f"{where}.{rk}", f"{raw_role!r} is not a known role; accepted: "
                              f"{', '.join(sorted(_ROLE_NAMES))}", "unknown role")
        role = _ROLE_NAMES[raw_role]
        content = _content(msg, ck, source, where)
        m: dict = {"role": role, "content": content}
        if raw_role == "function_call":
            m = {"role": "assistant", "content": "", "tool_calls": _tool_calls(content, source, f"{where}.{ck}")}
        elif msg.get("tool_calls"):
            if role != "assistant":
                raise RecordError(source, f"{where}.tool_calls", f"only assistant turns make tool calls, "
                                  f"not {role}", "turn order")
            m["tool_calls"] = _tool_calls(msg["tool_calls"], source, f"{where}.tool_calls")
            m["content"] = content or ""
        elif content is None:
            raise RecordError(source, f"{where}.{ck}", "no content and no tool calls", "missing field")
        if msg.get("reasoning_content") is not None:
            if role != "assistant":
                raise RecordError(source, f"{where}.reasoning_content", "only assistant turns carry reasoning",
                                  "turn order")
            m["reasoning_content"] = _field(msg, "reasoning_content", source, what=f"{where}.reasoning_content")
        for extra in ("name", "tool_call_id"):
            if isinstance(msg.get(extra), str):
                m[extra] = msg[extra]
        out.append(m)
    return out


def _chat(record: dict, fmt: str, columns: dict, source: str) -> list[Conversation]:
    list_key = _col(columns, "messages" if fmt == "messages" else "conversations")
    items = _field(record, list_key, source, kinds=(list,))
    msgs = _messages(items, list_key, columns, source)
    system = _field(record, _col(columns, "system"), source, required=False)
    if system and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": system})
    return [Conversation(msgs, source, tools=_tools(record, columns, source), meta=_meta(record, columns))]


def _tools(record: dict, columns: dict, source: str) -> list | None:
    key = _col(columns, "tools")
    tools = record.get(key)
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise RecordError(source, key, f"not valid JSON ({e.msg})", "wrong type") from None
    if not isinstance(tools, list):
        raise RecordError(source, key, f"expected a list of tool schemas, got {type(tools).__name__}", "wrong type")
    return tools


def _prompt_completion(record: dict, columns: dict, source: str) -> list[Conversation]:
    p_key = _col(columns, "prompt")
    c_key = columns.get("completion") or next(
        (k for k in _ALIASES["completion"] if k in record), "completion")
    prompt = _field(record, p_key, source, kinds=(str, list))
    completion = _field(record, c_key, source, kinds=(str, list))
    msgs = (_messages(prompt, p_key, columns, source) if isinstance(prompt, list)
            else [{"role": "user", "content": prompt}])
    if isinstance(completion, list):
        msgs += _messages(completion, c_key, columns, source)
    else:
        if not completion.strip():
            raise RecordError(source, c_key, "empty assistant turn", "empty assistant turn")
        msgs.append({"role": "assistant", "content": completion})
    system = _field(record, _col(columns, "system"), source, required=False)
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return [Conversation(msgs, source, meta=_meta(record, columns))]


def _text(record: dict, columns: dict, source: str) -> list[Conversation]:
    key = _col(columns, "text")
    text = _field(record, key, source)
    if not text.strip():
        raise RecordError(source, key, "empty text", "empty turn")
    return [Conversation([], source, text=text, meta=_meta(record, columns))]


META = ("category", "task_type")  # record labels carried through to curated output


def _meta(record: dict, columns: dict) -> dict:
    return {k: v for k in META if isinstance(v := record.get(_col(columns, k)), str)}


def validate_turns(conv: Conversation) -> None:
    """Roles in a trainable order: optional system first, user/assistant alternating, tool results only
    after an assistant tool call, ending on a non-empty assistant turn."""
    msgs, src = conv.messages, conv.source
    if not msgs:
        raise RecordError(src, "messages", "no messages", "missing field")
    for i, m in enumerate(msgs):
        role, prev = m["role"], (msgs[i - 1] if i else None)
        prev_role = prev["role"] if prev else None
        if role == "system" and i != 0:
            raise RecordError(src, f"messages[{i}]", "a system message may only come first", "turn order")
        after = "nothing" if prev_role is None else f"{'an' if prev_role == 'assistant' else 'a'} {prev_role} turn"
        if role == "user" and prev_role not in (None, "system", "assistant"):
            raise RecordError(src, f"messages[{i}]", f"user turn follows {after}", "turn order")
        if role == "assistant" and prev_role not in ("user", "tool"):
            raise RecordError(src, f"messages[{i}]", f"assistant turn follows {after}", "turn order")
        if role == "tool" and not (prev_role == "tool" or (prev_role == "assistant" and prev.get("tool_calls"))):
            raise RecordError(src, f"messages[{i}]", "tool result without a preceding assistant tool call",
                              "turn order")
        if role == "assistant" and not (m["content"] or "").strip() and not m.get("tool_calls"):
            raise RecordError(src, f"messages[{i}].content", "empty assistant turn", "empty assistant turn")
    if msgs[-1]["role"] != "assistant":
        raise RecordError(src, f"messages[{len(msgs) - 1}]", f"conversation ends with a {msgs[-1]['role']} "
                          "turn; it must end with an assistant turn", "turn order")


def normalise(record, fmt: str, columns: dict, source: str) -> list[Conversation]:
    """One raw record to its conversation(s) (self-instruct records hold several), validated."""
    if not isinstance(record, dict):
        raise RecordError(source, None, f"expected an object, got {type(record).__name__}", "wrong type")
    _check_unicode(record, source)
    if fmt == "alpaca":
        convs = _alpaca(record, columns, source)
    elif fmt in ("messages", "sharegpt"):
        convs = _chat(record, fmt, columns, source)
    elif fmt == "prompt_completion":
        convs = _prompt_completion(record, columns, source)
    else:
        convs = _text(record, columns, source)
    for c in convs:
        if c.text is None:
            validate_turns(c)
    return convs


def read_records(path_or_name, *, fmt: str | None = None, columns: dict | None = None,
                 on_error: str = "raise") -> tuple[list[Conversation], Report, list[tuple[RecordError, object]]]:
    """`load_records` without writing rejects: returns them so a caller can gather several sources."""
    if fmt not in (None, "auto", *FORMATS):
        raise ValueError(f"data format {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    columns = dict(columns or {})
    unknown = set(columns) - set(COLUMNS)
    if unknown:
        raise ValueError(f"data.columns has unknown key(s) {sorted(unknown)}; known: {', '.join(COLUMNS)}")
    detected = None if fmt in (None, "auto") else fmt
    report, convs, rejects = Report(), [], []
    for source, raw in iter_records(path_or_name):
        report.records_in += 1
        try:
            if isinstance(raw, RecordError):
                raise raw
            if detected is None and isinstance(raw, dict):
                detected = detect_format(raw, columns, source)
            convs.extend(normalise(raw, detected, columns, source))
            report.records_out += 1
        except RecordError as err:
            if on_error == "raise":
                raise
            report.skip(err.kind)
            rejects.append((err, None if isinstance(raw, RecordError) else raw))
    report.format = detected
    if report.records_in == 0:
        raise ValueError(f"{path_or_name}: no records found")
    if not convs:
        raise ValueError(f"{path_or_name}: all {report.records_in} records were rejected ({report.skipped}); "
                         "check data.format and data.columns")
    return convs, report, rejects


def load_records(path_or_name, *, fmt: str | None = None, columns: dict | None = None, on_error: str = "raise",
                 rejects_path: str | Path | None = None) -> tuple[list[Conversation], Report]:
    """Read, detect the layout, normalise and validate; bad records raise or (skip) are counted and written
    to `rejects_path` when given."""
    convs, report, rejects = read_records(path_or_name, fmt=fmt, columns=columns, on_error=on_error)
    if rejects and rejects_path:
        report.rejects_path = str(write_rejects(rejects_path, rejects))
    return convs, report
