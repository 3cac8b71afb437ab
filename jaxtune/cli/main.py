"""jaxtune: supervised instruction tuning of Hugging Face causal LMs (curate, train, evaluate, export, pipeline).

Wiring only: each command module registers its subcommands and imports the library (and jax) lazily,
inside the command, so the CPU process defaults are applied before jax loads.

Exit codes: 0 done, 2 bad input (a usage error, or a ValueError/OSError such as a missing file or a bad
recipe field, printed as one `error:` line that names the file and record), 1 `curate` left no records to
write, 3 training stopped by the NaN guard, 75 training preempted by SIGTERM (a checkpoint was committed:
rerun with --resume); anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

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


def in_multiprocess_job() -> bool:
    jax = sys.modules.get("jax")  # a command that never imported jax started no job
    return jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1


def exit_now(code: int) -> None:
    """End this process of a multi-process job at once. A normal exit would wait at JAX's shutdown barrier for
    the other processes, which wait in a collective for this one: minutes, where the heartbeat timeout ends
    them in seconds once this one is gone."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    prepare_process()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        code = int(args.func(args) or 0)
    except (ValueError, OSError) as e:  # bad paths, recipes, checkpoints, data: one line naming them, exit 2
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except BaseException:
        if in_multiprocess_job():
            traceback.print_exc()
            exit_now(1)
        raise
    if code and in_multiprocess_job():
        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
