"""One recipe's train step compiled on abstract weights for one device, printed as JSON (XLA's memory_analysis).

    python scripts/bench/recipe_compile.py configs/llama3-8b-qlora.yaml cpu model.attention_impl=blockwise
    python scripts/bench/recipe_compile.py configs/llama3-8b-qlora.yaml v5e:1x1     # XLA:TPU, one v5e chip

The model is the recipe's entry in `bench.recipes.ARCHITECTURES` (no download); the rest are recipe overrides.
`cpu` is what `jaxtune train --dry-run` compiles (loop-invariant code motion off); a TPU topology compiles with
libtpu's compile-only client (`jaxtune.train.plan.topology_devices`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> dict:
    from jaxtune import runtime

    runtime.apply_cpu_defaults()
    import jax
    import transformers

    from bench.recipes import ARCHITECTURES
    from jaxtune.hf.families import from_hf_config
    from jaxtune.recipe import load_recipe
    from jaxtune.train.plan import build_mesh, lower_train_step, topology_devices

    recipe, target, overrides = Path(argv[0]), argv[1], argv[2:]
    cfg = load_recipe(recipe, overrides)
    cls, kw = ARCHITECTURES[recipe.name]
    devices = jax.devices("cpu")[:1] if target == "cpu" else topology_devices(target)
    start = time.perf_counter()
    out = {"recipe": recipe.name, "target": target, "overrides": overrides}
    try:
        plan, _ = lower_train_step(cfg, from_hf_config(getattr(transformers, cls)(**kw)), build_mesh(cfg, devices))
    except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a program that cannot fit the chip's HBM
        return {**out, "does_not_fit": str(e).splitlines()[0], "compile_s": time.perf_counter() - start}
    return {**out, "device": devices[0].device_kind, "compile_s": time.perf_counter() - start, **plan.memory,
            "n_params": plan.n_params, "n_trainable": plan.n_trainable, "batch_shape": list(plan.batch_shape)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
