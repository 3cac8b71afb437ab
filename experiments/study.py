"""The study behind docs/results.md: the practice's claims measured on the bundled stories260K model.

    python experiments/study.py --results docs        # the whole study (data, every arm and seed, memory, page)
    python experiments/study.py --quick --out DIR     # the reduced grid the test suite runs
    python experiments/study.py --only foreign --seed 3   # one row's run again (bit-identical to the study's)

Phases, each cached by a hash of what it depends on (a re-run only runs what changed):
1. data: story tasks from the train premises, `data.samples` base-model samples each (all kept: the raw pool);
   the curated set (verified, filtered and deduplicated by `jaxtune.curate.filter.curate`, then drawn), the same
   prompts with foreign responses and a 50/50 mix, and the noisy sets (`arms.noisy_set`);
2. base: the base model's evaluation and the held-out forgetting sets (base-model stories drawn from BOS);
3. arms: each arm × seed is a `jaxtune train` recipe (experiments/recipes/ + the arm's overrides, saved as
   `recipe.yaml` in its run dir) trained from the base and evaluated like the base; plus the replication
   checks (the replicate arm rerun with seed 0, and run with a seed the report did not use);
4. memory: LoRA / QLoRA / full fine-tuning memory on real shapes (`experiments/memory.py`);
5. report: `analysis.py` turns the run dirs into results.json, results.md and the plots.

Every run executes in its own process pinned to one CPU core (`--jobs` of them at a time), so a run's numbers
do not depend on how many ran beside it; `--jobs 0` runs everything in this process (the quick check).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from jaxtune.pipeline.manifest import digest, file_sha256  # noqa: E402  (no jax: workers pin a core first)

GRID = HERE / "study.yaml"
RUN_FORMAT = 1  # part of every run's hash: bump it when what a run computes changes
MODEL = "models/stories260K-hf"
UNSEEN = "data/alpaca_en_demo.json"
STOP = "<s>"


# --------------------------------------------------------------------------------------------- small helpers

def write_json(path: Path, obj) -> Path:
    from jaxtune.files import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")
    return path


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def load_grid(quick: bool) -> dict:
    """study.yaml, with its `quick:` section applied when `quick`."""
    grid = yaml.safe_load(GRID.read_text())
    q = grid.pop("quick")
    grid["train"] = []
    if quick:
        for section in ("data", "evaluate", "seeds"):
            grid[section] = {**grid[section], **q.get(section, {})}
        grid["train"] = list(q.get("train", []))
        grid["arms"] = q["arms"]
    grid["quick"] = quick
    return grid


def code_identity() -> str:
    """What a run's numbers depend on besides its own settings: jaxtune's sources, the data-building module,
    the recipes and RUN_FORMAT. A change to any of them re-runs everything; report-only edits do not."""
    from jaxtune.pipeline.manifest import code_identity as jaxtune_code

    own = {"arms.py": file_sha256(HERE / "arms.py"), "run_format": RUN_FORMAT}
    own.update({f"recipes/{p.name}": file_sha256(p) for p in sorted((HERE / "recipes").glob("*.yaml"))})
    return digest({"jaxtune": jaxtune_code()["sources_sha256"], "experiments": own})


def seeds_of(grid: dict, arm: dict) -> list[int]:
    return list(range(grid["seeds"][arm["seeds"]]))


# ------------------------------------------------------------------------------------------------ the model

class Base:
    """The base model, its tokenizer and the story template, loaded once per process."""

    def __init__(self, model_dir: str):
        from jaxtune.data.chat import resolve_template
        from jaxtune.hf.load import load_pretrained, load_tokenizer

        self.dir = model_dir
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_pretrained(model_dir)
        self.template = resolve_template("story", self.tokenizer)

    def sampler(self, model, *, temperature: float, top_p: float = 1.0, batch_size: int = 64):
        from jaxtune.curate.teachers import LocalTeacher, TeacherConfig

        cfg = TeacherConfig(kind="local", temperature=temperature, top_p=top_p, stop=(STOP,), batch_size=batch_size)
        return LocalTeacher(model, self.tokenizer, cfg, template=self.template, model_dir=self.dir)


def eval_tasks(grid: dict) -> list[dict]:
    from jaxtune.curate import stories

    return stories.compose_tasks(stories.load_premises(split="eval"), grid["evaluate"]["prompts"], seed=1234,
                                 max_constraints=grid["evaluate"]["max_constraints"], key_prefix="eval")


# ------------------------------------------------------------------------------------------------ 1. data

def generate_shard(job: dict) -> dict:
    """Every sample of every task of one shard: `data.samples` draws each, none dropped (the raw pool)."""
    from jaxtune.curate.constraints import failed_constraints
    from jaxtune.jsonl import write_jsonl

    d = job["grid"]["data"]
    base = Base(job["model"])
    tasks = job["tasks"]
    sampler = base.sampler(base.model, temperature=d["temperature"], top_p=d["top_p"])
    rows = []
    for s in range(d["samples"]):
        done = sampler.complete([t["prompt"] for t in tasks], max_new_tokens=d["max_new_tokens"],
                                seed=d["seed"] * 1000 + job["shard"], sample=s)
        for t, c in zip(tasks, done):
            text = (c.text or "").strip()
            ok = c.finish == "stop" and not failed_constraints(t, text)
            rows.append({"key": t["key"], "task": t, "sample": s, "response": text, "finish": c.finish,
                         "passed": bool(ok)})
    write_jsonl(Path(job["out"]) / "samples.jsonl", rows)
    return {"samples": len(rows)}


def build_sets(grid: dict, base: Base, samples: list[dict], out: Path) -> dict:
    """The arms' training files from the raw pool: curated, foreign, mix and the noisy sets."""
    import arms

    from jaxtune.curate.filter import FilterConfig, curate
    from jaxtune.jsonl import write_jsonl
    from jaxtune.pipeline.context import conversation

    d = grid["data"]
    first_pass = {}
    for r in samples:
        if r["passed"] and r["key"] not in first_pass:
            first_pass[r["key"]] = r
    verified = [first_pass[k] for k in sorted(first_pass)]
    convs = [conversation(r["task"], r["response"], r["key"]) for r in verified]
    fcfg = FilterConfig(dedup=("exact", "minhash"), dedup_on="all", max_ifd=1.0, score_template="story",
                        score_end_token=STOP)
    kept, report = curate(convs, fcfg, tokenizer=base.tokenizer, model=base.model,
                          references={"eval": [t["prompt"] for t in eval_tasks(grid)]})
    kept_keys = sorted(c.source for c in kept)
    if len(kept_keys) < d["curated"]:
        raise SystemExit(f"data: {len(kept_keys)} tasks passed verification and the filter, fewer than "
                         f"data.curated={d['curated']}; raise data.tasks or data.samples in {GRID}")
    chosen = sorted(random.Random(d["seed"]).sample(kept_keys, d["curated"]))
    by_key = {r["key"]: r for r in verified}
    self_records = [arms.to_record(by_key[k]["task"], by_key[k]["response"], "self") for k in chosen]
    foreign_records = [arms.to_record(by_key[k]["task"], arms.foreign_response(by_key[k]["task"], d["seed"]),
                                      "foreign") for k in chosen]
    sets = {"curated": self_records, "foreign": foreign_records,
            "mix": arms.mix(self_records, foreign_records, seed=d["seed"])}
    compositions = {}
    for n in d["noisy"]:
        records, composition = arms.noisy_set(samples, n, seed=d["seed"], **d["noise"])
        sets[f"noisy-{n}"] = records
        compositions[f"noisy-{n}"] = composition
    files = {}
    for name, records in sets.items():
        path = write_jsonl(out / f"{name}.jsonl", records)
        files[name] = {"path": str(path.relative_to(out)), "sha256": file_sha256(path), "records": len(records)}
    n_passed = sum(r["passed"] for r in samples)
    return {"files": files, "noise": compositions,
            "pool": {"tasks": len({r["key"] for r in samples}), "samples": len(samples), "passed": n_passed,
                     "finished": sum(r["finish"] == "stop" for r in samples),
                     "tasks_with_a_pass": len(verified), "after_filter": len(kept_keys),
                     "filter_dropped": {k: v for k, v in report.rejected.items() if v}},
            "base_nll": response_nll(base, sets, d["seed"])}


def response_nll(base: Base, sets: dict, seed: int, n: int = 256) -> dict:
    """How foreign each set's responses are to the base model: mean NLL per response token under the base
    (the prompt given, as in training), and response tokens, over `n` records drawn from the set."""
    from jaxtune import stats
    from jaxtune.generate import prompt_ids

    stop = base.tokenizer.convert_tokens_to_ids(STOP)
    limit = base.model.config.max_position_embeddings
    out = {}
    for name, records in sets.items():
        pick = random.Random(seed).sample(records, min(n, len(records)))
        heads = [prompt_ids(base.tokenizer, r["messages"][0]["content"], base.template) for r in pick]
        tails = [base.tokenizer.encode(r["messages"][1]["content"], add_special_tokens=False) + [stop] for r in pick]
        seqs = [(h + t)[:limit] for h, t in zip(heads, tails)]
        nll, _ = teacher_forced(base.model, base.model, seqs, starts=[len(h) for h in heads])
        out[name] = {"nll": stats.mean(nll, n_boot=500).to_dict(),
                     "tokens": stats.mean([len(t) for t in tails], n_boot=500).to_dict()}
    return out


# ------------------------------------------------------------------------------------------------ 2. evaluation

def forgetting_sets(grid: dict, base: Base, out: Path) -> dict:
    """Held-out base-model stories (from BOS, temperature 1, a seed no training data used), their first tokens
    as greedy-agreement prompts with the base's greedy continuations, and Alpaca-GPT-4 responses as text no arm
    trains on."""
    from jaxtune.assets import find_asset
    from jaxtune.generate import SamplingParams, generate, stop_token_ids

    e = grid["evaluate"]
    bos = base.tokenizer.bos_token_id
    stops = tuple(stop_token_ids(base.model.config, base.tokenizer, extra=[bos]))
    gen = generate(base.model, [[bos]] * e["base_samples"],
                   SamplingParams(max_new_tokens=e["sample_tokens"], temperature=1.0, seed=987654, stop_ids=stops))
    stories = [[bos, *t] + ([s] if s is not None else []) for t, s in zip(gen.tokens, gen.stop_tokens)]
    prompts = [s[:e["probe_prefix"]] for s in stories]
    greedy = generate(base.model, prompts, SamplingParams(max_new_tokens=e["probe_tokens"], stop_ids=stops))
    alpaca = json.loads(Path(find_asset(UNSEEN)).read_text())
    unseen = [base.tokenizer.encode(r["output"])[:e["unseen_tokens"]] for r in alpaca if r["output"].strip()]
    sets = {"base_stories": stories, "probe_prompts": prompts,
            "probe_base": [list(t) for t in greedy.tokens], "unseen": unseen[:e["unseen_docs"]],
            "unseen_source": f"{UNSEEN} (the first {e['unseen_docs']} non-empty `output` fields, "
                             f"{e['unseen_tokens']} tokens at most)"}
    write_json(out / "forgetting_sets.json", sets)
    return sets


@functools.cache
def _per_sequence():
    """Masked mean NLL and KL(base ‖ model) per row, jitted once per process (jax is imported late, after a
    worker has pinned itself to its core); compiled per model structure and batch shape."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def per_sequence(graphdef, base_graphdef, state, base_state, ids, mask):
        logp = jax.nn.log_softmax(nnx.merge(graphdef, state)(ids).astype(jnp.float32), axis=-1)[:, :-1]
        blogp = jax.nn.log_softmax(nnx.merge(base_graphdef, base_state)(ids).astype(jnp.float32), axis=-1)[:, :-1]
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        kl = jnp.sum(jnp.exp(blogp) * (blogp - logp), axis=-1)
        m = mask[:, 1:]
        denom = jnp.maximum(m.sum(axis=1), 1.0)
        return (nll * m).sum(axis=1) / denom, (kl * m).sum(axis=1) / denom

    return per_sequence


def teacher_forced(model, base_model, seqs: list[list[int]], *, starts: list[int] | None = None,
                   batch: int = 64) -> tuple[list[float], list[float]]:
    """Per sequence: the model's mean next-token NLL, and the mean KL(base ‖ model) of the next-token
    distributions over the same positions (the tokens from `starts[i]` on; all but the first by default).
    Sequences are padded to the next multiple of 64, so a few widths compile."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    width = -(-max(len(s) for s in seqs) // 64) * 64
    starts = starts or [1] * len(seqs)
    gd, st = nnx.split(model)
    bgd, bst = nnx.split(base_model)
    nll, kl = [], []
    for i in range(0, len(seqs), batch):
        chunk = seqs[i:i + batch]
        ids = np.zeros((batch, width), np.int32)
        mask = np.zeros((batch, width), np.float32)
        for j, (s, start) in enumerate(zip(chunk, starts[i:i + batch])):
            ids[j, :len(s)], mask[j, start:len(s)] = s, 1.0
        a, b = _per_sequence()(gd, bgd, st, bst, jnp.asarray(ids), jnp.asarray(mask))
        nll += np.asarray(a)[:len(chunk)].tolist()
        kl += np.asarray(b)[:len(chunk)].tolist()
    return nll, kl


def evaluate(grid: dict, base: Base, model, sets: dict) -> dict:
    """Per-item values, every item shared by all arms (same prompts, same stories, same order): the report's
    intervals pair them. Constraint metrics per prompt or per constraint; forgetting per story or document."""
    from jaxtune.curate import stories as story_domain
    from jaxtune.eval.forgetting import token_agreement
    from jaxtune.eval.ifeval_checks import FORMAT_GROUPS, check_instruction, group_of
    from jaxtune.generate import SamplingParams, generate, stop_token_ids
    from jaxtune.pipeline.evaluate import score_rows

    e = grid["evaluate"]
    tasks = eval_tasks(grid)
    done = base.sampler(model, temperature=0.0, batch_size=e["batch_size"]).complete(
        [t["prompt"] for t in tasks], max_new_tokens=e["max_new_tokens"], seed=0)
    rows = score_rows(tasks, done)
    end = "startend:end_checker"
    phrases = story_domain.KINDS[end]
    items = {
        "satisfied": [float(all(r["followed"])) for r in rows],
        "followed": [float(f) for r in rows for f in r["followed"]],
        "ignored": [float(not f) for r in rows for f in r["followed_loose"]],
        "format": [float(f) for r in rows for i, f in zip(r["instruction_id_list"], r["followed_loose"])
                   if group_of(i) in FORMAT_GROUPS],
        "finished": [float(r["finish"] == "stop") for r in rows],
        "tokens": [float(r["tokens_out"]) for r in rows],
        "unasked_end": [float(any(check_instruction(end, phrases.kwargs(v, None), r["prompt"], r["response"])
                                  for v in phrases.values)) for r in rows if end not in r["instruction_id_list"]],
        "unasked_formatting": [float(bool(r["formatting"])) for r in rows],
    }
    for kind in story_domain.KINDS:
        items[f"followed:{kind}"] = [float(f) for r in rows for i, f in zip(r["instruction_id_list"], r["followed"])
                                     if i == kind]
    nll, kl = teacher_forced(model, base.model, sets["base_stories"])
    unseen_nll, _ = teacher_forced(model, base.model, sets["unseen"])
    stops = tuple(stop_token_ids(base.model.config, base.tokenizer, extra=[base.tokenizer.bos_token_id]))
    greedy = generate(model, sets["probe_prompts"], SamplingParams(max_new_tokens=e["probe_tokens"], stop_ids=stops))
    items.update({"story_nll": nll, "kl": kl, "unseen_nll": unseen_nll,
                  "agreement": [token_agreement(b, list(t)) for b, t in zip(sets["probe_base"], greedy.tokens)]})
    samples = [{"key": r["key"], "prompt": r["prompt"], "response": r["response"], "followed": r["followed"]}
               for r in rows[:8]]
    return {"items": items, "samples": samples}


# ------------------------------------------------------------------------------------------------ 3. runs

def run_base(job: dict) -> dict:
    base = Base(job["model"])
    out = Path(job["out"])
    sets = forgetting_sets(job["grid"], base, out)
    return evaluate(job["grid"], base, base.model, sets)


def arm_overrides(job: dict) -> list[str]:
    grid, arm = job["grid"], job["arm"]
    sets = [f"model.path={job['model']}", f"data.train={job['data_file']}", f"train.seed={job['seed']}",
            f"data.shuffle_seed={job['seed']}", *grid["train"], *arm.get("set", [])]
    if arm.get("steps") == "equal-epochs":
        sets.append(f"train.steps={job['equal_epoch_steps']}")
    return sets


def run_arm(job: dict) -> dict:
    """One arm × seed: train its recipe from the base, then evaluate the merged model."""
    from jaxtune.hf.load import load_pretrained
    from jaxtune.recipe import dump_recipe, load_recipe
    from jaxtune.train.loop import train

    out = Path(job["out"])
    cfg = load_recipe(HERE / job["grid"]["recipe"], [*arm_overrides(job), f"output.run_dir={out / 'train'}"])
    (out / "recipe.yaml").write_text(dump_recipe(cfg))
    started = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - started
    base = Base(job["model"])
    merged = out / "train" / "export" / "merged"
    model = load_pretrained(str(merged))
    sets = read_json(Path(job["base_dir"]) / "forgetting_sets.json")
    doc = evaluate(job["grid"], base, model, sets)
    doc["train"] = {"steps": result.step, "first_loss": result.losses[0], "last_loss": result.losses[-1],
                    "seconds": round(train_s, 1), "trainable": trainable_count(out / "train", model),
                    "merged_sha256": file_sha256(merged / "model.safetensors")}
    shutil.rmtree(out / "train" / "checkpoints", ignore_errors=True)  # the merged export is what is evaluated
    return doc


def trainable_count(run_dir: Path, model) -> int:
    """Parameters the run trained: the PEFT adapter's tensors, or every parameter of a full fine-tune."""
    from safetensors.numpy import load_file

    adapter = run_dir / "export" / "adapter" / "adapter_model.safetensors"
    if adapter.is_file():
        return sum(v.size for v in load_file(adapter).values())
    return model.config.num_params()


RUNNERS = {"generate": generate_shard, "base": run_base, "arm": run_arm}


def execute(job_file: Path) -> None:
    """Run one job described by its JSON file, in this process; the result lands in `result.json` last."""
    job = read_json(job_file)
    out = Path(job["out"])
    started = time.perf_counter()
    doc = RUNNERS[job["kind"]](job)
    doc["job"] = {k: v for k, v in job.items() if k not in ("grid", "tasks")}
    doc["seconds"] = round(time.perf_counter() - started, 1)
    write_json(out / "result.json", doc)


# ------------------------------------------------------------------------------------------------ scheduling

class Jobs:
    """Jobs run in subprocesses pinned to one CPU each (`jobs` at a time), or here when `jobs` is 0. A job's
    directory is `<name>-<hash>`; it is done when its `result.json` exists, and is written in a `.tmp` twin that
    replaces it when the job has finished."""

    def __init__(self, jobs: int, log=print):
        self.jobs, self.log = jobs, log

    @staticmethod
    def final(job: dict) -> Path:
        return Path(job["dir"])

    def run(self, batch: list[dict]) -> None:
        todo = [j for j in batch if not (self.final(j) / "result.json").is_file()]
        for j in batch:
            if j not in todo:
                self.log(f"  {j['name']}: up to date ({self.final(j).name})")
        started, running, free = time.perf_counter(), [], list(range(max(self.jobs, 1)))
        total, finished, failed = len(todo), 0, None
        while (todo and failed is None) or running:
            while todo and failed is None and free and len(running) < max(self.jobs, 1):
                job = todo.pop(0)
                tmp = self.final(job).with_name(self.final(job).name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                spec = write_json(tmp / "job.json", {**job, "out": str(tmp)})
                if self.jobs == 0:
                    t0 = time.perf_counter()
                    execute(spec)
                    running.append((job, None, None, tmp, t0, None))
                else:
                    cpu = free.pop(0)
                    log = open(tmp / "log.txt", "w")
                    env = {**os.environ, "JAXTUNE_STUDY_CPU": str(cpu), "TQDM_DISABLE": "1"}
                    proc = subprocess.Popen([sys.executable, str(Path(__file__)), "--execute", str(spec)],
                                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                    running.append((job, proc, cpu, tmp, time.perf_counter(), log))
            for item in list(running):
                job, proc, cpu, tmp, t0, log = item
                if proc is not None and proc.poll() is None:
                    continue
                running.remove(item)
                if log is not None:
                    log.close()
                if cpu is not None:
                    free.append(cpu)
                if proc is not None and proc.returncode != 0:
                    # The runs in flight beside it finish and are kept; nothing new starts.
                    tail = (tmp / "log.txt").read_text().strip().splitlines()[-1:] or ["(no output)"]
                    failed = failed or (f"study: {job['name']} failed (exit {proc.returncode}): {tail[0]}; "
                                        f"its log is {tmp / 'log.txt'}")
                    continue
                final = self.final(job)
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
                finished += 1
                elapsed = time.perf_counter() - started
                self.log(f"  [{finished}/{total}] {job['name']} done in {time.perf_counter() - t0:.0f} s "
                         f"({elapsed / 60:.1f} min, about {elapsed / finished * (total - finished) / 60:.1f} min "
                         "left)")
            if running and self.jobs:
                time.sleep(0.5)
        if failed:
            raise SystemExit(failed)


def job(kind: str, name: str, root: Path, key: dict, **fields) -> dict:
    h = digest(key)[:12]
    return {"kind": kind, "name": name, "hash": h, "dir": str(root / f"{name}-{h}"), **fields}


# ------------------------------------------------------------------------------------------------ the study

def data_phase(grid: dict, out: Path, model: str, ident: str, runner: Jobs) -> dict:
    """The raw pool (generated in two fixed shards), then the training sets, cached by their inputs' hash."""
    from jaxtune.curate import stories
    from jaxtune.jsonl import read_jsonl

    d = grid["data"]
    tasks = stories.compose_tasks(stories.load_premises(split="train"), d["tasks"], seed=d["seed"],
                                  max_constraints=d["max_constraints"], key_prefix="train")
    key = {"data": d, "model": model, "code": ident}
    shards = [job("generate", f"pool-{k}", out / "data", {**key, "shard": k}, shard=k, tasks=tasks[k::2],
                  grid=grid, model=model) for k in range(2)]
    runner.run(shards)
    sets_dir = out / "data" / f"sets-{digest(key)[:12]}"
    if not (sets_dir / "sets.json").is_file():
        samples = [r for s in shards for _, r in read_jsonl(Path(s["dir"]) / "samples.jsonl")]
        samples.sort(key=lambda r: (r["key"], r["sample"]))
        tmp = sets_dir.with_name(sets_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        doc = build_sets(grid, Base(model), samples, tmp)
        write_json(tmp / "sets.json", doc)
        shutil.rmtree(sets_dir, ignore_errors=True)
        tmp.rename(sets_dir)
    doc = read_json(sets_dir / "sets.json")
    doc["dir"] = str(sets_dir)
    return doc


def arm_jobs(grid: dict, out: Path, model: str, ident: str, data: dict, base_dir: str,
             only: str | None = None, seed: int | None = None) -> tuple[list[dict], dict]:
    """One job per arm × seed (the replicate arm also with its new seed and a same-seed rerun)."""
    recipe = (HERE / grid["recipe"]).read_text()
    base_steps = next((int(s.split("=")[1]) for s in grid["train"] if s.startswith("train.steps=")),
                      yaml.safe_load(recipe)["train"]["steps"])
    curated = data["files"]["curated"]["records"]
    jobs, checks = [], {}
    for name, arm in grid["arms"].items():
        if arm["data"] not in data["files"]:
            raise SystemExit(f"{GRID}: arms.{name}.data: {arm['data']!r} is not one of {sorted(data['files'])}")
        f = data["files"][arm["data"]]
        fields = {"arm": arm, "data_file": str(Path(data["dir"]) / f["path"]), "grid": grid, "model": model,
                  "base_dir": base_dir,
                  "equal_epoch_steps": -(-base_steps * f["records"] // curated)}
        seeds = seeds_of(grid, arm)
        extra = [len(seeds)] if name == grid["replicate"] else []
        for s in seeds + extra:
            if only and (name != only or (seed is not None and s != seed)):
                continue
            key = {"arm": arm, "recipe": recipe, "data": f["sha256"], "seed": s, "train": grid["train"],
                   "evaluate": grid["evaluate"], "base": base_dir, "code": ident}
            jobs.append(job("arm", f"{name}/s{s}", out / "runs", key, seed=s, **fields))
        if name == grid["replicate"] and not only:
            key = {"arm": arm, "recipe": recipe, "data": f["sha256"], "seed": 0, "train": grid["train"],
                   "evaluate": grid["evaluate"], "base": base_dir, "code": ident, "rerun": True}
            rerun = job("arm", f"{name}/s0-rerun", out / "checks", key, seed=0, **fields)
            jobs.append(rerun)
            checks = {"arm": name, "rerun": rerun["dir"], "new_seed": len(seeds)}
    # Longest first, so two workers end together.
    jobs.sort(key=lambda j: -(j["equal_epoch_steps"] if j["arm"].get("steps") == "equal-epochs" else 0))
    return jobs, checks


def rerun(jobs: list[dict], runner: Jobs) -> int:
    """`--only`: each selected run again beside the study's own (`<dir>-again`), compared with it: the same
    per-item values and merged-model bytes, or which differ."""
    if not jobs:
        raise SystemExit("study: --only/--seed select no run of the grid; see the arms and seeds in study.yaml")
    again = [{**j, "dir": j["dir"] + "-again"} for j in jobs]
    for j in again:
        shutil.rmtree(j["dir"], ignore_errors=True)
    runner.run(again)
    same = True
    for j, a in zip(jobs, again):
        first, second = (read_json(Path(x["dir"]) / "result.json") for x in (j, a))
        ok = first["items"] == second["items"] and first["train"] == {**second["train"],
                                                                      "seconds": first["train"]["seconds"]}
        same &= ok
        print(f"{j['name']}: {'bit-identical to' if ok else 'DIFFERS from'} {j['dir']}")
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the reduced grid of study.yaml's quick section")
    p.add_argument("--out", default=None, help="study directory (default runs/study, runs/study-quick)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, each pinned to one core; 0: in this process")
    p.add_argument("--model", default=None, help=f"base model directory (default: the bundled {MODEL})")
    p.add_argument("--only", default=None, help="run one arm only (with --seed: one row)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--skip-memory", action="store_true", help="leave out the real-shape memory compiles")
    p.add_argument("--results", default=None, help="where results.md and its plots go (default: the study dir; "
                                                   "the committed page is docs/results.md)")
    p.add_argument("--execute", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.execute:
        cpu = os.environ.get("JAXTUNE_STUDY_CPU")
        if cpu is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {int(cpu) % os.cpu_count()})
        import jaxtune

        jaxtune.apply_cpu_defaults()
        execute(Path(args.execute))
        return 0

    import jaxtune

    jaxtune.apply_cpu_defaults()
    from jaxtune.assets import find_asset

    started = time.perf_counter()
    grid = load_grid(args.quick)
    config = find_asset(f"{MODEL}/config.json")
    model = args.model or (str(config.parent) if config else None)
    if model is None or not Path(model).is_dir():
        raise SystemExit(f"study: no base model at {model or MODEL}; pass --model or set JAXTUNE_ASSETS")
    model = str(Path(model).resolve())
    out = Path(args.out or ("runs/study-quick" if args.quick else "runs/study")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runner = Jobs(args.jobs)
    ident = code_identity()
    print(f"study: {'quick grid' if args.quick else 'full grid'} in {out} ({args.jobs or 'no'} worker processes)")
    print("data: the raw pool and the training sets")
    data = data_phase(grid, out, model, ident, runner)
    print("base: evaluation and the held-out forgetting sets")
    base = job("base", "base", out / "runs", {"evaluate": grid["evaluate"], "model": model, "code": ident},
               grid=grid, model=model)
    runner.run([base])
    jobs, checks = arm_jobs(grid, out, model, ident, data, base["dir"], args.only, args.seed)
    print(f"arms: {len(jobs)} runs")
    runner.run(jobs)
    if args.only:
        return rerun(jobs, runner)
    memory = None
    if not args.skip_memory:
        import memory as memory_study

        print("memory: real shapes, compile-only")
        memory = memory_study.rows(quick=args.quick, out=out / "memory")
    import analysis

    doc = analysis.analyse(grid=grid, data=data, base_dir=base["dir"], jobs=jobs, checks=checks, memory=memory,
                           study_dir=out, seconds=time.perf_counter() - started)
    results = Path(args.results).resolve() if args.results else out
    analysis.write(doc, results)
    print(f"results: {results / 'results.md'} ({(time.perf_counter() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
