"""From a `DataConfig` and a tokenizer to shifted train/validation examples and one report: load, split,
render, tokenize, apply the over-length policy; cached by content hash."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxtune.data import cache
from jaxtune.data.chat import resolve_template
from jaxtune.data.config import DataConfig
from jaxtune.data.formats import Conversation, read_records
from jaxtune.data.report import RecordError, Report, write_rejects
from jaxtune.data.tokenize import adds_bos, fit_counted, shift, tokenize_conversation

_KEY_SETTINGS = ("train", "validation", "val_fraction", "format", "columns", "chat_template", "end_token",
                 "train_on", "seq_len", "overlong", "on_error", "shuffle_seed")


def tokenize_examples(convs: list[Conversation], tokenizer, template: str | None, cfg: DataConfig,
                      report: Report, rejects: list) -> list[dict[str, np.ndarray]]:
    """Tokenize, fit to seq_len and shift; every conversation is counted as kept, truncated, dropped or
    skipped in `report`."""
    bos = adds_bos(tokenizer)
    examples = []
    for conv in convs:
        report.examples_in += 1
        try:
            ids, mask = tokenize_conversation(conv, tokenizer, template, cfg.train_on, end_token=cfg.end_token,
                                              bos=bos)
        except RecordError as err:
            if cfg.on_error == "raise":
                raise
            report.skip(err.kind)
            rejects.append((err, {"text": conv.text} if conv.text is not None else {"messages": conv.messages}))
            continue
        ids, mask = fit_counted(ids, mask, cfg.seq_len, cfg.overlong, report)
        if ids is None:
            continue
        example = shift(ids, mask)
        report.examples_out += 1
        report.tokens += int(example["input_ids"].size)
        report.target_tokens += int(example["loss_mask"].sum())
        examples.append(example)
    return examples


def split_validation(convs: list[Conversation], fraction: float, seed: int):
    """Hold out `fraction` of conversations (at least one), chosen by seed, both sides in file order."""
    n_val = max(1, round(fraction * len(convs)))
    if n_val >= len(convs):
        raise ValueError(f"data.val_fraction {fraction} leaves no training data from {len(convs)} conversations")
    held = np.zeros(len(convs), bool)
    held[np.random.default_rng(seed).permutation(len(convs))[:n_val]] = True
    return [c for c, h in zip(convs, held) if not h], [c for c, h in zip(convs, held) if h]


def _rejects_path(cfg: DataConfig, key: str) -> Path:
    if cfg.rejects_path:
        return Path(cfg.rejects_path)
    base = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.cwd()
    return base / f"rejects-{key}.jsonl"


def prepare_dataset(cfg: DataConfig, tokenizer) -> tuple[list[dict], list[dict], Report]:
    """`(train_examples, val_examples, report)`; examples are dicts of int32 `input_ids`, `targets`,
    `loss_mask` (already shifted), ready for `make_loader`."""
    template = resolve_template(cfg.chat_template, tokenizer)
    files = [cfg.train] + ([cfg.validation] if cfg.validation else [])
    key = cache.cache_key(files, tokenizer, template, {k: getattr(cfg, k) for k in _KEY_SETTINGS})
    if cfg.cache_dir:
        hit = cache.load(cfg.cache_dir, key)
        if hit is not None:
            splits, report = hit
            return splits["train"], splits.get("validation", []), report
    opts = dict(fmt=cfg.format, columns=cfg.columns, on_error=cfg.on_error)
    train_convs, report, rejects = read_records(cfg.train, **opts)
    val_convs: list[Conversation] = []
    if cfg.validation:
        val_convs, val_report, val_rejects = read_records(cfg.validation, **opts)
        report, rejects = report.merge(val_report), rejects + val_rejects
    elif cfg.val_fraction:
        train_convs, val_convs = split_validation(train_convs, cfg.val_fraction, cfg.shuffle_seed)
    train = tokenize_examples(train_convs, tokenizer, template, cfg, report, rejects)
    val = tokenize_examples(val_convs, tokenizer, template, cfg, report, rejects)
    if not train:
        lost = ", ".join(f"{k}: {v}" for k, v in report.lost().items())
        raise ValueError(f"{cfg.train}: no training examples left ({lost}); see data.seq_len and data.on_error")
    if rejects:
        report.rejects_path = str(write_rejects(_rejects_path(cfg, key), rejects))
    if cfg.cache_dir:
        cache.save(cfg.cache_dir, key, {"train": train, "validation": val}, report)
    return train, val, report


def check_ceilings(report: Report, cfg: DataConfig) -> None:
    """Refuse to train on data that lost more than the recipe allows: `data.max_dropped_fraction` of records
    dropped or skipped, `data.max_truncated_fraction` of examples truncated."""
    lost, frac = report.lost(), report.dropped_fraction()
    if frac > cfg.max_dropped_fraction:
        reasons = ", ".join(f"{k}: {v}" for k, v in lost.items())
        fixes = []
        if any(not k.startswith("invalid record") for k in lost):
            fixes.append("raise data.seq_len" + (" or set data.overlong: truncate" if cfg.overlong == "drop" else ""))
        if any(k.startswith("invalid record") for k in lost):
            where = f" listed in {report.rejects_path}" if report.rejects_path else ""
            fixes.append(f"fix the invalid records{where}")
        raise ValueError(f"{cfg.train}: {sum(lost.values())} of {report.units()} records ({frac:.1%}) dropped "
                         f"({reasons}), above data.max_dropped_fraction {cfg.max_dropped_fraction}; "
                         f"{', '.join(fixes)}, or raise data.max_dropped_fraction")
    ceiling, frac = cfg.max_truncated_fraction, report.truncated_fraction()
    if ceiling is not None and frac > ceiling:
        raise ValueError(f"{cfg.train}: {report.truncated} of {report.examples_in} examples ({frac:.1%}) truncated "
                         f"({report.truncated_tokens} tokens cut, {report.truncated_targets} trained), above "
                         f"data.max_truncated_fraction {ceiling}; raise data.seq_len, set data.overlong: drop, "
                         "or raise data.max_truncated_fraction")
