"""The real job both ways: jaxtune vs TRL `SFTTrainer` (+ PEFT) on stories260K and Alpaca-1k.

    python scripts/bench_vs_trl.py                       # LoRA, full FT, jaxtune packed; one table
    python scripts/bench_vs_trl.py --runs lora --epochs 1
    python scripts/bench_vs_trl.py --compile-cache DIR   # twice: the second measures a re-run (warm cache)

The job (same on both sides): `../shared/assets/models/stories260K-hf` on `alpaca_data_1k.json`, Alpaca
prompt, loss on the response only, `datasets.Dataset.train_test_split(test_size=0.1, seed=0)` (the split
is written to two files both sides read), max length 256 with pad = eos, AdamW with a 10-step warm-up and
cosine decay, clipping at 1.0, no weight decay, batch 16, fp32: LoRA r=8 alpha=16 (dropout 0) on all
linear layers at lr 2e-3, full fine-tuning at 5e-4, and jaxtune's packed LoRA run.

Each side runs in its own process; TRL runs in its own environment (`--trl-python`, default
`.venv-bench/bin/python`: `python -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0
transformers peft trl datasets`). Train tokens/s = non-pad tokens fed over all epochs / train time (from
the first step to the last, compile included, evaluation excluded; jaxtune builds its steps with
`train.plan.assemble`, as `jaxtune train` does, so the train step compiles once). Eval loss is
token-weighted over the eval completions, computed the same way on both sides before and after training;
the before value must be 4.1344 (± 1e-3) or nothing after it is compared.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import utils as bu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
EXPECTED_EVAL_BEFORE = 4.1344
RUNS = {
    "lora": dict(mode="lora", lr=2e-3, packing=False),
    "full": dict(mode="full", lr=5e-4, packing=False),
    "packed": dict(mode="lora", lr=2e-3, packing=True),
}
JOB = dict(batch=16, max_len=256, warmup=10, rank=8, alpha=16, seed=0)
PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.")
PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.")


def alpaca_prompt(row: dict) -> str:
    """The Alpaca prompt, character for character what jaxtune's `alpaca` template renders before the response."""
    if row.get("input"):
        return (f"{PREAMBLE_INPUT}\n\n### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}\n\n"
                "### Response:\n")
    return f"{PREAMBLE}\n\n### Instruction:\n{row['instruction']}\n\n### Response:\n"


def write_split(data: Path, out: Path) -> tuple[Path, Path]:
    """TRL's split (`train_test_split(test_size=0.1, seed=0)`) as two JSON files both sides train/evaluate on."""
    import datasets

    rows = json.loads(data.read_text())
    split = datasets.Dataset.from_list(rows).train_test_split(test_size=0.1, seed=JOB["seed"])
    paths = out / "train.json", out / "eval.json"
    for path, part in zip(paths, (split["train"], split["test"])):
        path.write_text(json.dumps(part.to_list()))
    return paths


# ------------------------------------------------------------------------------------------------ jaxtune


def _jax_recipe(s: dict):
    """The job as a jaxtune recipe (what `jaxtune train` would read from YAML)."""
    from jaxtune.recipe import RecipeConfig
    from jaxtune.structs import from_dict

    raw = {
        "model": {"path": s["model"], "dtype": "float32", "attention_impl": s["attention"],
                  "scan_layers": s["scan_layers"]},
        "data": {"train": s["train"], "validation": s["eval"], "format": "alpaca", "chat_template": "alpaca",
                 "seq_len": JOB["max_len"], "packing": s["packing"], "num_epochs": s["epochs"],
                 "shuffle_seed": JOB["seed"], "cache_dir": None},
        "optim": {"name": "adamw", "lr": s["lr"], "warmup_steps": JOB["warmup"], "schedule": "cosine",
                  "weight_decay": 0.0, "max_grad_norm": 1.0},
        "train": {"mode": s["mode"], "batch_size": JOB["batch"], "seed": JOB["seed"]},
        "output": {"run_dir": s["run_dir"], "tensorboard": False, "progress": False, "export": False},
    }
    if s["mode"] == "lora":
        raw["lora"] = {"rank": JOB["rank"], "alpha": JOB["alpha"], "dropout": 0.0, "target_modules": "all-linear"}
    return from_dict(RecipeConfig, raw)


@bu.jaxtune_side
def jax_worker(s: dict) -> dict:
    import jax
    import numpy as np

    from jaxtune.data.prepare import prepare_dataset
    from jaxtune.lora.apply import count_params
    from jaxtune.model.sharding import shard_batch
    from jaxtune.train.hooks import evaluate
    from jaxtune.train.loop import gc_frozen, load_model, make_loaders
    from jaxtune.train.plan import assemble, build_mesh

    cfg = _jax_recipe(s)
    hits = []  # persistent-cache hits: the train step's, if any, comes with the first step
    if s.get("compile_cache"):  # a re-run of `jaxtune train`, whose compile cache is on by default
        jax.config.update("jax_compilation_cache_dir", s["compile_cache"])
        jax.monitoring.register_event_listener(
            lambda event, **_: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
    else:  # cold: the compile is part of the train time, as in a first run
        jax.config.update("jax_enable_compilation_cache", False)
    mesh = build_mesh(cfg)
    model, tokenizer, token_ids = load_model(cfg, mesh)
    train_examples, val_examples, _ = prepare_dataset(cfg.data, tokenizer)
    loader, eval_batches = make_loaders(cfg, train_examples, val_examples, tokenizer)
    parts, trainable, opt_state = assemble(cfg, model, token_ids, mesh, loader.total_steps)
    graphdef, frozen, step_fn, eval_fn = parts.graphdef, parts.frozen, parts.train_step, parts.eval_step
    before = evaluate(eval_fn, graphdef, trainable, frozen, eval_batches, mesh)
    key = jax.random.key(JOB["seed"])

    # As train/loop.py does (the GC frozen too): the step's metrics are fetched every step (a host sync),
    # unless `async_metrics` keeps them on device until the end so the host can prepare the next batch while
    # the step runs.
    pending, first_step_s, hits_before = [], None, len(hits)
    with gc_frozen():
        t0 = time.perf_counter()
        for step in range(loader.total_steps):
            batch = shard_batch(next(loader), mesh)
            trainable, opt_state, m = step_fn(graphdef, trainable, frozen, opt_state, batch,
                                              jax.random.fold_in(key, step))
            pending.append(m if s["async_metrics"] else jax.device_get(m))
            if step == 0:
                jax.block_until_ready(m)
                first_step_s = time.perf_counter() - t0
        pending = jax.device_get(pending)
        train_s = time.perf_counter() - t0
    tokens = float(sum(float(m["tokens"]) for m in pending))
    losses = [float(m["loss"]) for m in pending]
    after = evaluate(eval_fn, graphdef, trainable, frozen, eval_batches, mesh)
    n_train = count_params(trainable)
    n_all = n_train + count_params(frozen)
    return dict(side="jaxtune", steps=loader.total_steps, train_tokens=tokens, train_s=train_s,
                tokens_per_s=tokens / train_s, first_step_s=first_step_s,
                steady_tokens_per_s=(tokens * (1 - 1 / loader.total_steps)) / (train_s - first_step_s),
                eval_before=before["loss"], eval_after=after["loss"], eval_tokens=before["loss_tokens"],
                eval_rows=len(val_examples), trainable=n_train, params=n_all, peak_rss=bu.peak_rss_bytes(),
                loss_first=losses[0], loss_last=float(np.mean(losses[-10:])), device=jax.devices()[0].device_kind,
                warm_cache=len(hits) > hits_before, compiles=step_fn._cache_size())


# ------------------------------------------------------------------------------------------------ TRL


def _eval_loss(model, examples: list[dict], max_len: int) -> tuple[float, int]:
    """Token-weighted NLL over the completion tokens (TRL's `labels` != -100), one example at a time (no
    padding), on TRL's own tokenization of the eval split."""
    import torch

    nll, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor(ex["input_ids"][:max_len])[None]
            labels = torch.tensor(ex["labels"][:max_len])[None]
            logits = model(input_ids=ids).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            m = labels[:, 1:] != -100
            nll -= float(lp[m].sum())
            n += int(m.sum())
    model.train()
    return nll / max(n, 1), n


def trl_worker(s: dict) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    torch.manual_seed(JOB["seed"])
    tok = transformers.AutoTokenizer.from_pretrained(s["model"])
    tok.pad_token = tok.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(s["model"], dtype=torch.float32)

    def load(path):
        rows = json.loads(Path(path).read_text())
        return datasets.Dataset.from_list([{"prompt": alpaca_prompt(r), "completion": r["output"]} for r in rows])

    train_ds, eval_ds = load(s["train"]), load(s["eval"])
    peft_config = None
    if s["mode"] == "lora":
        import peft

        peft_config = peft.LoraConfig(r=JOB["rank"], lora_alpha=JOB["alpha"], lora_dropout=0.0,
                                      target_modules="all-linear", task_type="CAUSAL_LM")
    args = trl.SFTConfig(output_dir=s["run_dir"], per_device_train_batch_size=JOB["batch"],
                         num_train_epochs=s["epochs"], learning_rate=s["lr"], lr_scheduler_type="cosine",
                         warmup_steps=JOB["warmup"], weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
                         max_length=JOB["max_len"], completion_only_loss=True, packing=s["packing"],
                         padding_free=s["packing"], report_to="none", save_strategy="no", eval_strategy="no",
                         logging_steps=50, seed=JOB["seed"], data_seed=JOB["seed"], bf16=False, fp16=False,
                         use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tok, peft_config=peft_config)
    eval_examples = list(trainer.eval_dataset)
    before, n_eval = _eval_loss(trainer.model, eval_examples, JOB["max_len"])
    rows = [min(len(ex["input_ids"]), JOB["max_len"]) for ex in trainer.train_dataset]
    out = trainer.train()
    train_s = float(out.metrics["train_runtime"])
    after, _ = _eval_loss(trainer.model, eval_examples, JOB["max_len"])
    tokens = float(sum(rows)) * s["epochs"]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return dict(side="TRL", steps=int(out.global_step), train_tokens=tokens, train_s=train_s,
                tokens_per_s=tokens / train_s, eval_before=before, eval_after=after, eval_tokens=n_eval,
                eval_rows=len(eval_examples), trainable=trainable,
                params=sum(p.numel() for p in trainer.model.parameters()), peak_rss=bu.peak_rss_bytes(),
                loss_last=float(out.training_loss), device=bu.cpu_name(), threads=torch.get_num_threads(),
                versions=bu.versions(("trl", "transformers", "peft", "torch", "datasets")))


# ------------------------------------------------------------------------------------------------ report


def table(rows: list[tuple[str, dict]]) -> str:
    trl_by_run = {run: r for run, r in rows if r.get("side") == "TRL" and "tokens_per_s" in r}
    out = []
    for run, r in rows:
        if "tokens_per_s" not in r:
            out.append([run, r.get("side"), None, None, None, None, None, None, r.get("error") or r.get("skipped")])
            continue
        ok = abs(r["eval_before"] - EXPECTED_EVAL_BEFORE) <= 1e-3
        ref = trl_by_run.get(run) or trl_by_run.get("lora" if run == "packed" else run)
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}×" if ref else None
        gap = None
        if ref and r is not ref and run != "packed":
            gap = f"{r['eval_after'] - ref['eval_after']:+.3f}"
        out.append([run, r["side"], f"{r['tokens_per_s']:,.0f}", ratio,
                    f"{r['eval_before']:.4f}{'' if ok else ' (≠ 4.1344!)'} → {r['eval_after']:.4f}", gap,
                    bu.fmt_bytes(r["peak_rss"]), f"{100 * r['trainable'] / r['params']:.1f}%",
                    f"{r['steps']} steps, {r['train_tokens']:,.0f} tokens in {r['train_s']:.1f} s"
                    + (f" (first step {r['first_step_s']:.1f} s{', warm compile cache' if r.get('warm_cache') else ''})"
                       if r.get("first_step_s") else "")])
    return bu.markdown_table(["run", "side", "train tokens/s", "vs TRL", "eval loss before → after",
                              "after − TRL", "peak RSS", "trainable", "detail"], out)


WORKERS = {"jaxtune": jax_worker, "trl": trl_worker}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="lora,full,packed", help=f"comma list of {', '.join(RUNS)}")
    p.add_argument("--sides", default="jaxtune,trl")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--trl-packed", action="store_true", help="also run TRL's padding-free packing (slow on CPU)")
    p.add_argument("--trl-python", default=str(ROOT / ".venv-bench" / "bin" / "python"))
    p.add_argument("--assets", default=str(ASSETS))
    p.add_argument("--attention", default="auto", help="jaxtune attention_impl")
    p.add_argument("--scan-layers", action="store_true", help="jaxtune model.scan_layers")
    p.add_argument("--async-metrics", action="store_true",
                   help="jaxtune: fetch step metrics once at the end, not every step as train/loop.py does")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="jaxtune: JAX's persistent compilation cache in DIR, as `jaxtune train` uses by default (a "
                        "second invocation measures a re-run); without it jaxtune compiles cold")
    bu.add_run_args(p, WORKERS, timeout=1800, out="bench_vs_trl.{md,json}")
    args = p.parse_args(argv)

    if bu.dispatch_worker(args, WORKERS):
        return 0

    assets = Path(args.assets)
    model, data = assets / "models" / "stories260K-hf", assets / "data" / "alpaca_data_1k.json"
    for path in (model, data):
        if not path.exists():
            print(f"{path} not found: set --assets to the shared assets directory", file=sys.stderr)
            return 2
    sides = args.sides.split(",")
    trl_ok = Path(args.trl_python).exists()
    m = bu.machine()
    plat = "gpu" if m["gpu"] else "cpu"
    envs = {"jaxtune": bu.jax_env(plat, not args.plain_xla), "trl": bu.torch_env()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train, evalf = write_split(data, Path(tmp))
        for run in args.runs.split(","):
            for side in sides:
                if side == "trl" and run == "packed" and not args.trl_packed:
                    continue
                s = dict(RUNS[run], model=str(model), train=str(train), eval=str(evalf), epochs=args.epochs,
                         attention=args.attention, async_metrics=args.async_metrics, scan_layers=args.scan_layers,
                         compile_cache=args.compile_cache, run_dir=str(Path(tmp) / f"{run}-{side}"))
                if side == "trl" and not trl_ok:
                    r = {"side": "TRL", "skipped": f"no TRL environment at {args.trl_python} (see --help)"}
                else:
                    r = bu.spawn_worker(str(Path(__file__).resolve()), side, s, timeout=args.timeout, env=envs[side],
                                        python=args.trl_python if side == "trl" else None, label=f"{run}/{side}")
                r.setdefault("side", "TRL" if side == "trl" else "jaxtune")
                rows.append((run, r))
                print(f"[{run}/{side}] " + json.dumps({k: v for k, v in r.items() if k != "log"}, default=str),
                      file=sys.stderr)
    trl_versions = next((r["versions"] for _, r in rows if r.get("versions")), None)
    env = f"; TRL environment: {', '.join(f'{k} {v}' for k, v in trl_versions.items() if v)}" if trl_versions else ""
    text = (f"{table(rows)}\n\njaxtune env: {bu.env_note(envs['jaxtune'])}; TRL env: {bu.env_note(envs['trl'])}\n\n"
            f"Machine: {bu.machine_markdown(m)}{env}\n\n"
            f"Command: `{bu.command('bench_vs_trl.py', argv)}`\n")
    print(text)
    bu.write_outputs(args.out, "bench_vs_trl", text, {"machine": m, "runs": rows})
    return 0 if all("error" not in r for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
