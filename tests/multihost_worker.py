"""One process of the two-process job in tests/test_multihost.py, started with the cluster in the environment
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) and 4 CPU devices of its own.

`python tests/multihost_worker.py OUT LORA.yaml FULL.yaml` runs the library as a user's job would and writes
OUT/result-<process>.json: its data shard, the LoRA run (2 steps, then `--resume` to the end, exported), the
full fine-tune (exported), what each export gathered and wrote here, and a checkpoint round trip. Then process
1 exits without notice and process 0 waits for it in a collective, which JAX's coordination service must end.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
import weakref
from pathlib import Path

import numpy as np

# The checkpoint round trip: global arrays (name → shape, dtype, mesh axes per dim) placed on the job's
# {fsdp: 2, tensor: 4} mesh, where fsdp spans the two processes and tensor the devices of each.
CKPT_ARRAYS = {
    "trainable": {"across": ((16, 8), "float32", ("fsdp", "tensor")),
                  "bf16_rows": ((6, 4), "bfloat16", ("fsdp", None)),
                  "within": ((3, 12), "float32", (None, "tensor"))},
    "opt_state": {"count": ((), "int32", ()), "replicated": ((5,), "float32", (None,)),
                  "all_devices": ((8,), "int32", (("fsdp", "tensor"),))},
}
CKPT_STEP = 7
CKPT_META = {"step": CKPT_STEP, "note": "saved by every process"}


def ckpt_values() -> dict:
    """The round trip's global arrays as numpy, the same in every process."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    out = {}
    for tree, leaves in CKPT_ARRAYS.items():
        out[tree] = {}
        for name, (shape, dtype, _) in leaves.items():
            dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
            out[tree][name] = (rng.standard_normal(shape) * 100).astype(dt)
    return out


def ckpt_shardings(mesh) -> dict:
    from jax.sharding import NamedSharding, PartitionSpec

    return {tree: {name: NamedSharding(mesh, PartitionSpec(*axes)) for name, (_, _, axes) in leaves.items()}
            for tree, leaves in CKPT_ARRAYS.items()}


def _digest(tree) -> dict[str, str]:
    """sha256 of each leaf's addressable shards (index and bytes), in device order."""
    import jax

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        h = hashlib.sha256()
        for shard in sorted(leaf.addressable_shards, key=lambda s: s.device.id):
            h.update(repr(shard.index).encode() + np.asarray(shard.data).tobytes())
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


def checkpoint_round_trip(directory: Path, mesh) -> dict:
    """Save the arrays with the run's Checkpointer from every process, restore them into the same shardings,
    and compare each shard this process holds, bit for bit."""
    import jax

    from jaxtune.train.checkpoint import Checkpointer

    values, shardings = ckpt_values(), ckpt_shardings(mesh)
    placed = {tree: {name: jax.make_array_from_callback(v.shape, shardings[tree][name], lambda i, v=v: v[i])
                     for name, v in leaves.items()} for tree, leaves in values.items()}
    ckpt = Checkpointer(directory, keep_last=1, keep_best=0)
    ckpt.save(CKPT_STEP, placed["trainable"], placed["opt_state"], CKPT_META)
    ckpt.wait()
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), placed)
    trainable, opt_state, meta = ckpt.restore(CKPT_STEP, like["trainable"], like["opt_state"])
    ckpt.close()
    restored = {"trainable": trainable, "opt_state": opt_state}
    same_shardings = all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(restored)))
    return {"saved": _digest(placed), "restored": _digest(restored), "same_shardings": same_shardings,
            "meta": meta, "shards": sum(len(x.addressable_shards) for x in jax.tree.leaves(restored)),
            "fully_addressable": [x.is_fully_addressable for x in jax.tree.leaves(restored)]}


def shard_rows(cfg) -> dict:
    """The example ids of each row this process's train loader gives, step by step (`make_loaders`, as
    `train` builds it)."""
    from jaxtune.data.prepare import prepare_dataset
    from jaxtune.hf.load import load_tokenizer
    from jaxtune.train.loop import make_loaders

    tokenizer = load_tokenizer(cfg.model.path)
    train_examples, val_examples, _ = prepare_dataset(cfg.data, tokenizer)
    loader, _ = make_loaders(cfg, train_examples, val_examples, tokenizer)
    return {"examples": len(train_examples), "rows_per_step": loader.batch_size,
            "steps": [[r.tolist() for r in loader.rows_at(k)] for k in range(loader.total_steps)]}


class ExportWatch:
    """Counts, in this process, the export directories entered (`atomic_dir`) and the tensors the merged export
    gathers onto the host (`hf.save.host_array`): how many, their bytes, and the most alive at once."""

    def __init__(self):
        import jaxtune.export
        import jaxtune.hf.save
        import jaxtune.lora.peft

        self.reset()
        for module in (jaxtune.export, jaxtune.lora.peft):
            module.atomic_dir = self._counting(module.atomic_dir)
        real = jaxtune.hf.save.host_array

        def host_array(x):
            arr = real(x)
            self.gathered += 1
            self.gathered_bytes += arr.nbytes
            self.alive += 1
            self.peak_alive = max(self.peak_alive, self.alive)
            weakref.finalize(arr, self._released)
            return arr

        jaxtune.hf.save.host_array = host_array

    def _counting(self, atomic_dir):
        def counted(*args, **kwargs):
            self.dirs.append(str(args[0]))
            return atomic_dir(*args, **kwargs)

        return counted

    def _released(self) -> None:
        self.alive -= 1

    def reset(self) -> None:
        self.dirs, self.gathered, self.gathered_bytes, self.alive, self.peak_alive = [], 0, 0, 0, 0

    def report(self) -> dict:
        out = {"dirs": self.dirs, "gathered": self.gathered, "gathered_bytes": self.gathered_bytes,
               "peak_alive": self.peak_alive, "alive_after": self.alive}
        self.reset()
        return out


def failed_export(cfg, directory: Path) -> str:
    """The error each process ends with when process 0's write of a merged export fails after 3 tensors (an
    injected OSError): the other process must not be left waiting in a gather, and must fail too."""
    import jaxtune.hf.save
    from jaxtune.export import save_merged
    from jaxtune.train.loop import load_model
    from jaxtune.train.plan import build_mesh

    real = jaxtune.hf.save.write_safetensors

    def write_three(path, tensors, metadata=None):
        for t in tensors[:3]:
            t.numpy()
        raise OSError(f"injected failure writing {path.name}")

    model, _, _ = load_model(cfg, build_mesh(cfg))
    jaxtune.hf.save.write_safetensors = write_three
    try:
        save_merged(model, None, directory)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        jaxtune.hf.save.write_safetensors = real
    return "written"


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def main(out: Path, lora_yaml: Path, full_yaml: Path) -> int:
    """Every check of the job, written to OUT/result-<process>.json; returns this process's index."""
    import jax
    from jax.experimental import multihost_utils

    from jaxtune.model.sharding import maybe_initialize_distributed
    from jaxtune.recipe import load_recipe
    from jaxtune.train.loop import train
    from jaxtune.train.plan import build_mesh

    assert maybe_initialize_distributed(), "the cluster environment variables did not start jax.distributed"
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the resumed run reads its programs back
    me = jax.process_index()
    lora, full = load_recipe(lora_yaml), load_recipe(full_yaml)
    result = {"process": me, "processes": jax.process_count(), "devices": jax.device_count(),
              "local_devices": jax.local_device_count(), "rows": shard_rows(lora)}
    say(f"process {me}: data shard read")
    watch = ExportWatch()
    first = train(lora, stop_after=2)
    rest = train(lora, resume=True)
    result["lora"] = {"steps": [first.step, rest.step], "losses": first.losses + rest.losses,
                      "export": watch.report()}
    say(f"process {me}: LoRA run done")
    result["full"] = {"losses": train(full).losses, "export": watch.report()}
    say(f"process {me}: full fine-tune done")
    result["failed_export"] = {"error": failed_export(full, out / "failed-export"), "export": watch.report()}
    result["checkpoint"] = checkpoint_round_trip(out / "roundtrip", build_mesh(lora))
    (out / f"result-{me}.json").write_text(json.dumps(result))
    multihost_utils.sync_global_devices("results written")
    return me


def outlive(me: int) -> None:
    """Process 1 exits without notice; process 0 then waits for it in a collective, as a user's job would
    (no exception handling of its own: either gloo reports the lost connection or the collective blocks, and
    either way JAX's coordination service must end the process once process 1's heartbeats stop)."""
    from jax.experimental import multihost_utils

    if me == 1:
        say("process 1: exiting without notice")
        os._exit(97)
    say("process 0: waiting for process 1 in a collective")
    multihost_utils.sync_global_devices("after process 1 is gone")
    say("process 0: the collective returned without process 1")


if __name__ == "__main__":
    from jaxtune.runtime import apply_cpu_defaults

    apply_cpu_defaults()  # as `jaxtune train` does, before jax is imported
    try:
        process = main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
    except BaseException:  # noqa: BLE001 — any failure, reported as the traceback above the exit
        # Exit at once: a Python exit would wait for the other process at JAX's shutdown barrier (300 s) while
        # it waits for this one in a collective; gone, its heartbeats stop and JAX ends the other in 10 s.
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    outlive(process)
