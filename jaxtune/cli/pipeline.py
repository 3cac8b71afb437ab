"""`jaxtune pipeline RECIPE.yaml [--from STAGE] [--rounds N] [--set key=value ...]`: the refinement loop."""

from __future__ import annotations

import argparse


def _pipeline(args: argparse.Namespace) -> int:
    from jaxtune.pipeline.config import load_pipeline
    from jaxtune.pipeline.run import run_pipeline

    cfg = load_pipeline(args.recipe, args.set)
    run_pipeline(cfg, rounds=args.rounds, from_stage=args.from_stage)
    return 0


def register(sub) -> None:
    from jaxtune.pipeline import STAGES

    p = sub.add_parser("pipeline", help="run the refinement loop: generate, filter, distill, tune, evaluate, "
                                        "report; round after round (see configs/pipeline-tiny.yaml)")
    p.add_argument("recipe", help="pipeline recipe, e.g. configs/pipeline-tiny.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set generate.tasks=100 (repeatable)")
    p.add_argument("--rounds", type=int, default=None, help="number of rounds (default: the recipe's `rounds`)")
    p.add_argument("--from", dest="from_stage", default=None, metavar="STAGE",
                   help=f"re-run from this stage on, even when up to date: one of {', '.join(STAGES)} (its first "
                        "round), or K/STAGE for round K")
    p.set_defaults(func=_pipeline)
