"""Chat templates and the character spans of assistant turns in a rendered conversation.

Loss masks come from rendering the whole conversation once and finding each message in the rendered text,
instead of rendering prefixes and diffing: a prefix's rendering is not always a prefix of the whole (Qwen3
strips `<think>` from earlier turns, Llama 3.1 adds a date header). Each message must be found in order,
so a template that silently drops a turn, a tool call or the final reasoning is refused, not trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from jaxtune.data.formats import Conversation
from jaxtune.data.report import RecordError

BUILTIN_TEMPLATES = ("chatml", "llama3", "alpaca", "story")
# End-of-turn markers of common templates; the tokenizer's eos (or data.end_token) is added per call.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
               "<|eom_id|>")


def builtin_template(name: str) -> str:
    if name not in BUILTIN_TEMPLATES:
        raise ValueError(f"no built-in chat template {name!r}; built-ins: {', '.join(BUILTIN_TEMPLATES)}")
    return (resources.files("jaxtune.data") / "templates" / f"{name}.jinja").read_text(encoding="utf-8")


def resolve_template(spec: str | None, tokenizer) -> str | None:
    """The Jinja text for `data.chat_template`: None = the tokenizer's own, a built-in name, or a file."""
    if spec is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):
            own = own.get("default")
        return own
    if spec in BUILTIN_TEMPLATES:
        return builtin_template(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ValueError(f"data.chat_template {spec!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) "
                     "nor an existing .jinja file")


def require_template(template: str | None, tokenizer) -> str:
    if template is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name} has no chat template; set data.chat_template to one of "
                         f"{', '.join(BUILTIN_TEMPLATES)} or a path to a .jinja file")
    return template


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation and, per assistant message, the [start, end) characters it is trained on."""

    text: str
    spans: tuple[tuple[int, int, int], ...]  # (message index, start, end)


def render(conv: Conversation, tokenizer, template: str, *, end_token: str | None = None,
           add_generation_prompt: bool = False, messages: list[dict] | None = None) -> str:
    """apply_chat_template to text; a template's own refusal (raise_exception) becomes a RecordError."""
    import jinja2

    extra = {"eos_token": end_token} if end_token else {}
    try:
        return tokenizer.apply_chat_template(
            conv.messages if messages is None else messages, tools=conv.tools, chat_template=template,
            tokenize=False, add_generation_prompt=add_generation_prompt, **extra)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:
        raise RecordError(conv.source, "messages", f"the chat template refused this conversation: {e}",
                          "template error") from None


def _header(conv: Conversation, tokenizer, template: str, end_token: str | None) -> str:
    """Text the template emits to open an assistant turn (its generation prompt), '' if it has none."""
    first = next(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
    prefix = conv.messages[:first]
    try:
        plain = render(conv, tokenizer, template, end_token=end_token, messages=prefix)
        prompted = render(conv, tokenizer, template, end_token=end_token, messages=prefix, add_generation_prompt=True)
    except RecordError:
        return ""
    return prompted[len(plain):] if prompted.startswith(plain) else ""


def _variants(message: dict) -> list[str]:
    """Ways a template may render a message's text: verbatim, trimmed, or (Qwen3, earlier turns) with the
    inline `<think>…</think>` block removed; the Alpaca prompt shows the instruction, not the merged text."""
    content = message.get("content") or ""
    out = [content, content.strip()]
    if "</think>" in content:
        after = content.split("</think>")[-1].lstrip("\n")
        out += [after, after.strip()]
    if message.get("instruction"):
        out.append(message["instruction"])
    return [v for v in dict.fromkeys(out)]


def _find(text: str, message: dict, start: int) -> tuple[int, int] | None:
    best = None
    for v in _variants(message):
        if not v:
            continue
        at = text.find(v, start)
        if at >= 0 and (best is None or at < best[0] or (at == best[0] and at + len(v) > best[1])):
            best = (at, at + len(v))
    return best


def _anchor(text: str, message: dict, start: int) -> tuple[int, int] | None:
    """Where an assistant message's own text is: its content, or for a pure tool call the function names."""
    if (message.get("content") or "").strip():
        return _find(text, message, start)
    first = end = None
    for call in message.get("tool_calls") or []:
        at = text.find(call["function"]["name"], start if end is None else end)
        if at < 0:
            return None
        first = at if first is None else first
        end = at + len(call["function"]["name"])
    return None if first is None else (first, end)


def _assistant_body(text: str, message: dict, header: str, cursor: int):
    """(start of the trained span, (content start, content end)) of an assistant turn after `cursor`.

    The span starts right after the turn header when the template has one, so text the template puts
    before the content (Qwen3's `<think>` block) is trained too. The header is searched first; if the
    content is not after it (a template that skips the header), the content is found directly and the
    last header before it, if any, is used.
    """
    if header:
        head = text.find(header, cursor)
        if head >= 0:
            found = _anchor(text, message, head + len(header))
            if found is not None:
                return head + len(header), found
    found = _anchor(text, message, cursor)
    if found is None:
        return None, None
    head = text.rfind(header, cursor, found[0]) if header else -1
    return (head + len(header) if head >= 0 else found[0]), found


def locate_spans(text: str, conv: Conversation, header: str, end_markers: tuple[str, ...]) -> tuple:
    """Character spans of assistant turns: from the end of the turn header (or the content) through the
    first end-of-turn marker after the content, so the stop token is learned and the header is not."""
    spans, cursor, src = [], 0, conv.source
    last_reasoning = max((i for i, m in enumerate(conv.messages) if m.get("reasoning_content")), default=None)
    for i, m in enumerate(conv.messages):
        role = m["role"]
        if role != "assistant":
            if not (m.get("content") or "").strip():
                continue
            found = _find(text, m, cursor)
            if found is None:
                raise RecordError(src, f"messages[{i}].content", f"the chat template does not render this {role} "
                                  "message verbatim (dropped or rewritten); use a template that keeps it",
                                  "template drops content")
            cursor = found[1]
            continue
        start, found = _assistant_body(text, m, header, cursor)
        if found is None:
            what = "content" if (m.get("content") or "").strip() else "tool_calls"
            raise RecordError(src, f"messages[{i}].{what}", f"the chat template does not render this assistant "
                              f"message's {what.replace('_', ' ')} verbatim, so its loss span cannot be located",
                              "template drops content")
        ends = [(at, len(mk)) for mk in end_markers if (at := text.find(mk, found[1])) >= 0]
        if not ends:
            raise RecordError(src, f"messages[{i}]", f"no end-of-turn marker ({', '.join(end_markers)}) follows "
                              "this assistant turn in the rendered text, so the model would never learn to stop; "
                              "set data.end_token or use a template that closes assistant turns", "no end of turn")
        at, n = min(ends)
        end = at + n
        for call in m.get("tool_calls") or []:
            if call["function"]["name"] not in text[start:end]:
                raise RecordError(src, f"messages[{i}].tool_calls", "the chat template does not render tool "
                                  "calls; use a template with tool support", "template drops content")
        if i == last_reasoning and m["reasoning_content"].strip() not in text[start:end]:
            raise RecordError(src, f"messages[{i}].reasoning_content", "the chat template does not render "
                              "reasoning_content; use a template that does (e.g. Qwen3's) or remove it",
                              "template drops content")
        spans.append((i, start, end))
        cursor = end
    for tool in conv.tools or []:
        name = (tool.get("function", tool) if isinstance(tool, dict) else {}).get("name")
        if name and name not in text:
            raise RecordError(src, "tools", f"the chat template does not render the tool list (tool {name!r} "
                              "missing); use a template with tool support", "template drops content")
    return tuple(spans)


def render_with_spans(conv: Conversation, tokenizer, template: str, *, end_token: str | None = None) -> Rendered:
    """Render once and locate every assistant turn's trained characters."""
    text = render(conv, tokenizer, template, end_token=end_token)
    markers = tuple(dict.fromkeys(
        mk for mk in (end_token, getattr(tokenizer, "eos_token", None), *END_OF_TURN) if mk))
    header = _header(conv, tokenizer, template, end_token)
    return Rendered(text, locate_spans(text, conv, header, markers))
