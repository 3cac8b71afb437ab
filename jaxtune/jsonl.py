"""JSON Lines files (one JSON object per line): one reader and one writer, so every module that reads them
reports a bad line as `file:line` in the same words and checks its own fields against the same line number."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


def read_jsonl(path: str | os.PathLike, error: type[Exception] = ValueError) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line.

    A line that is not JSON, or not a JSON object, raises `error` naming `file:line`; `error` lets a caller keep
    its own exception type (e.g. one its CLI turns into an `error:` line). A leading UTF-8 BOM is ignored."""
    records = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); "
                            "each line must be one JSON object") from None
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
