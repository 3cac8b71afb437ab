"""`jaxtune eval ifeval | rigidity` score saved responses; `jaxtune eval loss | forgetting | report | grounded |
closedbook | cost` each take a recipe YAML (evaluates that run's export against its base model) or `--model DIR [--adapter DIR]`; explicit flags
override what the recipe implies."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from jaxtune.cli.args import add_model_args


@dataclasses.dataclass(frozen=True)
class Target:
    """What to evaluate: the (tuned) model, its adapter, and the base and run dir it relates to."""

    model: str
    adapter: str | None
    tokenizer: str | None
    dtype: str
    base: str | None
    run: str | None
    recipe: object | None


def _exported(run_dir: Path) -> tuple[str | None, str | None]:
    """(merged model dir, adapter dir) that a finished run exported, where present."""
    merged, adapter = run_dir / "export" / "merged", run_dir / "export" / "adapter"
    return (str(merged) if (merged / "config.json").is_file() else None,
            str(adapter) if (adapter / "adapter_config.json").is_file() else None)


def resolve_target(args: argparse.Namespace) -> Target:
    """Combine the recipe (if any) with --model/--adapter/--base/--run; flags win."""
    recipe = None
    if args.recipe:
        from jaxtune.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.set)
    elif not args.model:
        raise ValueError("give a recipe YAML or --model DIR")
    model, adapter = args.model, args.adapter
    base, run = getattr(args, "base", None), getattr(args, "run", None)
    if recipe is not None:
        base = base or recipe.model.path
        run = run or recipe.output.run_dir
        if model is None:
            merged, exported_adapter = _exported(Path(recipe.output.run_dir))
            if adapter or exported_adapter:
                model, adapter = recipe.model.path, adapter or exported_adapter
            elif merged:
                model = merged
            else:
                raise ValueError(f"{args.recipe}: run dir {recipe.output.run_dir} has no export/adapter or "
                                 "export/merged yet; finish training with output.export: true, or pass --model "
                                 "[--adapter]")
    return Target(model=model, adapter=adapter, tokenizer=args.tokenizer, dtype=args.dtype, base=base, run=run,
                  recipe=recipe)


def _write_json(path: str | None, doc: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}")


# -- eval loss ------------------------------------------------------------------------------------------------
def _loss(args: argparse.Namespace) -> int:
    from jaxtune.eval.loss import dataset_loss, examples_loss, read_text_slice, text_loss
    from jaxtune.generate import load_for_inference

    t = resolve_target(args)
    model, tok = load_for_inference(t.model, t.adapter, tokenizer=t.tokenizer, dtype=t.dtype)
    data_cfg = t.recipe.data if t.recipe is not None else None
    seq_len = args.seq_len or (data_cfg.seq_len if data_cfg else 512)
    if args.text:
        source = args.text
        res = text_loss(model, tok, read_text_slice(args.text, args.start, args.chars), seq_len=seq_len,
                        batch_size=args.batch_size, max_windows=args.max_windows)
    elif args.data:
        source = args.data
        res = dataset_loss(model, tok, args.data, seq_len=seq_len, batch_size=args.batch_size,
                           chat_template=args.template or (data_cfg.chat_template if data_cfg else None),
                           train_on=args.train_on, max_examples=args.max_examples)
    elif data_cfg is not None:
        from jaxtune.data.loader import pad_id_for
        from jaxtune.data.prepare import prepare_dataset

        _, val, _ = prepare_dataset(data_cfg, tok)
        if not val:
            raise ValueError(f"{args.recipe}: the recipe has no validation split (data.validation or "
                             "data.val_fraction); pass --data FILE or --text FILE")
        source = f"{args.recipe} validation split"
        res = examples_loss(model, val[:args.max_examples], seq_len=seq_len, batch_size=args.batch_size,
                            pad_id=pad_id_for(tok), packing=data_cfg.packing)
    else:
        raise ValueError("nothing to evaluate: pass --data FILE (instruction data), --text FILE (raw text) or a recipe")
    print(f"{source}: loss {res.loss:.4f}  perplexity {res.perplexity:.4f}  accuracy {res.accuracy:.4f}  "
          f"tokens {res.tokens}")
    _write_json(args.out, {"model": t.model, "adapter": t.adapter, "data": source, **res.to_dict()})
    return 0


# -- eval forgetting ------------------------------------------------------------------------------------------
def _forgetting_config(t: Target, args):
    from jaxtune.eval.forgetting import ForgettingConfig, saved_config

    saved = saved_config(t.run) if t.run else None
    if saved is not None:
        return saved, True
    cfg = (t.recipe.forgetting if t.recipe is not None and t.recipe.forgetting is not None else ForgettingConfig())
    if args.general_text:
        cfg = dataclasses.replace(cfg, general_text=args.general_text)
    return cfg, False


def forgetting_now(t: Target, tuned, tokenizer, args) -> tuple[dict, dict]:
    """`(base figures, tuned figures)`: the run's recorded baseline when it has one, else measured on --base."""
    from jaxtune.eval.forgetting import ForgettingMonitor
    from jaxtune.generate import load_for_inference

    cfg, saved = _forgetting_config(t, args)
    monitor = ForgettingMonitor(tokenizer, cfg, run_dir=t.run if saved else None)
    if saved:
        base = monitor.baseline(None)
    else:
        if not t.base:
            raise ValueError("forgetting needs the base model: pass --base DIR (or a run dir with a recorded baseline)")
        base_model, _ = load_for_inference(t.base, dtype=t.dtype)
        base = monitor.baseline(base_model)
    return base, monitor.measure(tuned)


def _forgetting(args: argparse.Namespace) -> int:
    from jaxtune.generate import load_for_inference

    t = resolve_target(args)
    model, tok = load_for_inference(t.model, t.adapter, tokenizer=t.tokenizer, dtype=t.dtype)
    base, tuned = forgetting_now(t, model, tok, args)
    print(f"{'metric':<20}{'base':>12}{'tuned':>12}{'change':>10}")
    for key in (k for k in tuned if not k.endswith("_rel")):
        print(f"{key.removeprefix('forgetting/'):<20}{base[key]:>12.4f}{tuned[key]:>12.4f}"
              f"{100 * tuned[key + '_rel']:>+9.2f}%")
    _write_json(args.out, {"model": t.model, "adapter": t.adapter, "base": base, "tuned": tuned})
    return 0


# -- eval report ----------------------------------------------------------------------------------------------
def _report(args: argparse.Namespace) -> int:
    from jaxtune import stats
    from jaxtune.assets import find_asset
    from jaxtune.data.chat import resolve_template
    from jaxtune.eval import ifeval, report, rigidity
    from jaxtune.eval.compare import score_models
    from jaxtune.generate import load_for_inference

    t = resolve_target(args)
    if not t.base:
        raise ValueError("eval report compares against the base model: pass --base DIR (or a recipe)")
    input_path = args.ifeval_input or find_asset(f"data/{ifeval.DEFAULT_INPUT_NAME}")
    if input_path is None:
        raise ValueError("no IFEval input file found under $JAXTUNE_ASSETS/data; pass --ifeval-input FILE")
    inputs = ifeval.load_ifeval_inputs(input_path)[:args.limit]
    tuned, tok = load_for_inference(t.model, t.adapter, tokenizer=t.tokenizer, dtype=t.dtype)
    base, _ = load_for_inference(t.base, dtype=t.dtype)
    spec = args.template or (t.recipe.data.chat_template if t.recipe is not None else None)
    template = resolve_template(spec, tok)
    if template is None:
        print("note: the tokenizer has no chat template and no --template was given; prompting with raw text",
              file=sys.stderr)
    probes = None if args.no_rigidity else rigidity.load_probes(args.rigidity_probes)
    scored, rig = score_models({"base": base, "tuned": tuned}, tok, inputs, args.out, template=template,
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, probes=probes)
    forgetting = None
    if not args.no_forgetting:
        forgetting = forgetting_now(t, tuned, tok, args)[1]
    metrics_path = Path(t.run) / "metrics.jsonl" if t.run else None
    rows = report.read_metrics(metrics_path) if metrics_path is not None and metrics_path.is_file() else None
    doc = report.build_report(
        base_ifeval=scored["base"], tuned_ifeval=scored["tuned"],
        models={"tuned": {"model": t.model, "adapter": t.adapter}, "base": {"model": t.base}},
        settings={"ifeval_input": str(input_path), "limit": args.limit, "max_new_tokens": args.max_new_tokens,
                  "batch_size": args.batch_size, "template": spec, "decoding": "greedy", "run": t.run},
        base_rigidity=rig.get("base"), tuned_rigidity=rig.get("tuned"), forgetting=forgetting, metrics_rows=rows,
        data_report=report.read_data_report(t.run) if t.run else None,
        forgetting_sizes=report.forgetting_sizes(t.run) if t.run else None, n_samples=args.samples)
    json_path, html_path = report.write_report(doc, args.out)
    over = doc["overreach"]
    lines = list(doc["ifeval"]["metrics"].items())
    lines += [("unwarranted_refusal", over["refusal"]), ("unrequested_formatting", over["formatting"]["any"])]
    for name, v in lines:
        print(f"{name:<24} base {stats.fmt_rate(v['base']):<28} tuned {stats.fmt_rate(v['tuned']):<28} "
              f"Δ {stats.fmt_points(v['difference'])}")
    print(f"wrote {json_path}\nwrote {html_path}")
    return 0


# -- eval cost ------------------------------------------------------------------------------------------------
def _cost_prompts(args: argparse.Namespace) -> tuple[list[str], str]:
    """User prompts: the last user turn of each --data record, else the `prompt`/`instruction` field of each
    --prompts record (default: the IFEval input in the assets)."""
    if args.data and args.prompts:
        raise ValueError("give --data FILE or --prompts FILE, not both")
    if args.data:
        from jaxtune.curate.records import prompt
        from jaxtune.data.formats import load_records

        convs, _ = load_records(args.data)
        prompts = [prompt(c) for c in convs if c.text is None]
        if len(prompts) < len(convs):
            print(f"note: {args.data}: {len(convs) - len(prompts)} plain-text record(s) have no user turn; skipped",
                  file=sys.stderr)
        source = args.data
    else:
        from jaxtune.assets import find_asset
        from jaxtune.curate.decontam import load_reference_prompts
        from jaxtune.eval.ifeval import DEFAULT_INPUT_NAME

        source = args.prompts or find_asset(f"data/{DEFAULT_INPUT_NAME}")
        if source is None:
            raise ValueError("no prompts: pass --data FILE or --prompts FILE (no IFEval input under $JAXTUNE_ASSETS)")
        prompts = load_reference_prompts(source)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: must be at least 1")
    if not prompts:
        raise ValueError(f"{source}: no prompts found")
    return prompts[:args.limit], str(source)


def _cost(args: argparse.Namespace) -> int:
    from jaxtune.data.chat import resolve_template
    from jaxtune.eval.latency import TIMES, measure_latency
    from jaxtune.generate import load_for_inference, stop_token_ids
    from jaxtune.stats import Estimate, fmt_mean

    t = resolve_target(args)
    if not t.base:
        raise ValueError("eval cost compares against the base model: pass --base DIR (or a recipe)")
    if args.merge and not t.adapter:
        raise ValueError("--merge folds an adapter into the weights: pass --adapter DIR (or a recipe that exported one)")
    prompts, source = _cost_prompts(args)
    tuned, tok = load_for_inference(t.model, t.adapter, tokenizer=t.tokenizer, dtype=t.dtype)
    if args.merge and t.adapter:
        from jaxtune.lora.apply import merge_lora

        tuned = merge_lora(tuned)
    base, _ = load_for_inference(t.base, dtype=t.dtype)
    spec = args.template or (t.recipe.data.chat_template if t.recipe is not None else None)
    template = resolve_template(spec, tok)
    stops = stop_token_ids(base.config, tok, template, extra=args.stop_id)
    res = measure_latency({"base": base, "tuned": tuned}, tok, prompts, template=template, stop_ids=stops,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, repeats=args.repeats)
    s = res["setup"]
    for side in ("base", "tuned"):
        if not res["models"][side]["deterministic"]:
            print(f"note: {side} wrote different tokens in different repeats (nondeterministic kernels); lengths "
                  "are from the first repeat", file=sys.stderr)
    adapter = "" if not t.adapter else "; adapter merged" if args.merge else "; adapter unmerged (--merge folds it)"
    print(f"{source}: {s['prompts']} prompts in {s['batches']} batches of {s['batch_size']}, {s['repeats']} "
          f"repeat(s), up to {s['max_new_tokens']} new tokens, greedy, on {s['device']}; compile time excluded "
          f"(an untimed warm-up per model and batch shape){adapter}")
    labels = {"length": "response tokens", "ttft_ms": "TTFT ms/batch", "per_token_ms": "decode ms/token",
              "total_ms": "total ms/batch"}
    for key in ("length", *TIMES):
        for side in ("base", "tuned"):
            print(f"{labels[key]:<17}{side:<13}{fmt_mean(Estimate(**res['models'][side][key]))}")
        ratio = res["comparison"]["tuned"]["ratio"][key]
        print(f"{'':<17}{'tuned - base':<13}{fmt_mean(Estimate(**res['comparison']['tuned'][key]))}  "
              f"tuned/base {'n/a' if ratio is None else f'{ratio:.3f}'}")
    print(f"total ms/prompt  base {res['models']['base']['per_prompt_ms']:.3f}  "
          f"tuned {res['models']['tuned']['per_prompt_ms']:.3f}")
    if args.out:
        _write_json(str(Path(args.out) / "cost.json"),
                    {"tuned": {"model": t.model, "adapter": t.adapter, "merged": bool(args.merge and t.adapter)},
                     "base": {"model": t.base},
                     "prompts": source, "template": spec, **res})
    return 0


def _add_cost(sub) -> None:
    c = sub.add_parser("cost", help="inference cost of tuned vs base: response length, time to first token, "
                                    "per-token decode time, on the same prompts and batches")
    _target_args(c)
    c.add_argument("--base", help="base model dir (default: the recipe's model.path)")
    c.add_argument("--data", help="instruction/chat data file: each record's last user turn is a prompt")
    c.add_argument("--prompts", help="JSON/JSONL of records with a prompt or instruction field (default: the "
                                     "IFEval input in assets)")
    c.add_argument("--template", help="chat template for prompts (default: the recipe's, else the tokenizer's)")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--merge", action="store_true",
                   help="fold --adapter into the weights before timing, as a merged export serves it, so the "
                   "adapter's extra matmuls are not timed")
    c.add_argument("--stop-id", type=int, action="append", default=[],
                   help="extra token id to stop at (repeatable); EOS and the template's end-of-turn are included")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--repeats", type=int, default=3, help="timed runs per batch and model (median taken)")
    c.add_argument("--limit", type=int, help="use only the first N prompts")
    c.add_argument("--out", help="output directory: cost.json")
    c.set_defaults(func=_cost)


# -- eval grounded | closedbook --------------------------------------------------------------------------------
def _hallucination(args: argparse.Namespace) -> int:
    from jaxtune.data.chat import resolve_template
    from jaxtune.eval import closedbook, grounded
    from jaxtune.eval.hallucination import write_result
    from jaxtune.generate import load_for_inference

    load, run, report = {
        "grounded": (grounded.load_grounded, grounded.evaluate_grounded, grounded.format_report),
        "closedbook": (closedbook.load_closedbook, closedbook.evaluate_closedbook, closedbook.format_report),
    }[args.task]
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: must be at least 1")
    t = resolve_target(args)
    records = load(args.data)[:args.limit]
    tuned, tok = load_for_inference(t.model, t.adapter, tokenizer=t.tokenizer, dtype=t.dtype)
    models = {"tuned": tuned} if t.base else {"model": tuned}
    if t.base:
        models = {"base": load_for_inference(t.base, dtype=t.dtype)[0], **models}
    spec = args.template or (t.recipe.data.chat_template if t.recipe is not None else None)
    template = resolve_template(spec, tok)
    if template is None:
        print("note: the tokenizer has no chat template and no --template was given; prompting with raw text",
              file=sys.stderr)
    doc = run(models, tok, records, template=template, max_new_tokens=args.max_new_tokens,
              batch_size=args.batch_size, extra_stop_ids=args.stop_id)
    doc = {"models": {"model": t.model, "adapter": t.adapter, "base": t.base},
           "settings": {"data": args.data or "packaged", "limit": args.limit, "template": spec,
                        "max_new_tokens": args.max_new_tokens, "decoding": "greedy", "stop_ids": args.stop_id},
           **doc}
    print(report(doc))
    print(f"wrote {write_result(doc, args.out or f'{args.task}_{Path(t.model).name}', args.task)}")
    return 0


def _add_hallucination(sub) -> None:
    """`grounded` and `closedbook`: generate answers with a model (and its base) and score hallucination."""
    for task, about, data in (
        ("grounded", "hallucination about a given story: answers checked word by word against the story",
         "grounded JSONL {id, context, question, answer, aliases, kind} (default: the packaged stories)"),
        ("closedbook", ("hallucination without a story: answers, abstentions and guesses on known and "
                        "unanswerable questions"),
         "closed-book JSONL {id, question, answers} (default: the packaged questions)"),
    ):
        p = sub.add_parser(task, help=about, description=f"Score {about}. With --base, base and tuned side by "
                           "side with their paired difference in points. Writes <out>/" + task + ".json.")
        _target_args(p)
        p.add_argument("--base", help="base model dir to compare against (default: the recipe's model.path)")
        p.add_argument("--data", help=data)
        p.add_argument("--limit", type=int, help="use only the first N records")
        p.add_argument("--template", help="chat template for prompts (default: the recipe's, else the "
                       "tokenizer's; none: raw text)")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--stop-id", type=int, action="append", default=[],
                       help="extra token id to stop at (repeatable), e.g. 1 for stories260K's end-of-story <s>")
        p.add_argument("--out", help=f"output directory (default: ./{task}_<model dir name>)")
        p.set_defaults(func=_hallucination, task=task)


# -- registration ---------------------------------------------------------------------------------------------
def _ifeval(args: argparse.Namespace) -> int:
    from jaxtune.eval import ifeval

    input_path = Path(args.input) if args.input else ifeval.default_input()
    if input_path is None:
        print(
            "error: no IFEval input file given and none found under $JAXTUNE_ASSETS/data or "
            f"../shared/assets/data; pass --input PATH/{ifeval.DEFAULT_INPUT_NAME}",
            file=sys.stderr,
        )
        return 2
    inputs = ifeval.load_inputs_with_lines(input_path)  # bad files raise: cli.main prints them and exits 2
    responses = ifeval.match_responses(inputs, ifeval.load_responses(args.responses), input_path, args.responses)
    result = ifeval.score_responses([inp for _, inp in inputs], responses)
    out_dir = Path(args.out) if args.out else Path(f"ifeval_{Path(args.responses).stem}")
    rows_path, summary_path = ifeval.write_results(result, out_dir)
    print(ifeval.format_report(result))
    print(f"\nper-prompt results: {rows_path}\nsummary: {summary_path}")
    return 0


def _rigidity(args: argparse.Namespace) -> int:
    from jaxtune.eval import ifeval, rigidity

    probes_path = Path(args.probes) if args.probes else rigidity.DEFAULT_PROBES
    probes = rigidity.load_probes(probes_path)  # bad files raise: cli.main prints them and exits 2
    as_inputs = [(i + 1, {"key": p.id, "prompt": p.prompt}) for i, p in enumerate(probes)]
    responses = ifeval.match_responses(as_inputs, ifeval.load_responses(args.responses), probes_path,
                                      args.responses)
    result = rigidity.score_rigidity(probes, responses, loose=args.loose, probe_set=probes_path.stem)
    out = Path(args.out) if args.out else Path(f"rigidity_{Path(args.responses).stem}")
    rows_path, summary_path = ifeval.write_results(result, out, name="rigidity")
    print(rigidity.format_report(result))
    print(f"\nper-probe results: {rows_path}\nsummary: {summary_path}")
    return 0


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="recipe YAML: evaluate its run's export (model, adapter, base, run dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    add_model_args(p, required=False)


def _add_scoring(sub) -> None:
    """`ifeval` and `rigidity`: score saved responses, no model needed."""
    p = sub.add_parser(
        "ifeval",
        help="score saved responses with the IFEval instruction checkers",
        description="Score {prompt, response} JSONL against IFEval prompts: strict/loose, prompt/instruction "
        "level, format adherence and ignored-constraint rate. Writes per-prompt results and a summary.",
    )
    p.add_argument("--responses", required=True,
                   help="JSONL of {prompt, response} records, one per input prompt; records without prompts "
                   "need a first line {\"prompts_sha256\": ...} (docs/ifeval.md)")
    p.add_argument(
        "--input",
        help="IFEval input JSONL (default: $JAXTUNE_ASSETS/data/ifeval_input_data.jsonl or ../shared/assets/data/)",
    )
    p.add_argument("--out", help="output directory (default: ./ifeval_<responses file stem>)")
    p.set_defaults(func=_ifeval)

    q = sub.add_parser(
        "rigidity",
        help="score responses to the over-rigidity probes (conflicting format/content constraints)",
        description="Categorise each probe response as both / format_only / content_only / neither.",
    )
    q.add_argument("--responses", required=True,
                   help="JSONL of {prompt, response} records, one per probe prompt (or a prompts_sha256 header "
                   "and {response} records in probe order)")
    q.add_argument("--probes", help="probe JSONL (default: packaged over_rigidity_v1.jsonl)")
    q.add_argument("--loose", action="store_true", help="use IFEval loose checking instead of strict")
    q.add_argument("--out", help="output directory (default: ./rigidity_<responses file stem>)")
    q.set_defaults(func=_rigidity)


def _add_model_evals(sub) -> None:
    """`loss`, `forgetting` and `report`: run a model (a recipe's run, or --model [--adapter])."""
    p = sub.add_parser("loss", help="loss and perplexity on an instruction dataset or a text file")
    _target_args(p)
    p.add_argument("--data", help="instruction/chat data file, scored on response tokens as in training")
    p.add_argument("--text", help="raw text file, every token scored (perplexity)")
    p.add_argument("--template", help="chat template for --data: chatml, llama3, alpaca, story or a .jinja file")
    p.add_argument("--train-on", default="assistant", choices=("assistant", "all", "last_turn"))
    p.add_argument("--seq-len", type=int, help="window / row length (default: the recipe's, else 512)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-examples", type=int, help="evaluate only the first N examples of --data")
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows of --text")
    p.add_argument("--start", type=int, default=0, help="first character of --text to use")
    p.add_argument("--chars", type=int, help="number of characters of --text to use (default: all)")
    p.add_argument("--out", help="write the result as JSON here")
    p.set_defaults(func=_loss)

    f = sub.add_parser("forgetting", help="perplexity and base-task drift of a tuned model vs its base")
    _target_args(f)
    f.add_argument("--base", help="base model dir (not needed when --run holds a recorded baseline)")
    f.add_argument("--run", help="training run dir: reuse its recorded base samples, probe outputs and baseline")
    f.add_argument("--general-text", help="general-text file (default: tiny Shakespeare from $JAXTUNE_ASSETS)")
    f.add_argument("--out", help="write the result as JSON here")
    f.set_defaults(func=_forgetting)

    r = sub.add_parser("report", help="base-vs-tuned report: report.json and a self-contained report.html")
    _target_args(r)
    r.add_argument("--base", help="base model dir (default: the recipe's model.path)")
    r.add_argument("--run", help="training run dir: loss curves and forgetting history from its metrics.jsonl")
    r.add_argument("--ifeval-input", help="IFEval-format JSONL (default: ifeval_input_data.jsonl in assets)")
    r.add_argument("--limit", type=int, help="use only the first N IFEval prompts")
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--template", help="chat template for prompts (default: the recipe's, else the tokenizer's)")
    r.add_argument("--samples", type=int, default=5, help="sample generations shown side by side")
    r.add_argument("--rigidity-probes", help="over-rigidity probe file (default: the packaged v1 set)")
    r.add_argument("--no-rigidity", action="store_true", help="skip the over-rigidity probes")
    r.add_argument("--no-forgetting", action="store_true", help="skip measuring forgetting now")
    r.add_argument("--general-text", help="general-text file for forgetting (default: tiny Shakespeare)")
    r.add_argument("--out", required=True, help="output directory")
    r.set_defaults(func=_report)


def register(sub) -> None:
    """The `jaxtune eval` group: ifeval, rigidity, loss, forgetting, report, cost, grounded, closedbook."""
    _add_scoring(sub)
    _add_model_evals(sub)
    _add_cost(sub)
    _add_hallucination(sub)
