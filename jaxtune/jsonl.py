"""JSON Lines files (one JSON object per line): one reader and one writer, so every module that reads them
reports a bad line as `file:line` in the same words and checks its own fields against the same line number."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


class DuplicateKeyError(ValueError):
    """A JSON object that gives one key twice (json itself keeps the last value without a word)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """`object_pairs_hook` that refuses a key given twice in one object."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKeyError(k)
        out[k] = v
    return out


STRICT_JSON = json.JSONDecoder(object_pairs_hook=unique_keys)


def read_jsonl(path: str | os.PathLike, error: type[Exception] = ValueError) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line.

    A line that is not JSON, not a JSON object, or gives a key twice raises `error` naming `file:line`; `error` lets a caller keep
    its own exception type (e.g. one its CLI turns into an `error:` line). A leading UTF-8 BOM is ignored."""
    records = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = STRICT_JSON.decode(line)
            except DuplicateKeyError as e:
                raise error(f"{path}:{n}: key {e.key!r} appears twice in one JSON object") from None
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); "
                            "each line must be one JSON object") from None
            except (ValueError, RecursionError) as e:  # integers past Python's digit limit, deep nesting
                raise error(f"{path}:{n}: not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
            if not isinstance(record, dict):
                raise error(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            records.append((n, record))
    return records


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write `rows` one per line (UTF-8, non-ASCII kept as is), creating the parent folder; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return path
