"""Fault-injection points for crash-safety tests: `JAXTUNE_FAULT=<name>` makes the process exit at once
(no cleanup, as a kill would) when it reaches `fault_point("<name>")`; `JAXTUNE_FAULT_STEP=N` narrows a
per-step point (`fault_at`) to step N. Unset, a point costs one dict lookup."""

from __future__ import annotations

import os
import sys

EXIT_CODE = 97  # what a test expects from a process stopped at a fault point


def fault_point(name: str) -> None:
    """Exit immediately if `JAXTUNE_FAULT` names this point (comma-separated names allowed)."""
    wanted = os.environ.get("JAXTUNE_FAULT")
    if wanted and name in wanted.split(","):
        print(f"[jaxtune] fault injected at {name!r}: exiting", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)


def fault_at(name: str, step: int) -> None:
    """`fault_point(name)`, only at the step `JAXTUNE_FAULT_STEP` names when that is set."""
    at = os.environ.get("JAXTUNE_FAULT_STEP")
    if not at or int(at) == step:
        fault_point(name)
