"""The text generator curation calls: `generate_fn(prompts, max_new_tokens, seed) -> completions`.

Self-Instruct and SDFT take any such callable (tests pass a fake one). `model_generate_fn` and
`load_generate_fn` build it on a local model through `teachers.LocalTeacher`, the one local-generation path;
`teachers.as_generate_fn` does the same for any teacher, an endpoint included.
"""

from __future__ import annotations

from jaxtune.curate.teachers import GenerateFn, LocalTeacher, TeacherConfig, as_generate_fn

__all__ = ["GenerateFn", "load_generate_fn", "model_generate_fn"]


def model_generate_fn(model, tokenizer, *, temperature: float = 0.7, top_p: float = 0.9, top_k: int = 0,
                      batch_size: int = 16, chat: bool | None = False, bucket: int = 64,
                      stop: tuple[str, ...] = ()) -> GenerateFn:
    """Sample completions with a local model (see `LocalTeacher`); a prompt too long for the model gives "".

    `chat=True` wraps each prompt as one user turn of the tokenizer's chat template (for instruction-tuned
    models), None does so when the tokenizer has one; otherwise the prompt is continued as plain text, as
    Self-Instruct does with a base model."""
    cfg = TeacherConfig(chat=chat, temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size,
                        stop=stop)
    return as_generate_fn(LocalTeacher(model, tokenizer, cfg, bucket=bucket))


def load_generate_fn(model_dir: str, *, chat: bool | None = False, **kwargs) -> GenerateFn:
    """`model_generate_fn` for an HF model directory."""
    from jaxtune.hf.load import load_pretrained, load_tokenizer

    return model_generate_fn(load_pretrained(model_dir), load_tokenizer(model_dir), chat=chat, **kwargs)
