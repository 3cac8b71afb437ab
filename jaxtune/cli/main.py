"""jaxtune: supervised instruction tuning of Hugging Face causal LMs (curate, train, evaluate, export, pipeline).

Wiring only: each command module registers its subcommands and imports the library (and jax) lazily,
inside the command, so the CPU process defaults are applied before jax loads.

Exit codes: 0 done, 2 bad input (a usage error, or a ValueError/OSError such as a missing file or a bad
recipe field, printed as one `error:` line that names the file and record), 1 `curate` left no records to
write, 3 training stopped by the NaN guard; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

# Top-level command modules, each with `register(subparsers)`.
COMMANDS = ("model", "data", "export", "curate", "train", "generate", "pipeline")
# Modules registering the subcommands of `jaxtune eval …`.
EVAL_COMMANDS = ("eval",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtune", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"jaxtune.cli.{name}").register(sub)
    ev = sub.add_parser("eval", help="evaluate a model: loss, ifeval, rigidity, forgetting, grounded, closedbook, cost, "
                                        "report")
    ev_sub = ev.add_subparsers(dest="eval_command", metavar="EVAL", required=True)
    for name in EVAL_COMMANDS:
        importlib.import_module(f"jaxtune.cli.{name}").register(ev_sub)
    return parser


def prepare_process() -> None:
    """The CPU process defaults (`jaxtune.runtime`), before any command imports jax."""
    from jaxtune.runtime import apply_cpu_defaults

    apply_cpu_defaults()


def main(argv: list[str] | None = None) -> int:
    prepare_process()
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
