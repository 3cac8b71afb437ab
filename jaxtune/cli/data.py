"""`jaxtune data stats FILE`: look at a data file before training on it."""

from __future__ import annotations

import json
import sys

from jaxtune.data.chat import BUILTIN_TEMPLATES, resolve_template
from jaxtune.data.formats import FORMATS
from jaxtune.data.stats import SHOWN_INVALID, file_stats, format_stats, invalid_error
from jaxtune.data.tokenize import OVERLONG, TRAIN_ON


def _columns(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--column expects CANONICAL=NAME (e.g. completion=answer), got {pair!r}")
        out[key] = value
    return out


def run_stats(args) -> int:
    tokenizer = template = None
    if args.tokenizer:
        from jaxtune.hf.load import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        template = resolve_template(args.template, tokenizer)
    stats, report = file_stats(args.file, fmt=args.format, columns=_columns(args.column), rejects_path=args.rejects,
                               tokenizer=tokenizer, template=template, seq_len=args.seq_len, train_on=args.train_on,
                               end_token=args.end_token, overlong=args.overlong)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    if report.rejects_path:
        print(f"rejected records written to {report.rejects_path}", file=sys.stderr)
    error = invalid_error(stats, report)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="inspect instruction data")
    sub = data.add_subparsers(dest="data_command", metavar="DATA", required=True)
    p = sub.add_parser("stats", help="records, task mix, token lengths, truncation and packing of a data file")
    p.add_argument("file", help="data file (.json/.jsonl/.csv/.parquet/.txt) or datasets directory")
    p.add_argument("--tokenizer", help="tokenizer/model directory; without it only record counts are shown")
    p.add_argument("--seq-len", type=int, default=512, help="sequence length for truncation and packing figures")
    p.add_argument("--template", help=f"chat template: {', '.join(BUILTIN_TEMPLATES)} or a .jinja path "
                   "(default: the tokenizer's)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    p.add_argument("--column", action="append", default=[], metavar="CANONICAL=NAME",
                   help="map a canonical field to the file's column name (repeatable)")
    p.add_argument("--train-on", default="assistant", choices=TRAIN_ON)
    p.add_argument("--overlong", default="truncate", choices=OVERLONG,
                   help="what training does with examples over seq_len (as data.overlong)")
    p.add_argument("--end-token", help="token ending each response in built-in templates (default: eos)")
    p.add_argument("--rejects", help="write every invalid record to this JSONL file (the output lists the first "
                   f"{SHOWN_INVALID}); any invalid record makes the command exit 2")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(func=run_stats)
