"""Multi-host training on JAX's own runtime: two CPU processes on localhost (4 devices each, one mesh over all
8, fsdp across the processes) run the library as a job would (tests/multihost_worker.py), with the cluster given
only through JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. Each result is checked against one
process (this one, 8 devices) running the same recipes on a mesh of the same shape.

One job serves every test here: the two processes start once (module fixture), the reference runs while they
do, and the job ends with process 1 dying so that the last test can time how long process 0 survives it."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from hf_models import torch_logits
from multihost_worker import CKPT_ARRAYS, CKPT_META, CKPT_STEP, ckpt_values

from jaxtune.hf.safetensors import read_safetensors

WORKER = Path(__file__).with_name("multihost_worker.py")
REPO = Path(__file__).resolve().parents[1]
DEADLINE = 300  # seconds for the job's results; a hang fails the test instead of the CI job
MESH = {"fsdp": 2, "tensor": 4}
STEPS = {"lora": 4, "full": 2}


def _recipe(assets: Path, data: Path, run_dir: Path, mode: str) -> dict:
    """A few steps of stories260K on short Alpaca records: global batch 8, one row per device."""
    recipe = {"model": {"path": str(assets / "models" / "stories260K-hf"), "attention_impl": "xla"},
              "data": {"train": str(data), "chat_template": "alpaca", "seq_len": 256, "cache_dir": None},
              # Adam's eps bounds how far it magnifies rounding in near-zero gradients: at the default 1e-8 the
              # different summation order of a cross-process reduction moves a few weights by 1e-5 in 4 steps.
              "optim": {"lr": 3.0e-3, "warmup_steps": 1, "eps": 1.0e-4},
              "train": {"mode": mode, "steps": STEPS[mode], "batch_size": 8, "log_every": 1, "keep_best": 0},
              "mesh": MESH,
              "output": {"run_dir": str(run_dir), "export": True, "tensorboard": False, "progress": False}}
    if mode == "lora":
        # An attention and an MLP projection: adapters sharded across the processes (embed on fsdp) and within
        # (heads, mlp on tensor); all-linear would only double the compile.
        recipe["lora"] = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "down_proj"]}
    return recipe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """The two worker processes, their logs, when each exited (watched from threads), their results, and the
    one-process reference runs (`RunResult` by mode)."""

    def __init__(self, root: Path, recipes: dict[str, Path]):
        self.root, self.out, self.recipes = root, root / "out", recipes
        self.results: list[dict] = []
        self.reference: dict = {}
        self.out.mkdir()
        port = _free_port()
        self.procs, self.logs, self.exited = [], [], [None, None]
        for i in range(2):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "JAXTUNE_HEARTBEAT"))}
            env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                       JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                       JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",  # JAX's default listens on every interface
                       JAX_COMPILATION_CACHE_DIR=os.environ["JAX_COMPILATION_CACHE_DIR"], PYTHONUNBUFFERED="1")
            log = root / f"process-{i}.log"
            self.logs.append(log)
            with open(log, "wb") as f:
                self.procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), str(self.out), str(recipes["lora"]), str(recipes["full"])],
                    cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT))
        for i, p in enumerate(self.procs):
            threading.Thread(target=self._watch, args=(i, p), daemon=True).start()

    def _watch(self, i: int, p: subprocess.Popen) -> None:
        p.wait()
        self.exited[i] = time.monotonic()

    def log(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def tails(self) -> str:
        return "\n".join(f"--- process {i} (exit {p.poll()}):\n{self.log(i)[-3000:]}" for i, p in enumerate(self.procs))

    def collect(self) -> None:
        """Wait for both processes' results; a process that exits without them fails the test at once."""
        files = [self.out / f"result-{i}.json" for i in range(2)]
        end = time.monotonic() + DEADLINE
        while not all(f.is_file() for f in files):
            if time.monotonic() > end or any(p.poll() is not None for i, p in enumerate(self.procs)
                                             if not files[i].is_file()):
                self.kill()
                pytest.fail(f"the two-process job gave no results:\n{self.tails()}")
            time.sleep(0.2)
        self.results = [json.loads(f.read_text()) for f in files]

    def kill(self) -> None:
        for p in self.procs:  # SIGKILL: JAX's preemption notifier catches SIGTERM
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def job(assets_dir, tmp_path_factory):
    from jaxtune.recipe import load_recipe
    from jaxtune.train.loop import train

    root = tmp_path_factory.mktemp("multihost")
    records = json.loads((assets_dir / "data" / "alpaca_data_1k.json").read_text())
    short = [r for r in records if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 160][:38]
    data = root / "alpaca-short.json"
    data.write_text(json.dumps(short))
    recipes = {}
    for mode in STEPS:
        recipes[mode] = root / f"{mode}.yaml"
        recipes[mode].write_text(yaml.safe_dump(_recipe(assets_dir, data, root / f"job-{mode}", mode)))
    running = Job(root, recipes)
    try:
        # The reference, while the job runs: one process, 8 devices, the same mesh shape and global batch.
        for mode, path in recipes.items():
            running.reference[mode] = train(load_recipe(path, [f"output.run_dir={root / f'one-{mode}'}"]))
        running.collect()
        yield running
    finally:
        running.kill()


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {name: np.array(arr) for name, arr in read_safetensors(path)}


def test_one_mesh_spans_both_processes(job):
    for i, r in enumerate(job.results):
        assert (r["process"], r["processes"], r["devices"], r["local_devices"]) == (i, 2, 8, 4)
        assert r["lora"]["steps"] == [2, STEPS["lora"]]  # stopped after 2, resumed to the end


def test_each_process_reads_only_its_shard(job):
    """Per step, process 0's rows then process 1's are the one-process global batch; over the epoch every
    example is read once by one process (none twice, none missed: the short last batch is padded, not cut)."""
    from jaxtune.data.prepare import prepare_dataset
    from jaxtune.hf.load import load_tokenizer
    from jaxtune.recipe import load_recipe
    from jaxtune.train.loop import make_loaders

    cfg = load_recipe(job.recipes["lora"])
    tokenizer = load_tokenizer(cfg.model.path)
    train_examples, val_examples, _ = prepare_dataset(cfg.data, tokenizer)
    loader, _ = make_loaders(cfg, train_examples, val_examples, tokenizer)
    one = [[r.tolist() for r in loader.rows_at(k)] for k in range(loader.total_steps)]
    rows = [r["rows"] for r in job.results]
    assert [r["rows_per_step"] for r in rows] == [4, 4] and loader.batch_size == 8
    assert [len(r["steps"]) for r in rows] == [len(one)] * 2
    for k, global_rows in enumerate(one):
        assert rows[0]["steps"][k] + rows[1]["steps"][k] == global_rows, f"step {k}"
    read = [i for r in rows for step in r["steps"] for row in step for i in row]
    assert sorted(read) == list(range(rows[0]["examples"])) and rows[0]["examples"] == len(train_examples)
    assert len(one[-1]) < 8  # the last global batch is short: padding rows fill it


@pytest.mark.parametrize("mode", list(STEPS))
def test_steps_match_one_process(job, mode):
    """Losses of every step (the LoRA run across its resume) and the trained weights, as exported."""
    ref = job.reference[mode]
    for r in job.results:
        np.testing.assert_allclose(r[mode]["losses"], ref.losses, rtol=1e-6, atol=1e-6)
    dirs = ["merged"] + (["adapter"] if mode == "lora" else [])
    for d in dirs:
        name = "model.safetensors" if d == "merged" else "adapter_model.safetensors"
        ours, theirs = (_tensors(run / "export" / d / name) for run in (job.root / f"job-{mode}", ref.run_dir))
        assert ours.keys() == theirs.keys()
        for k in ours:
            np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6, atol=1e-6, err_msg=f"{d} {k}")


def test_checkpoint_saved_by_both_processes_restores_bit_identically(job):
    """Arrays sharded across the processes, within each, and replicated: each process gets back exactly the
    shards it saved, in the same shardings; and one process restoring the same files gets the global arrays."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxtune.model.sharding import make_mesh
    from jaxtune.train.checkpoint import Checkpointer

    for r in job.results:
        c = r["checkpoint"]
        assert c["restored"] == c["saved"] and c["same_shardings"] and c["meta"] == CKPT_META
        assert c["shards"] == 4 * 6 and not any(c["fully_addressable"])
    mesh = make_mesh(MESH)
    like = {tree: {name: jax.ShapeDtypeStruct(shape, np.dtype(v[name].dtype),
                                              sharding=NamedSharding(mesh, PartitionSpec(*axes)))
                   for name, (shape, _, axes) in leaves.items()}
            for (tree, leaves), v in zip(CKPT_ARRAYS.items(), ckpt_values().values())}
    ckpt = Checkpointer(job.out / "roundtrip", keep_last=1, keep_best=0)
    try:
        trainable, opt_state, meta = ckpt.restore(CKPT_STEP, like["trainable"], like["opt_state"])
    finally:
        ckpt.close()
    expected = ckpt_values()
    for tree, got in (("trainable", trainable), ("opt_state", opt_state)):
        for name, want in expected[tree].items():
            assert np.asarray(got[name]).tobytes() == want.tobytes(), f"{tree}/{name}"
    assert meta == CKPT_META


def test_export_gathers_tensor_by_tensor_and_is_written_once(job):
    """Both processes gather each merged tensor once, one alive at a time (released after writing); only
    process 0 enters an export directory; transformers loads the result with the trained model's logits."""
    from transformers import AutoModelForCausalLM

    from jaxtune.hf.load import load_pretrained

    for mode in STEPS:
        merged = job.root / f"job-{mode}" / "export" / "merged"
        tensors = _tensors(merged / "model.safetensors")
        largest = max(t.nbytes for t in tensors.values())
        for i, r in enumerate(job.results):
            e = r[mode]["export"]
            assert (e["gathered"], e["gathered_bytes"]) == (len(tensors), sum(t.nbytes for t in tensors.values()))
            assert e["peak_alive"] == 1 and e["alive_after"] == 0, e  # peak host bytes: one tensor, <= largest
            assert largest < e["gathered_bytes"] / 4
            want = [str(merged)] + ([str(merged.with_name("adapter"))] if mode == "lora" else [])
            assert e["dirs"] == (want if i == 0 else []), f"process {i}"
        assert sorted(p.name for p in merged.parent.iterdir()) == sorted(["merged"] + (["adapter"] if mode == "lora"
                                                                                       else []))
    ids = np.asarray([[1, 306, 4658, 278, 6593, 310, 2834, 338, 29871, 13, 20, 42]]) % 512
    merged = job.root / "job-lora" / "export" / "merged"
    theirs = torch_logits(AutoModelForCausalLM.from_pretrained(merged), ids)
    reference = load_pretrained(job.reference["lora"].run_dir / "export" / "merged")
    ours = np.asarray(reference(jax.numpy.asarray(ids)))
    assert np.abs(theirs - ours).max() <= 1e-4


def test_a_failed_export_write_fails_every_process(job):
    """Process 0's write fails after 3 of the merged tensors: it still takes part in the remaining gathers, so
    both processes gather every tensor, then both raise (process 0 its own error, process 1 naming process 0);
    the target is left absent, with no temporary directory beside it."""
    n = len(_tensors(job.root / "job-full" / "export" / "merged" / "model.safetensors"))
    (zero, one) = (r["failed_export"] for r in job.results)
    assert zero["error"].startswith("OSError: injected failure writing model.safetensors"), zero
    assert one["error"] == "OSError: process 0 of 2 failed to write the export; its log names the error", one
    assert zero["export"]["gathered"] == one["export"]["gathered"] == n
    assert not [p.name for p in job.out.iterdir() if "failed-export" in p.name]


def test_survivor_of_a_dead_process_ends_within_30s(job):
    """Process 1 exits without notice while process 0 waits for it in a collective: within JAX's heartbeat
    timeout (jaxtune's default, 10 s, not JAX's 100 s) process 0 ends non-zero, its log naming task 1."""
    deadline = time.monotonic() + 120
    while None in job.exited and time.monotonic() < deadline:
        time.sleep(0.2)
    assert None not in job.exited, f"the survivor still runs:\n{job.tails()}"
    assert job.procs[1].returncode == 97 and job.procs[0].returncode != 0, job.tails()
    assert job.exited[0] - job.exited[1] < 30
    log = job.log(0)
    assert "process 0: waiting for process 1" in log and "returned without process 1" not in log
    # JAX's words, from the coordination service: "Task 1 heartbeat timeout" and/or "The following tasks are
    # unhealthy (stopped sending heartbeats):\n1" (gloo may first raise "Connection reset by peer", unnamed).
    named = r"Task 1 heartbeat timeout|tasks are unhealthy \(stopped sending heartbeats\):\s*\n\s*1\s*\n"
    assert re.search(named, log), log[-3000:]


@pytest.mark.parametrize("processes, exits", [(2, True), (1, False)])
def test_a_failing_command_of_a_multiprocess_job_exits_at_once(tmp_path, monkeypatch, capsys, processes, exits):
    """A process whose command fails leaves at once (`os._exit`) in a multi-process job: a normal exit would
    wait at JAX's shutdown barrier for processes blocked in a collective with it. On one process `main`
    returns its exit code as always."""
    from jaxtune.cli import main as cli_main

    codes = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    monkeypatch.setattr(cli_main.os, "_exit", codes.append)
    assert cli_main.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert codes == ([2] if exits else [])
    assert "recipe file not found" in capsys.readouterr().err
