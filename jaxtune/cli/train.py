"""`jaxtune train RECIPE.yaml [--set key=value ...] [--resume [--allow-changes]]`: run a training recipe."""

from __future__ import annotations

import argparse
import sys


def _train(args: argparse.Namespace) -> int:
    from jaxtune.recipe import load_recipe

    if args.allow_changes and not args.resume:
        raise ValueError("--allow-changes applies to --resume only (a new run has no recipe to differ from)")
    cfg = load_recipe(args.recipe, args.set)  # a bad recipe raises ValueError/OSError: cli.main reports it
    if args.dry_run:
        from jaxtune.train.plan import describe_plan

        print(describe_plan(cfg))
        return 0
    from jaxtune.train.loop import TrainingStopped, train

    try:
        result = train(cfg, resume=args.resume, stop_after=args.stop_after, allow_changes=args.allow_changes)
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    tail = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    tail += f"; stopped early: {result.stopped}" if result.stopped else ""
    print(f"done: step {result.step}/{result.total_steps}, last train loss {result.losses[-1]:.4f}{tail}; "
          f"run dir {result.run_dir}" if result.losses else f"nothing to do: run is at step {result.step}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model from a YAML recipe (see configs/)")
    p.add_argument("recipe", help="recipe file, e.g. configs/quickstart.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.steps=50 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in output.run_dir (bit-identical to an unbroken run)")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue although recipe keys that shape training changed (the run's "
                        "old recipe is kept as config.STEP.yaml)")
    p.add_argument("--stop-after", type=int, metavar="STEP",
                   help="end this invocation at STEP (checkpointed; the schedule still spans train.steps)")
    p.add_argument("--dry-run", action="store_true",
                   help="compile the train step on abstract weights and print shapes, shardings and memory; "
                        "loads only the model's config.json")
    p.set_defaults(func=_train)
