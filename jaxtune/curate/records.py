"""Conversations in, text pieces and files out: what the checks look at, and how curated data is written.

Files are written in a layout `jaxtune.data.formats.load_records` reads back: Alpaca (`instruction`, `input`,
`output`, optional `system`/`history`) whenever every conversation fits it, otherwise OpenAI `messages`
(tool calls, tool turns, reasoning); plain-text records stay `{"text": ...}`.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxtune.data.formats import META, Conversation

_MESSAGE_KEYS = ("role", "content", "tool_calls", "reasoning_content", "name", "tool_call_id")


def responses(conv: Conversation) -> list[str]:
    """The assistant turns (a plain-text record is its own response)."""
    if conv.text is not None:
        return [conv.text]
    return [m.get("content") or "" for m in conv.messages if m["role"] == "assistant"]


def _last_user(conv: Conversation) -> dict | None:
    return next((m for m in reversed(conv.messages) if m["role"] == "user"), None)


def prompt(conv: Conversation) -> str:
    """The last user turn as the model sees it (Alpaca instruction and input together)."""
    user = _last_user(conv)
    return user["content"] if user else ""


def _instruction(user: dict | None) -> str:
    return (user.get("instruction") or user["content"]) if user else ""


def instruction(conv: Conversation) -> str:
    """The last user turn without its Alpaca `input`."""
    return _instruction(_last_user(conv))


def exchanges(conv: Conversation) -> list[tuple[str, str]]:
    """(instruction, response) per assistant turn, the instruction from the user turn before it."""
    out, user = [], None
    for m in conv.messages:
        if m["role"] == "user":
            user = m
        elif m["role"] == "assistant":
            out.append((_instruction(user), m.get("content") or ""))
    return out


def full_text(conv: Conversation) -> str:
    if conv.text is not None:
        return conv.text
    return "\n".join(m.get("content") or "" for m in conv.messages)


def to_alpaca(conv: Conversation) -> dict | None:
    """The Alpaca row for a conversation, or None when it holds what Alpaca cannot (tools, reasoning)."""
    msgs = conv.messages
    if conv.text is not None or conv.tools or not msgs:
        return None
    if any(m["role"] == "tool" or m.get("tool_calls") or m.get("reasoning_content") or m.get("name")
           for m in msgs):
        return None
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    turns = msgs[1:] if system is not None else msgs
    if len(turns) % 2 or [m["role"] for m in turns] != ["user", "assistant"] * (len(turns) // 2):
        return None
    user, answer = turns[-2], turns[-1]
    row = {"instruction": user.get("instruction") or user["content"], "input": user.get("input") or "",
           "output": answer["content"]}
    if system:
        row["system"] = system
    if len(turns) > 2:
        row["history"] = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 2, 2)]
    return row


def to_messages(conv: Conversation) -> dict:
    row: dict = {"messages": [{k: m[k] for k in _MESSAGE_KEYS if m.get(k) is not None} for m in conv.messages]}
    if conv.tools:
        row["tools"] = conv.tools
    return row


def to_rows(convs: list[Conversation]) -> list[dict]:
    """One layout for the whole file (the reader detects the layout once per file)."""
    texts = [c.text is not None for c in convs]
    if any(texts) and not all(texts):
        raise ValueError("cannot write plain-text records and conversations to one file; curate them separately")
    if all(texts):
        rows = [{"text": c.text} for c in convs]
    else:
        alpaca = [to_alpaca(c) for c in convs]
        rows = alpaca if all(r is not None for r in alpaca) else [to_messages(c) for c in convs]
    for row, conv in zip(rows, convs):
        row.update({k: conv.meta[k] for k in META if k in conv.meta})
    return rows


def write_rows(rows: list[dict], path: str | Path) -> Path:
    """`.jsonl`: one record per line; `.json`: one array."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise ValueError(f"{path}: write curated data as .json or .jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if path.suffix.lower() == ".json":
            json.dump(rows, f, ensure_ascii=False, indent=1)
            f.write("\n")
        else:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path


def write_conversations(convs: list[Conversation], path: str | Path) -> Path:
    return write_rows(to_rows(convs), path)
