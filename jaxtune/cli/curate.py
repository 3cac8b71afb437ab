"""`jaxtune curate filter | self-instruct | sdft`: the data-curation stage before training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxtune.curate.decontam import load_references
from jaxtune.curate.filter import CAP_BY, DEDUP_METHODS, DEDUP_ON, FilterConfig, curate
from jaxtune.curate.records import write_conversations, write_rows
from jaxtune.curate.report import CurateReport, write_rejects
from jaxtune.curate.sdft import SdftConfig, distill
from jaxtune.curate.self_instruct import SelfInstructConfig, load_seed_tasks, self_instruct_dataset


def _finish(reports: list[CurateReport], args) -> None:
    for r in reports:
        print(r.summary(), file=sys.stderr)
    if args.report:
        path = Path(args.report).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([r.to_dict() for r in reports], indent=2, ensure_ascii=False) + "\n",
                        encoding="utf-8")
    if args.rejects:
        write_rejects(reports, args.rejects)


def _write(items: list, path: str, write) -> int:
    """An empty file would not load as training data, so nothing kept is an error, not an empty file."""
    if not items:
        print(f"error: no records left to write; {path} not written (see the counts above)", file=sys.stderr)
        return 1
    write(items, path)
    print(f"wrote {len(items)} records to {path}", file=sys.stderr)
    return 0


def _load(path: str, on_error: str, out: str):
    """Read the input; with `--on-error skip`, unreadable records are saved beside the output, not lost."""
    from jaxtune.data.formats import load_records

    convs, read_report = load_records(path, on_error=on_error, rejects_path=f"{out}.unreadable.jsonl")
    if read_report.skipped:
        print(read_report.summary(), file=sys.stderr)
    return convs


def _sampling(args) -> dict:
    return {"temperature": args.temperature, "top_p": args.top_p, "batch_size": args.batch_size}


def run_filter(args) -> int:
    from jaxtune.hf.load import load_pretrained, load_tokenizer

    dedup = () if args.dedup == ["none"] else tuple(args.dedup)
    cfg = FilterConfig(min_response_words=args.min_response_words, max_response_words=args.max_response_words,
                       max_prompt_words=args.max_prompt_words, max_tokens=args.max_tokens, language=args.language,
                       dedup=dedup, dedup_on=args.dedup_on, minhash_threshold=args.minhash_threshold,
                       minhash_ngram=args.ngram, rouge_threshold=args.rouge_threshold, seed=args.seed,
                       max_ifd=args.max_ifd, max_ppl=args.max_ppl, score_template=args.template,
                       score_seq_len=args.score_seq_len, score_batch_size=args.score_batch_size,
                       cap_per_type=args.cap_per_type, cap_by=args.cap_by, decontam_n=args.decontam_n,
                       decontam_threshold=args.decontam_threshold)
    references = load_references(args.decontam) if args.decontam else None
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    model = model_tokenizer = None
    if args.score_model:
        model, model_tokenizer = load_pretrained(args.score_model), load_tokenizer(args.score_model)
    kept, report = curate(_load(args.input, args.on_error, args.output), cfg, tokenizer=tokenizer, model=model,
                          model_tokenizer=model_tokenizer, references=references)
    _finish([report], args)
    return _write(kept, args.output, write_conversations)


def run_self_instruct(args) -> int:
    from jaxtune.curate.generator import load_generate_fn

    cfg = SelfInstructConfig(num_instructions=args.num, prompt_tasks=args.prompt_tasks,
                             prompt_machine=args.prompt_machine, prompts_per_round=args.prompts_per_round,
                             classify_shots=args.classify_shots, instance_shots=args.instance_shots,
                             max_instances=args.max_instances, max_new_tokens=args.max_new_tokens,
                             instance_max_new_tokens=args.max_new_tokens, seed=args.seed)
    seeds = load_seed_tasks(args.seeds)
    rows, reports = self_instruct_dataset(load_generate_fn(args.model, chat=False, **_sampling(args)), seeds, cfg)
    _finish(reports, args)
    return _write(rows, args.out, write_rows)


def run_sdft(args) -> int:
    from jaxtune.curate.generator import load_generate_fn

    chat = {"auto": None, "on": True, "off": False}[args.chat]
    convs = _load(args.data, args.on_error, args.out)
    generate_fn = load_generate_fn(args.model, chat=chat, **_sampling(args))
    out, report = distill(generate_fn, convs, SdftConfig(max_new_tokens=args.max_new_tokens, seed=args.seed))
    _finish([report], args)
    return _write(out, args.out, write_conversations)


def _common(p, sampling: bool) -> None:
    p.add_argument("--report", help="write the counts and example rejects as JSON here")
    p.add_argument("--rejects", help="write every rejected item (with check and reason) as JSONL here")
    p.add_argument("--seed", type=int, default=0)
    if sampling:
        p.add_argument("--temperature", type=float, default=0.7)
        p.add_argument("--top-p", type=float, default=0.9)
        p.add_argument("--batch-size", type=int, default=16, help="prompts per generation call")


def register(subparsers) -> None:
    curate_p = subparsers.add_parser("curate", help="filter, deduplicate, or generate instruction data")
    sub = curate_p.add_subparsers(dest="curate_command", metavar="CURATE", required=True)

    p = sub.add_parser("filter", help="quality filters and dedup; writes the kept records")
    p.add_argument("input", help="data file in any layout the data pipeline reads")
    p.add_argument("output", help="output .json or .jsonl (Alpaca where the records fit it)")
    p.add_argument("--dedup", nargs="+", default=["exact", "minhash"], choices=(*DEDUP_METHODS, "none"),
                   help="dedup passes in order (default: exact minhash)")
    p.add_argument("--dedup-on", default="all", choices=DEDUP_ON, help="which text dedup compares")
    p.add_argument("--minhash-threshold", type=float, default=0.7, help="Jaccard of word n-gram sets")
    p.add_argument("--ngram", type=int, default=3, help="words per MinHash shingle")
    p.add_argument("--rouge-threshold", type=float, default=0.7, help="ROUGE-L F1 for --dedup rougeL")
    p.add_argument("--min-response-words", type=int, default=1)
    p.add_argument("--max-response-words", type=int, default=4096)
    p.add_argument("--max-prompt-words", type=int, default=4096)
    p.add_argument("--tokenizer", help="tokenizer/model dir for --max-tokens")
    p.add_argument("--max-tokens", type=int, help="drop conversations longer than this many tokens")
    p.add_argument("--language", help="keep only this langdetect language code (e.g. en)")
    p.add_argument("--decontam", nargs="+", metavar="FILE",
                   help="evaluation prompts (JSON/JSONL, `prompt` or `instruction` field) to decontaminate "
                        "against; each set is named by its file stem")
    p.add_argument("--decontam-n", type=int, default=8, help="words per n-gram for --decontam")
    p.add_argument("--decontam-threshold", type=float, default=0.5,
                   help="drop a record when this fraction of its n-grams is in a reference set")
    p.add_argument("--score-model", metavar="DIR",
                   help="HF model that scores each last response (IFD, perplexity); alone, only reports them")
    p.add_argument("--template", help="chat template for scoring: built-in name or .jinja file "
                                      "(default: the score model tokenizer's own)")
    p.add_argument("--max-ifd", type=float, help="drop IFD >= this (1.0: the instruction does not help)")
    p.add_argument("--max-ppl", type=float, help="drop responses with perplexity above this")
    p.add_argument("--score-seq-len", type=int, default=512, help="longer records are not scored (dropped "
                                                                   "when a threshold is set)")
    p.add_argument("--score-batch-size", type=int, default=8)
    p.add_argument("--cap-per-type", type=int, metavar="N", help="keep the first N records of each type")
    p.add_argument("--cap-by", default="task_type", choices=CAP_BY,
                   help="type for --cap-per-type: the task_type (else category) field, or the first word")
    p.add_argument("--on-error", default="skip", choices=("skip", "raise"), help="records the reader rejects")
    _common(p, sampling=False)
    p.set_defaults(func=run_filter)

    p = sub.add_parser("self-instruct", help="generate instructions and examples from seed tasks (Self-Instruct)")
    p.add_argument("--model", required=True, help="HF model directory that generates")
    p.add_argument("--seeds", required=True, help="seed tasks JSONL (instruction, instances, is_classification)")
    p.add_argument("--out", required=True, help="output Alpaca .json or .jsonl")
    p.add_argument("--num", type=int, default=100, help="new instructions to generate")
    p.add_argument("--prompt-tasks", type=int, default=8, help="instructions shown per prompt")
    p.add_argument("--prompt-machine", type=int, default=2, help="of which generated ones")
    p.add_argument("--prompts-per-round", type=int, default=8)
    p.add_argument("--classify-shots", type=int, default=8, help="0 skips classification identification")
    p.add_argument("--instance-shots", type=int, default=2)
    p.add_argument("--max-instances", type=int, default=3, help="examples kept per instruction")
    p.add_argument("--max-new-tokens", type=int, default=256)
    _common(p, sampling=True)
    p.set_defaults(func=run_self_instruct)

    p = sub.add_parser("sdft", help="rewrite responses in the base model's own words (self-distillation)")
    p.add_argument("--model", required=True, help="the base HF model directory that will be fine-tuned")
    p.add_argument("--data", required=True, help="instruction data in any layout the data pipeline reads")
    p.add_argument("--out", required=True, help="output .json or .jsonl")
    p.add_argument("--chat", default="auto", choices=("auto", "on", "off"),
                   help="wrap prompts in the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--on-error", default="skip", choices=("skip", "raise"), help="records the reader rejects")
    _common(p, sampling=True)
    p.set_defaults(func=run_sdft)
