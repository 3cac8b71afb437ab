"""`jaxtune` command line: wiring only. Each area registers its subcommands; heavy imports stay lazy.

Exit codes: 0 done, 2 bad input (a usage error, or a ValueError/OSError such as a missing file or a bad
recipe field, printed as one `error:` line that names the file and record), 1 `curate` left no records to
write, 3 training stopped by the NaN guard; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, register function) per top-level command group; each adds its own subparser(s).
_TOP_LEVEL = (
    ("jaxtune.cli_model", "register"),
    ("jaxtune.data.cli", "register"),
    ("jaxtune.cli_lora", "register"),
    ("jaxtune.curate.cli", "register"),
    ("jaxtune.cli_train", "register"),
    ("jaxtune.cli_generate", "register"),
)
# Subcommands of `jaxtune eval …` (loss, ifeval, forgetting, report).
_EVAL = (
    ("jaxtune.eval.ifeval", "register"),
    ("jaxtune.eval.rigidity", "register"),
    ("jaxtune.eval.commands", "register"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtune", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, fn in _TOP_LEVEL:
        getattr(importlib.import_module(module), fn)(sub)
    if _EVAL:
        ev = sub.add_parser("eval", help="evaluate a model: loss, ifeval, forgetting, report")
        ev_sub = ev.add_subparsers(dest="eval_command", metavar="EVAL", required=True)
        for module, fn in _EVAL:
            getattr(importlib.import_module(module), fn)(ev_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:  # bad paths, recipes, checkpoints, data: one line naming them, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
