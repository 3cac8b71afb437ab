"""The text generator curation calls: `generate_fn(prompts, max_new_tokens, seed) -> completions`.

Self-Instruct and SDFT take any such callable (tests pass a fake one); `model_generate_fn` builds it from a
jaxtune model and tokenizer on top of `jaxtune.generate.generate_text`.
"""

from __future__ import annotations

from typing import Callable, Sequence

GenerateFn = Callable[[Sequence[str], int, int], list[str]]


def model_generate_fn(model, tokenizer, *, temperature: float = 0.7, top_p: float = 0.9, top_k: int = 0,
                      batch_size: int = 16, chat: bool = False, bucket: int = 64) -> GenerateFn:
    """Sample completions in batches of `batch_size`; batch i uses seed `seed + i`, so a run is repeatable
    (a completion depends on its batch, since rows share one sampling key stream).

    `chat=True` wraps each prompt as one user turn of the tokenizer's chat template (for instruction-tuned
    models); otherwise the prompt is continued as plain text, as Self-Instruct does with a base model.
    Prompt lengths round up to a multiple of `bucket` tokens, so batches of similar prompts share one compile.
    """
    from jaxtune.generate import SamplingParams, generate_text

    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True but the tokenizer has no chat template; use plain prompts (chat=False)")
    limit = model.config.max_position_embeddings

    def generate_fn(prompts: Sequence[str], max_new_tokens: int, seed: int) -> list[str]:
        if chat:
            prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                     add_generation_prompt=True) for p in prompts]
        for i, p in enumerate(prompts):
            n = len(tokenizer.encode(p, add_special_tokens=not chat))
            if n + max_new_tokens > limit:
                raise ValueError(f"prompt {i} has {n} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                                 f"the model's {limit} positions. Use fewer in-context examples or fewer new tokens")
        out: list[str] = []
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            chunk = list(prompts[start:start + batch_size])
            # Pad a short batch to a power of two (repeating its first prompt) to bound distinct shapes.
            width = min(batch_size, 1 << (len(chunk) - 1).bit_length())
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                    top_p=top_p, seed=seed + b)
            texts = generate_text(model, tokenizer, chunk + chunk[:1] * (width - len(chunk)), params,
                                  add_special_tokens=not chat, bucket=bucket)
            out += texts[:len(chunk)]
        return out

    return generate_fn


def load_generate_fn(model_dir: str, *, chat: bool | None = False, **kwargs) -> GenerateFn:
    """`model_generate_fn` for an HF model directory; `chat=None` uses the chat template when there is one."""
    from jaxtune.hf.load import load_pretrained, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    return model_generate_fn(load_pretrained(model_dir), tokenizer, chat=chat, **kwargs)
