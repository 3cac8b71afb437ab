"""`DataConfig`: the `data:` section of a recipe, checked when it is built so mistakes surface before any
tokenization starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jaxtune.cache import cache_dir as cache_root
from jaxtune.data.chat import BUILTIN_TEMPLATES
from jaxtune.data.formats import COLUMNS, FORMATS, ON_ERROR
from jaxtune.data.tokenize import OVERLONG, TRAIN_ON


def _fail(name: str, value, want: str) -> ValueError:
    return ValueError(f"data.{name} must be {want}, got {value!r}")


@dataclass
class DataConfig:
    """Where the data is and how it becomes batches.

    train / validation: file (.json/.jsonl/.csv/.parquet/.txt), `datasets` directory or Hub name.
    val_fraction: share of train records held out when no validation file is given.
    format: auto or one of alpaca, sharegpt, messages, prompt_completion, text; columns: canonical name ->
    the file's name (e.g. {completion: answer}).
    chat_template: None (the tokenizer's), chatml, llama3, alpaca, story, or a .jinja path; end_token: the token
    that ends a response (default the tokenizer's eos; stories260K never emitted eos in pretraining).
    train_on: assistant | all | last_turn. overlong: truncate (keep prompt head) | drop.
    on_error: raise | skip (skips are counted and written to rejects_path, default in cache_dir).
    max_dropped_fraction / max_truncated_fraction: ceilings on the share of records dropped or skipped and of
    examples truncated (null: none) above which training refuses to start (see data_report.json).
    cache_dir: tokenized-data cache (default `$JAXTUNE_CACHE_DIR/data`, see jaxtune/cache.py); null disables it.
    """

    train: str
    validation: str | None = None
    val_fraction: float = 0.0
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    chat_template: str | None = None
    end_token: str | None = None
    train_on: str = "assistant"
    seq_len: int = 512
    packing: bool = True
    overlong: str = "truncate"
    on_error: str = "raise"
    rejects_path: str | None = None
    shuffle_seed: int = 0
    cache_dir: str | None = field(default_factory=lambda: str(cache_root() / "data"))
    num_epochs: int = 1
    max_dropped_fraction: float = 0.05
    max_truncated_fraction: float | None = None

    def __post_init__(self):
        if not isinstance(self.train, str) or not self.train:
            raise _fail("train", self.train, "a data file, directory or dataset name")
        for name in ("validation", "end_token", "rejects_path", "cache_dir", "chat_template"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _fail(name, value, "a non-empty string or null")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) \
                or not 0 <= self.val_fraction < 1:
            raise _fail("val_fraction", self.val_fraction, "a number in [0, 1)")
        if self.validation and self.val_fraction:
            raise ValueError("set either data.validation (a file) or data.val_fraction (a split of train), not both")
        choices = {"format": ("auto", *FORMATS), "train_on": TRAIN_ON, "overlong": OVERLONG, "on_error": ON_ERROR}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise _fail(name, getattr(self, name), "one of " + ", ".join(allowed))
        if not isinstance(self.columns, dict) or not all(isinstance(v, str) and v for v in self.columns.values()):
            raise _fail("columns", self.columns, "a mapping of canonical field names to column names")
        unknown = sorted(set(self.columns) - set(COLUMNS))
        if unknown:
            raise ValueError(f"data.columns has unknown key(s) {unknown}; known: {', '.join(COLUMNS)}")
        for name, low in (("seq_len", 2), ("num_epochs", 1), ("shuffle_seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise _fail(name, value, f"an integer >= {low}")
        for name, want in (("max_dropped_fraction", "a fraction in [0, 1]"),
                           ("max_truncated_fraction", "a fraction in [0, 1] or null")):
            value = getattr(self, name)
            if (value is not None or name == "max_dropped_fraction") and (
                    isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
                raise _fail(name, value, want)
        if not isinstance(self.packing, bool):
            raise _fail("packing", self.packing, "true or false")
        spec = self.chat_template
        if spec is not None and spec not in BUILTIN_TEMPLATES and not Path(spec).expanduser().is_file():
            raise _fail("chat_template", spec, f"null, one of {', '.join(BUILTIN_TEMPLATES)}, or an existing "
                        ".jinja file")
