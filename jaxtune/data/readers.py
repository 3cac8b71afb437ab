"""Record readers: JSON, JSON lines, CSV, parquet, plain text, a saved `datasets` directory or a Hub name →
`(source, record)` pairs, where `source` names the file and line (or row) for error messages."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Iterator

from jaxtune.data.report import RecordError
from jaxtune.jsonl import STRICT_JSON, DuplicateKeyError

_TEXT_SUFFIXES = (".txt", ".md", ".text")
_FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".parquet", *_TEXT_SUFFIXES)


def iter_records(path_or_name: str | Path) -> Iterator[tuple[str, object]]:
    """Yield `(source, raw record)`; a per-record read failure is yielded as a `RecordError` value.

    File-level failures (missing file, a JSON array broken mid-way) raise, since no record after them
    can be located.
    """
    path = Path(str(path_or_name)).expanduser()
    if path.is_dir():
        yield from _iter_datasets_dir(path)
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            yield from _iter_parquet(path)
        elif suffix == ".csv":
            yield from _iter_csv(path)
        elif suffix in _TEXT_SUFFIXES:
            yield from _iter_text(path)
        elif suffix in (".json", ".jsonl", ".ndjson"):
            yield from _iter_json(path)
        else:
            raise ValueError(f"{path}: unknown data file type {suffix!r}; use .json, .jsonl, .csv, .parquet, "
                             ".txt or a `datasets` directory")
    elif (re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_name)) and not str(path_or_name).startswith(".")
          and path.suffix.lower() not in _FILE_SUFFIXES):
        yield from _iter_hub(str(path_or_name))
    else:
        raise FileNotFoundError(f"data file {path} does not exist (nor is it a Hub dataset name owner/name)")


def _decode_error(source: str, e: Exception) -> RecordError:
    """A failed decode as a bad record: duplicate key, JSON syntax, or what json refuses beyond syntax
    (integers past Python's digit limit, nesting deeper than the recursion limit)."""
    if isinstance(e, DuplicateKeyError):
        return RecordError(source, e.key, f"key {e.key!r} appears twice in one JSON object", "duplicate key")
    if isinstance(e, json.JSONDecodeError):
        return RecordError(source, None, f"{e.msg} at column {e.colno}", "invalid JSON")
    if isinstance(e, RecursionError):
        return RecordError(source, None, "nested too deeply to read", "invalid JSON")
    return RecordError(source, None, str(e).split(";")[0], "invalid JSON")


def _lines(text: str) -> list[str]:
    """Lines as editors and `open()` count them: not at U+2028, U+0085 and the other breaks that
    `str.splitlines()` also honours, which JSON allows inside strings."""
    return re.split(r"\r\n|\r|\n", text)


def _read_text(path: Path) -> str:
    # surrogateescape keeps invalid UTF-8 bytes as lone surrogates, so the one record holding them is
    # reported (or skipped) instead of the whole file failing to decode.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text


def _iter_json(path: Path) -> Iterator[tuple[str, object]]:
    text = _read_text(path)
    start = len(text) - len(text.lstrip())
    if path.suffix.lower() == ".json" and text[start:start + 1] == "[":
        yield from _iter_json_array(path, text, start)
        return
    if path.suffix.lower() == ".json" and text[start:start + 1] == "{":
        try:
            json.loads(text)
        except (ValueError, RecursionError):
            pass  # not one object: read it as JSON lines
        else:
            raise RecordError(f"{path}:1", None, "the file is a single JSON object; expected an array of records "
                              "or one JSON object per line", "wrong type")
    for lineno, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            record = STRICT_JSON.decode(line)
        except (ValueError, RecursionError) as e:
            record = _decode_error(source, e)
        yield source, record


def _iter_json_array(path: Path, text: str, start: int) -> Iterator[tuple[str, object]]:
    """Records of a JSON array with the line each starts on (json.load alone loses line numbers)."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, start + 1).end()
    line, counted = 1, 0

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    if text[pos:pos + 1] == "]":
        return
    index = 0
    while True:
        # The record index too: a one-line JSON array would otherwise name every record `file:1`.
        source = f"{path}:{line_at(pos)} record {index}"
        try:
            record, end = STRICT_JSON.raw_decode(text, pos)
        except DuplicateKeyError as e:
            # Well-formed, so its end can still be found and the records after it read.
            record, end = _decode_error(source, e), decoder.raw_decode(text, pos)[1]
        except (ValueError, RecursionError) as e:
            where = f"{path}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else source
            err = _decode_error(where, e)
            raise RecordError(where, None, f"{err.detail}; a JSON array cannot be read past this point "
                              "(store the data as JSONL to skip single bad lines)", "invalid JSON") from None
        yield source, record
        index += 1
        pos = ws.match(text, end).end()
        sep = text[pos:pos + 1]
        if sep == "]":
            return
        if sep != ",":
            raise RecordError(f"{path}:{line_at(pos)}", None, "expected ',' or ']' between array records",
                              "invalid JSON")
        pos = ws.match(text, pos + 1).end()


def _iter_csv(path: Path) -> Iterator[tuple[str, object]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    prev_end = 1  # the header line
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. a field over the csv module's size limit: nothing after it can be located
            raise RecordError(f"{path}:{reader.line_num}", None, f"{e}; the file cannot be read past this point",
                              "invalid CSV") from None
        if prev_end == 1:
            _check_header(path, reader.fieldnames)
        source = f"{path}:{prev_end + 1}"
        prev_end = reader.line_num
        if None in row:
            yield source, RecordError(source, None, f"row has more fields than the header "
                                      f"({len(reader.fieldnames)})", "wrong type")
        else:
            yield source, row


def _check_header(path: Path, names: list[str]) -> None:
    """A column named twice would leave only its last value in every row: the whole file is ambiguous."""
    seen = set()
    for name in names:
        if name in seen:
            raise RecordError(f"{path}:1", name, f"column {name!r} appears twice in the header", "duplicate key")
        seen.add(name)


def _iter_text(path: Path) -> Iterator[tuple[str, object]]:
    """Plain text: one record per blank-line-separated paragraph."""
    para: list[str] = []
    first = 0
    for lineno, line in enumerate(_lines(_read_text(path)), 1):
        if line.strip():
            if not para:
                first = lineno
            para.append(line)
        elif para:
            yield f"{path}:{first}", {"text": "\n".join(para)}
            para = []
    if para:
        yield f"{path}:{first}", {"text": "\n".join(para)}


def _iter_parquet(path: Path) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from e
    for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
        yield f"{path}:row {i}", row


def _iter_rows(name: str, ds) -> Iterator[tuple[str, object]]:
    for i, row in enumerate(ds, 1):
        yield f"{name}:row {i}", row


def _iter_datasets_dir(path: Path) -> Iterator[tuple[str, object]]:
    import datasets

    if any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{path}: saved DatasetDict has splits {list(ds)}, no 'train'; "
                                 f"point data.train at {path}/<split>")
            ds = ds["train"]
    else:
        ds = datasets.load_dataset(str(path), split="train")
    yield from _iter_rows(str(path), ds)


def _iter_hub(name: str) -> Iterator[tuple[str, object]]:
    import datasets

    yield from _iter_rows(name, datasets.load_dataset(name, split="train"))
