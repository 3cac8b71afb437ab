"""`jaxtune train RECIPE.yaml [--set key=value ...] [--resume [--allow-changes]]`: run a training recipe.

Exit codes: 0 done (or stopped early by the forgetting check), 2 bad input, 3 stopped by the NaN guard, 75
preempted: a SIGTERM (a spot or TPU VM's preemption notice) ended the run after the current step, whose
checkpoint is committed; the same command with `--resume` continues it bit for bit. 75 is sysexits'
EX_TEMPFAIL, "try again later", so a supervisor can tell it from a failure and restart with `--resume`.
"""

from __future__ import annotations

import argparse
import shlex
import sys

PREEMPTED = 75  # exit code of a run a SIGTERM ended (checkpointed, to be resumed)


def _train(args: argparse.Namespace) -> int:
    from jaxtune.recipe import load_recipe

    if args.topology and not args.dry_run:
        raise ValueError("--topology applies to --dry-run only (it compiles for a TPU slice this host is not)")
    if args.allow_changes and not args.resume:
        raise ValueError("--allow-changes applies to --resume only (a new run has no recipe to differ from)")
    cfg = load_recipe(args.recipe, args.set)  # a bad recipe raises ValueError/OSError: cli.main reports it
    if args.dry_run:
        from jaxtune.train.plan import describe_plan

        print(describe_plan(cfg, args.topology))
        return 0
    from jaxtune.train.loop import TrainingStopped, train

    try:
        result = train(cfg, resume=args.resume, stop_after=args.stop_after, allow_changes=args.allow_changes,
                       handle_sigterm=True)
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if result.preempted:
        saved = f"checkpoint step {result.step} is in {result.checkpoint_dir}" if result.step else "no checkpoint yet"
        again = ["jaxtune", "train", args.recipe, *(x for kv in args.set for x in ("--set", kv)), "--resume",
                 *(["--stop-after", str(args.stop_after)] if args.stop_after else [])]
        print(f"preempted: SIGTERM at step {result.step}/{result.total_steps}; {saved}; resume with: "
              f"{shlex.join(again)}", flush=True)
        return PREEMPTED
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
    p.add_argument("--topology", metavar="NAME",
                   help="with --dry-run: compile for this TPU slice instead of this host's devices, e.g. v5e:2x4 "
                        "or v5p:2x4x4 (chips per dimension; needs libtpu: pip install 'jax[tpu]')")
    p.set_defaults(func=_train)
