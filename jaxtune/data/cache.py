"""Tokenized-data cache: one .npz per key, the key hashing data file contents, tokenizer, template and every
setting that changes the examples, so a rerun with the same inputs skips tokenization and any change misses.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from jaxtune.data.report import Report

# Bump when tokenization, example layout or the cached report's fields change, so old caches are not reused.
PIPELINE_VERSION = 2
_FIELDS = ("input_ids", "targets", "loss_mask")


def digest_path(path_or_name: str) -> str:
    """Content hash of a file or of every file under a directory; a Hub name hashes as its name."""
    path = Path(path_or_name).expanduser()
    h = hashlib.sha256()
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = sorted((str(p.relative_to(path)), p) for p in path.rglob("*") if p.is_file())
    else:
        h.update(f"name:{path_or_name}".encode())
        files = []
    for rel, p in files:
        h.update(rel.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def digest_tokenizer(tokenizer) -> str:
    """Hash of what decides token ids: the serialized fast tokenizer (or vocab), special tokens, class."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(repr(tokenizer("a")["input_ids"]).encode())
    return h.hexdigest()


def cache_key(files: list[str], tokenizer, template: str | None, settings: dict) -> str:
    h = hashlib.sha256(f"v{PIPELINE_VERSION}".encode())
    for f in files:
        h.update(digest_path(f).encode())
    h.update(digest_tokenizer(tokenizer).encode())
    h.update((template or "").encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def cache_file(cache_dir: str, key: str) -> Path:
    return Path(cache_dir).expanduser() / f"tokenized-{key}.npz"


def save(cache_dir: str, key: str, splits: dict[str, list[dict]], report: Report) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a half cache that later loads."""
    path = cache_file(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"report": np.asarray(json.dumps(report.to_dict()))}
    for split, examples in splits.items():
        arrays[f"{split}/lengths"] = np.asarray([ex["input_ids"].shape[0] for ex in examples], np.int64)
        for k in _FIELDS:
            arrays[f"{split}/{k}"] = (np.concatenate([ex[k] for ex in examples]).astype(np.int32)
                                      if examples else np.zeros(0, np.int32))
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(cache_dir: str, key: str) -> tuple[dict[str, list[dict]], Report] | None:
    path = cache_file(cache_dir, key)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        report = Report.from_dict(json.loads(str(z["report"])))
        splits = {}
        for name in {k.split("/")[0] for k in z.files if "/" in k}:
            bounds = np.concatenate([[0], np.cumsum(z[f"{name}/lengths"])])
            cols = {k: z[f"{name}/{k}"] for k in _FIELDS}
            splits[name] = [{k: cols[k][a:b] for k in _FIELDS} for a, b in zip(bounds[:-1], bounds[1:])]
    report.cache_hit = True
    return splits, report
