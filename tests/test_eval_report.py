"""Report: report.json keeps its schema, report.html is self-contained with every plot, metrics.jsonl parsing,
and the `jaxtune eval …` / `generate` / `chat` commands end to end on stories260K with a PEFT adapter."""

from __future__ import annotations

import base64
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtune import stats
from jaxtune.cli.main import main
from jaxtune.eval import report as rp
from jaxtune.eval.ifeval import load_ifeval_inputs, score_responses
from jaxtune.eval.overreach import score_overreach
from jaxtune.eval.rigidity import load_probes, score_rigidity

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RATE = {"value": "float", "lo": "float", "hi": "float", "n": "int", "k": "int", "method": "str"}
DIFF = {**RATE, "k": "null"}
CMP = {"base": RATE, "tuned": RATE, "difference": DIFF}
PAIR = {"count": "int", "strict": CMP, "loose": CMP}
SIDE = {"response": "str", "followed_loose": ["bool"]}
SIZES = {"forgetting/base_ppl": {"n": 16, "of": "samples the base model wrote (up to 64 tokens each)"}}
# The report.json shape for schema_version 2; changing it means bumping SCHEMA_VERSION (and this literal).
SCHEMA_V2 = {
    "schema_version": "int", "jaxtune_version": "str", "created_utc": "str",
    "models": {"tuned": {"model": "str", "adapter": "str"}, "base": {"model": "str"}},
    "settings": {"ifeval_input": "str", "limit": "int"},
    "intervals": {"level": "float", "rates": "str", "differences": "str", "n_boot": "int", "seed": "int"},
    "ifeval": {"num_prompts": "int", "num_instructions": "int",
               "metrics": {m: {"unit": "str", **CMP} for m in rp.HEADLINE_METRICS},
               "by_group": "table", "by_instruction": "table"},
    "overreach": {"num_prompts": "int", "refusal": CMP,
                  "formatting": {k: CMP for k in ("any", "list", "header", "json", "code", "bold", "table")}},
    "rigidity": {"probe_set": "str", "loose": "bool", "num_probes": "int",
                 "categories": {c: CMP for c in ("both", "format_only", "content_only", "neither")}},
    "forgetting": {"current": {"forgetting/base_ppl": "float", "forgetting/base_ppl_rel": "float"},
                   "history": [{"step": "int", "forgetting/base_ppl": "float",
                                "forgetting/base_ppl_rel": "float"}],
                   "sizes": {"forgetting/base_ppl": {"n": "int", "of": "str"}}},
    "training": {"train": [["int", "float"]], "eval": [["int", "float"]]},
    "samples": [{"key": "int", "prompt": "str", "instruction_id_list": ["str"], "base": SIDE, "tuned": SIDE}],
}


def _shape(doc, path=""):
    """Type tree of a JSON document; tables keyed by instruction id collapse to 'table' after a check."""
    if path.endswith(("by_group", "by_instruction")):
        assert doc and all(_shape(v) == PAIR for v in doc.values()), path
        return "table"
    if isinstance(doc, dict):
        return {k: _shape(v, f"{path}/{k}") for k, v in doc.items()}
    if isinstance(doc, list):
        shapes = [_shape(x, path) for x in doc]
        return [s for i, s in enumerate(shapes) if s not in shapes[:i]]
    return {bool: "bool", int: "int", float: "float", str: "str", type(None): "null"}[type(doc)]


@pytest.fixture(scope="module")
def scored(assets_dir):
    """GPT-4's official responses as 'tuned', the first sentence of each as 'base', on 30 prompts."""
    inputs = load_ifeval_inputs(assets_dir / "data" / "ifeval_input_data.jsonl")[:30]
    gpt4 = [json.loads(line)["response"]
            for line in (assets_dir / "data" / "ifeval_responses_gpt4.jsonl").read_text().splitlines()[:30]]
    probes = load_probes()
    return (score_responses(inputs, [r.split(".")[0] for r in gpt4]), score_responses(inputs, gpt4),
            score_rigidity(probes, ["ok"] * len(probes)), score_rigidity(probes, [p.prompt for p in probes]))


METRICS_ROWS = [
    {"step": 0, "split": "forgetting", "forgetting/base_ppl": 3.0, "forgetting/base_ppl_rel": 0.0},
    {"step": 1, "split": "train", "loss": 2.5}, {"step": 2, "split": "train", "loss": 2.1},
    {"step": 2, "split": "eval", "loss": 2.3},
    {"step": 2, "split": "forgetting", "forgetting/base_ppl": 3.3, "forgetting/base_ppl_rel": 0.1},
    {"step": 3, "loss": 1.9, "eval_loss": 2.0}, {"step": 4, "split": "train", "loss": float("nan")},
]


def _doc(scored, **kw):
    base, tuned, rig_base, rig_tuned = scored
    return rp.build_report(
        base_ifeval=base, tuned_ifeval=tuned, models={"tuned": {"model": "m", "adapter": "a"}, "base": {"model": "b"}},
        settings={"ifeval_input": "in.jsonl", "limit": 30}, base_rigidity=rig_base, tuned_rigidity=rig_tuned,
        forgetting={"forgetting/base_ppl": 3.3, "forgetting/base_ppl_rel": 0.1}, metrics_rows=METRICS_ROWS,
        forgetting_sizes=SIZES, **kw)


def test_report_json_schema_is_stable(scored, tmp_path):
    json_path, _ = rp.write_report(_doc(scored, n_samples=3), tmp_path)
    doc = json.loads(json_path.read_text())
    assert tuple(doc) == rp.REPORT_KEYS
    assert doc["schema_version"] == rp.SCHEMA_VERSION == 2
    assert _shape(doc) == SCHEMA_V2
    assert len(doc["samples"]) == 3
    assert "relative" not in doc["ifeval"] and "relative" not in json_path.read_text()


def test_report_rates_match_the_scored_results(scored):
    base, tuned, rig_base, rig_tuned = scored
    doc = _doc(scored)
    m = doc["ifeval"]["metrics"]
    for name in rp.HEADLINE_METRICS:
        for side, result in (("base", base), ("tuned", tuned)):
            e = m[name][side]
            assert e["value"] == pytest.approx(getattr(result, name)), (name, side)
            assert e["lo"] <= e["value"] <= e["hi"] and e["k"] == round(e["value"] * e["n"])
    assert m["prompt_strict"]["tuned"]["n"] == tuned.num_prompts == 30
    assert m["instruction_strict"]["tuned"]["n"] == tuned.num_instructions
    for name, v in tuned.by_instruction.items():
        assert doc["ifeval"]["by_instruction"][name]["loose"]["tuned"]["value"] == pytest.approx(v["loose"])
        assert doc["ifeval"]["by_instruction"][name]["count"] == v["count"]
    cats = doc["rigidity"]["categories"]
    assert {c: cats[c]["tuned"]["k"] for c in cats} == rig_tuned.counts
    assert {c: cats[c]["base"]["n"] for c in cats} == {c: len(rig_base.rows) for c in cats}
    for c in cats:
        assert cats[c]["difference"] == stats.paired_difference(
            [r.category == c for r in rig_base.rows], [r.category == c for r in rig_tuned.rows]).to_dict()
    assert doc["training"] == {"train": [[1, 2.5], [2, 2.1], [3, 1.9]], "eval": [[2, 2.3], [3, 2.0]]}
    assert [h["step"] for h in doc["forgetting"]["history"]] == [0, 2]
    assert doc["samples"][0]["tuned"]["response"] == tuned.rows[0].response


# Four prompts: three ask for no commas, the fourth also for the keyword "apple". Base follows only prompt 3;
# tuned follows prompts 1-3 fully and only the keyword on prompt 4.
HAND_INPUTS = [{"key": i, "prompt": f"Describe cat number {i}.", "instruction_id_list": ["punctuation:no_comma"],
                "kwargs": [{}]} for i in range(3)] + [
    {"key": 3, "prompt": "Describe an apple.", "instruction_id_list": ["punctuation:no_comma", "keywords:existence"],
     "kwargs": [{}, {"keywords": ["apple"]}]}]
HAND_BASE = ["cats, dogs", "cats, dogs", "cats purr", "red, round"]
HAND_TUNED = ["cats purr", "cats nap", "cats purr", "an apple, red"]


def _hand_doc(base=HAND_BASE, tuned=HAND_TUNED):
    return rp.build_report(base_ifeval=score_responses(HAND_INPUTS, base),
                           tuned_ifeval=score_responses(HAND_INPUTS, tuned), models={}, settings={})


def test_every_rate_has_its_n_and_wilson_interval():
    m = _hand_doc()["ifeval"]["metrics"]
    # 3 of 4 prompts followed: 0.75 with the Wilson score interval [0.3006, 0.9544].
    assert m["prompt_strict"]["tuned"] == {"value": 0.75, "lo": pytest.approx(0.300642, abs=1e-6),
                                           "hi": pytest.approx(0.954413, abs=1e-6), "n": 4, "k": 3,
                                           "method": "wilson"}
    assert (m["prompt_strict"]["base"]["k"], m["prompt_strict"]["base"]["lo"], m["prompt_strict"]["base"]["hi"]) == (
        1, pytest.approx(0.045587, abs=1e-6), pytest.approx(0.699358, abs=1e-6))
    # 4 of 5 instructions followed: [0.3755, 0.9638].
    e = m["instruction_loose"]["tuned"]
    assert (e["value"], e["n"], e["k"]) == (0.8, 5, 4)
    assert (e["lo"], e["hi"]) == (pytest.approx(0.375535, abs=1e-6), pytest.approx(0.963776, abs=1e-6))
    # Format adherence counts only the four no_comma instructions; the ignored-constraint rate all five.
    assert {k: m["format_adherence"]["tuned"][k] for k in ("value", "n", "k")} == {"value": 0.75, "n": 4, "k": 3}
    assert {k: m["ignored_constraint_rate"]["tuned"][k] for k in ("value", "n", "k")} == {"value": 0.2, "n": 5, "k": 1}
    assert m["format_adherence"]["unit"] == "format-group instructions"


def test_differences_are_points_paired_over_prompts():
    doc = _hand_doc()
    m = doc["ifeval"]["metrics"]
    # Prompt level: per-prompt 0/1 flags, base [0, 0, 1, 0] and tuned [1, 1, 1, 0].
    d = m["prompt_strict"]["difference"]
    assert d == stats.paired_difference([0, 0, 1, 0], [1, 1, 1, 0]).to_dict()
    assert (d["value"], d["n"], d["method"]) == (0.5, 4, "paired bootstrap")
    assert d["lo"] == 0.0 and d["hi"] == 1.0  # 4 prompts: a resample of the two unchanged ones is likely enough
    # Instruction level: each prompt's fraction followed, base [0, 0, 1, 0] and tuned [1, 1, 1, 1/2].
    assert m["instruction_strict"]["difference"] == stats.paired_difference([0, 0, 1, 0],
                                                                           [1, 1, 1, 0.5]).to_dict()
    assert m["instruction_strict"]["difference"]["value"] == 0.625
    assert m["ignored_constraint_rate"]["difference"]["value"] == -0.625
    # Format adherence: per prompt, the fraction of its format-group instructions followed.
    assert m["format_adherence"]["difference"] == stats.paired_difference([0, 0, 1, 0], [1, 1, 1, 0]).to_dict()
    assert doc["ifeval"]["by_group"]["keywords"]["strict"]["difference"] == stats.paired_difference(
        [0], [1]).to_dict()
    # Swapping the models negates every difference; identical models differ by exactly zero.
    swapped = _hand_doc(HAND_TUNED, HAND_BASE)["ifeval"]["metrics"]
    assert swapped["prompt_strict"]["difference"]["value"] == -0.5
    same = _hand_doc(HAND_TUNED, HAND_TUNED)["ifeval"]["metrics"]
    assert {(v["difference"]["value"], v["difference"]["lo"], v["difference"]["hi"]) for v in same.values()} == {
        (0.0, 0.0, 0.0)}


def test_base_and_tuned_must_share_prompts():
    base = score_responses(HAND_INPUTS, HAND_BASE)
    other = score_responses(HAND_INPUTS[:3] + [{**HAND_INPUTS[3], "prompt": "Describe a pear."}], HAND_TUNED)
    with pytest.raises(ValueError, match="different prompts"):
        rp.build_report(base_ifeval=base, tuned_ifeval=other, models={}, settings={})


def test_overreach_section_has_rates_and_paired_differences():
    # Prompt 4 asks for a list, so a list there is requested; tuned adds unrequested lists to prompts 1 and 2.
    inputs = HAND_INPUTS[:3] + [{**HAND_INPUTS[3], "prompt": "Give a bulleted list of apples."}]
    base = ["I'm sorry, but I can't help with that.", "cats nap", "cats purr", "- red\n- green"]
    tuned = ["- cats\n- dogs", "- a\n- b", "cats purr", "- red\n- green"]
    over = rp.build_report(base_ifeval=score_responses(inputs, base), tuned_ifeval=score_responses(inputs, tuned),
                           models={}, settings={})["overreach"]
    prompts = [i["prompt"] for i in inputs]
    for side, responses in (("base", base), ("tuned", tuned)):
        want = score_overreach(prompts, responses)
        assert over["refusal"][side] == want["refusal"]
        assert {k: v[side] for k, v in over["formatting"].items()} == want["formatting"]
    assert (over["refusal"]["base"]["k"], over["refusal"]["tuned"]["k"], over["refusal"]["base"]["n"]) == (1, 0, 4)
    assert over["refusal"]["difference"] == stats.paired_difference([1, 0, 0, 0], [0, 0, 0, 0]).to_dict()
    lists = over["formatting"]["list"]
    assert (lists["tuned"]["k"], lists["tuned"]["n"], lists["base"]["k"]) == (2, 3, 0)  # prompt 4 is not counted
    assert lists["difference"] == stats.paired_difference([0, 0, 0], [1, 1, 0]).to_dict()
    assert over["formatting"]["any"]["difference"]["value"] == 0.5


def test_html_shows_intervals_points_and_no_relative_change(scored, tmp_path):
    doc = _hand_doc()
    doc["forgetting"] = {"current": {"forgetting/base_ppl": 3.3, "forgetting/base_ppl_rel": 0.1}, "history": [],
                         "sizes": SIZES}
    page = rp.render_html(doc, figs={})
    assert "75.0% [30.1, 95.4] n=4" in page and "80.0% [37.6, 96.4] n=5" in page
    assert "+50.0 pts [+0.0, +100.0] n=4" in page
    assert "relative" not in page.lower()
    assert "Over-reach" in page and "unwarranted refusals" in page and "unrequested formatting: list" in page
    assert "16 samples the base model wrote" in page
    doc["forgetting"]["sizes"] = None
    assert "not recorded" in rp.render_html(doc, figs={})


def test_html_is_self_contained_with_every_plot(scored, tmp_path):
    doc = _doc(scored)
    _, html_path = rp.write_report(doc, tmp_path)
    page = html_path.read_text()
    images = re.findall(r'<img alt="([a-z_]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(name for name, _ in images) == sorted(
        ["ifeval_metrics", "ifeval_by_instruction", "rigidity", "loss_curves", "forgetting"])
    assert all(base64.b64decode(data).startswith(PNG_MAGIC) for _, data in images)
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page) and "<script" not in page
    assert doc["samples"][0]["prompt"][:40] in page.replace("&#x27;", "'").replace("&quot;", '"')
    assert "<<" not in page.split("</style>")[1]  # response text is escaped (IFEval titles use <<…>>)


def test_report_without_run_has_no_training_plots(scored):
    base, tuned, _, _ = scored
    doc = rp.build_report(base_ifeval=base, tuned_ifeval=tuned, models={}, settings={})
    assert doc["training"] is None and doc["forgetting"] is None and doc["rigidity"] is None
    assert set(rp.figures(doc)) == {"ifeval_metrics", "ifeval_by_instruction"}


def test_forgetting_sizes_need_a_recorded_baseline(tmp_path):
    assert rp.forgetting_sizes(tmp_path) is None
    (tmp_path / "forgetting").mkdir()
    (tmp_path / "forgetting" / "baseline.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"forgetting/baseline.json:1: not valid JSON"):
        rp.forgetting_sizes(tmp_path)


def test_read_metrics_names_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: .*'step'"):
        rp.read_metrics(path)
    path.write_text('{"step": 1, "loss": 2.0}\n{oops\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        rp.read_metrics(path)


# -- end to end through the CLI -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_dir(stories_dir, tmp_path_factory):
    """A PEFT adapter for stories260K with non-zero B, so base and tuned generations differ."""
    from jaxtune.hf.load import load_pretrained, load_tokenizer
    from jaxtune.lora.apply import apply_lora, lora_sites
    from jaxtune.lora.config import LoraConfig
    from jaxtune.lora.peft import save_peft_adapter

    model = load_pretrained(stories_dir)
    apply_lora(model, LoraConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj")), nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, linear, _ in lora_sites(model):
        linear.lora_B.set_value(jnp.asarray(rng.normal(0, 0.5, linear.lora_B.shape), jnp.float32))
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    save_peft_adapter(model, out, base_model_name_or_path=str(stories_dir), tokenizer=load_tokenizer(stories_dir))
    return out


def test_eval_report_cli_end_to_end(stories_dir, adapter_dir, assets_dir, tmp_path, capsys):
    ifeval_in = tmp_path / "ifeval3.jsonl"
    lines = (assets_dir / "data" / "ifeval_input_data.jsonl").read_text().splitlines()[:3]
    ifeval_in.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in METRICS_ROWS[:6]) + "\n")
    out = tmp_path / "report"
    rc = main(["eval", "report", "--model", str(stories_dir), "--adapter", str(adapter_dir), "--base",
               str(stories_dir), "--ifeval-input", str(ifeval_in), "--max-new-tokens", "8", "--template", "alpaca",
               "--run", str(run), "--no-rigidity", "--no-forgetting", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["ifeval"]["num_prompts"] == 3 and doc["settings"]["template"] == "alpaca"
    assert doc["training"]["eval"] == [[2, 2.3], [3, 2.0]]
    assert doc["forgetting"] == {"current": None, "history": rp.forgetting_history(METRICS_ROWS), "sizes": None}
    assert doc["ifeval"]["metrics"]["prompt_loose"]["tuned"]["n"] == 3
    assert [s["base"]["response"] != s["tuned"]["response"] for s in doc["samples"]].count(True) >= 1
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    responses = [json.loads(x) for x in (out / "ifeval_tuned" / "responses.jsonl").read_text().splitlines()]
    assert [r["response"] for r in responses] == [s["tuned"]["response"] for s in doc["samples"]]
    printed = capsys.readouterr().out
    assert "wrote" in printed and re.search(r"prompt_loose .*n=3 .* pts \[.*\] n=3", printed)


def test_eval_forgetting_and_loss_cli(stories_dir, adapter_dir, assets_dir, tmp_path, capsys):
    from jaxtune.eval.forgetting import ForgettingConfig, ForgettingMonitor, load_base_probes
    from jaxtune.hf.load import load_pretrained, load_tokenizer

    shakespeare = str(assets_dir / "data" / "tinyshakespeare_input.txt")
    small = ForgettingConfig(n_samples=4, sample_tokens=16, seq_len=32, batch_size=4, max_windows=2,
                             probe_tokens=8, general_text=shakespeare, general_chars=2000)
    run = tmp_path / "run"
    recorded = ForgettingMonitor(load_tokenizer(stories_dir), small, run_dir=run).baseline(
        load_pretrained(stories_dir))
    out = tmp_path / "forgetting.json"
    # The run's recorded baseline (and its config) is reused, so no --base is needed.
    assert main(["eval", "forgetting", "--model", str(stories_dir), "--adapter", str(adapter_dir), "--run", str(run),
                 "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["base"] == recorded
    sizes = rp.forgetting_sizes(run)
    n_samples = len((run / "forgetting" / "base_samples.jsonl").read_text().splitlines())
    assert sizes["forgetting/base_ppl"] == {"n": n_samples, "of": "samples the base model wrote (up to 16 tokens each)"}
    assert 0 < n_samples <= small.n_samples
    assert sizes["forgetting/probe_agreement"]["n"] == len(load_base_probes()) > 0
    assert sizes["forgetting/general_ppl"] == {
        "n": None, "of": "windows of 32 tokens (at most 2) over 2000 characters of tinyshakespeare_input.txt"}
    assert doc["tuned"]["forgetting/probe_agreement"] < 1.0  # the adapter changes greedy outputs
    assert "probe_agreement" in capsys.readouterr().out
    assert main(["eval", "forgetting", "--model", str(stories_dir)]) == 2
    assert "--base" in capsys.readouterr().err

    loss_out = tmp_path / "loss.json"
    assert main(["eval", "loss", "--model", str(stories_dir), "--text", shakespeare, "--chars", "3000",
                 "--seq-len", "64", "--out", str(loss_out)]) == 0
    assert json.loads(loss_out.read_text())["perplexity"] > 10

    assert main(["eval", "loss", "--model", str(tmp_path / "nope"), "--text", shakespeare]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["eval", "loss"]) == 2
    assert "--model" in capsys.readouterr().err


def test_recipe_form_finds_the_exported_adapter(stories_dir, adapter_dir, tmp_path):
    import argparse
    import shutil

    from jaxtune.cli.eval import resolve_target

    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run / "export" / "adapter")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{path: {stories_dir}}}\ndata: {{train: x.jsonl}}\noutput: {{run_dir: {run}}}\n")
    args = argparse.Namespace(recipe=str(recipe), set=[], model=None, adapter=None, tokenizer=None,
                              dtype="float32", base=None, run=None)
    t = resolve_target(args)
    assert (t.model, t.adapter, t.base, t.run) == (str(stories_dir), str(run / "export" / "adapter"),
                                                   str(stories_dir), str(run))
    shutil.rmtree(run / "export")
    with pytest.raises(ValueError, match="no export/adapter or export/merged"):
        resolve_target(args)


def test_generate_and_chat_cli(stories_dir, monkeypatch, capsys):
    from jaxtune.data.chat import builtin_template
    from jaxtune.generate import SamplingParams, generate, prompt_ids
    from jaxtune.hf.load import load_pretrained, load_tokenizer

    assert main(["generate", "--model", str(stories_dir), "--prompt", "Once upon a time",
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.startswith(", there was a little girl named Lily")

    turns = iter(["Tell me a story.", "/reset", "Tell me a story."])

    def fake_input(_prompt):
        try:
            return next(turns)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", "--model", str(stories_dir), "--template", "alpaca", "--max-new-tokens", "10"]) == 0
    printed = capsys.readouterr().out.splitlines()
    model, tok = load_pretrained(stories_dir), load_tokenizer(stories_dir)
    want = generate(model, [prompt_ids(tok, "Tell me a story.", builtin_template("alpaca"))],
                    SamplingParams(max_new_tokens=10, stop_ids=(2,))).tokens[0]
    assert printed == [tok.decode(want)] * 2  # /reset makes the second turn identical to the first

    assert main(["chat", "--model", str(stories_dir)]) == 2
    assert "--template" in capsys.readouterr().err
