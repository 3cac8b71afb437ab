"""Pipeline recipes: the bundled ones load as they ship (the 8B one without its model on disk: loading never
reads the model), and a recipe that cannot run fails at load with one line naming file:line (or the --set)
and the field, before any stage runs; the CLI exits 2 on a bad --from without creating the run dir."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtune.cli.main import main
from jaxtune.pipeline.config import load_pipeline

REPO = Path(__file__).resolve().parents[1]
TINY, BIG = REPO / "configs" / "pipeline-tiny.yaml", REPO / "configs" / "pipeline-8b.yaml"

# A small valid recipe; each case below swaps one of its lines. Line numbers matter: errors name them.
RECIPE = """\
model: {path: /nonexistent/model}
domain: {seeds: stories, eval: stories}
generate: {method: compose, tasks: 8}
distill: {method: "off"}
allocation: {weight: "max(fail_rate, 0.1)"}
tune:
  optim: {lr: 1.0e-3, warmup_steps: 2}
  train: {steps: 10}
output: {run_dir: RUN}
"""


def _write(tmp_path, text=RECIPE) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text.replace("RUN", str(tmp_path / "run")))
    return path


def test_the_tiny_recipe_loads():
    cfg = load_pipeline(TINY)
    assert cfg.generate.method == "compose" and cfg.domain.seeds == "stories" and cfg.teacher.kind == "local"
    assert cfg.rounds >= 1


@pytest.mark.parametrize("switch", [[], ["evaluate.forgetting=false"], ["tune.forgetting=null"]])
def test_a_later_evaluate_reads_round_0_forgetting_only_when_measured(tmp_path, switch):
    """With forgetting switched off round 0 writes no forgetting baseline: round 1 must not wait for one."""
    from jaxtune.pipeline.context import Context
    from jaxtune.pipeline.stages import stage_inputs

    ctx = Context(load_pipeline(_write(tmp_path), switch), tmp_path / "run")
    run = tmp_path / "run"
    inputs = {p.relative_to(run).as_posix() for p in stage_inputs(ctx, "evaluate", 1) if p.is_relative_to(run)}
    assert "round-1/tune/merged" in inputs
    assert ("round-0/evaluate/forgetting" in inputs) == (not switch)


def test_the_8b_recipe_loads_without_its_model(monkeypatch):
    monkeypatch.chdir(REPO)  # its data paths are relative to the repo root, as the tiny recipe's model path
    cfg = load_pipeline(BIG)
    # Loading never opens the model: the placeholder path need not exist.
    assert cfg.model.path == "/models/Meta-Llama-3-8B-Instruct"
    assert (cfg.model.dtype, cfg.model.attention_impl, cfg.model.scan_layers, cfg.model.remat) == \
        ("bfloat16", "auto", True, "full")
    assert cfg.domain.template is None and cfg.domain.seeds.endswith("self_instruct_seed_tasks.jsonl")
    assert cfg.domain.eval.endswith("ifeval_input_data.jsonl")
    t = cfg.teacher
    assert (t.kind, t.base_url, t.api_key_env) == ("endpoint", "http://localhost:8000/v1", "OPENAI_API_KEY")
    assert t.model and t.stop == ()  # stop strings of an endpoint would also reach the local evaluator
    g = cfg.generate
    assert (g.method, g.max_constraints) == ("self-instruct", 2)
    assert cfg.filter.max_ifd is not None and cfg.filter.cap_per_type and cfg.filter.cap_by == "verb"
    # an answer as long as the teacher may write is scored, rewritten and trained on whole, not dropped
    longest = g.max_new_tokens
    assert cfg.filter.score_seq_len > longest and cfg.tune.seq_len > longest
    assert cfg.distill.sdft.max_new_tokens >= longest
    assert cfg.distill.method == "rewrite" and cfg.rounds == 2
    assert cfg.allocation.by == ("instruction",)  # task types come from the teacher's own verbs
    recipe = cfg.train_recipe("data.jsonl", "run")  # the training recipe every round builds
    assert recipe.lora.rank == 16 and recipe.param_dtype == "bfloat16" and recipe.data.chat_template is None
    assert recipe.data.seq_len % recipe.train.loss_chunk == 0


def test_the_8b_recipe_points_at_valid_seeds_and_eval_prompts(monkeypatch, assets_dir):
    from jaxtune.curate.self_instruct import load_seed_tasks
    from jaxtune.pipeline.context import load_tasks, split_eval

    monkeypatch.chdir(REPO)
    cfg = load_pipeline(BIG)
    if not Path(cfg.domain.seeds).is_file():
        pytest.skip(f"{cfg.domain.seeds} is not staged beside the repo")
    assert len(load_seed_tasks(cfg.domain.seeds)) > 100
    split = split_eval(load_tasks(Path(cfg.domain.eval)), cfg.domain.report_fraction)
    assert len(split["steering"]) > 100 and len(split["report"]) > 100


@pytest.mark.parametrize("old, new, line, field", [
    ('weight: "max(fail_rate, 0.1)"', 'weight: "fail_rate +"', 5, "allocation.weight"),
    ('weight: "max(fail_rate, 0.1)"', 'weight: "__import__(\'os\')"', 5, "allocation.weight"),
    ('weight: "max(fail_rate, 0.1)"', 'weight: "fail_rate", by: [verbs]', 5, "allocation.by"),
    ('method: "off"', "method: bogus", 4, "distill.method"),
    ("warmup_steps: 2", "warmup_steps: 20", 7, "tune.optim.warmup_steps"),
    ("seeds: stories", "seeds: my_seeds.jsonl", 3, "generate.method"),
    ("method: compose", "method: evolve", 3, "generate.method"),
])
def test_a_bad_recipe_is_one_line_naming_file_line_and_field(tmp_path, old, new, line, field):
    assert old in RECIPE
    path = _write(tmp_path, RECIPE.replace(old, new))
    with pytest.raises(ValueError) as info:
        load_pipeline(path)
    msg = str(info.value)
    assert "\n" not in msg and re.match(rf"{re.escape(str(path))}:{line}: {re.escape(field)}\b", msg), msg
    load_pipeline(_write(tmp_path))  # the unedited recipe loads


def test_a_bad_set_is_named_by_the_set(tmp_path):
    path = _write(tmp_path)
    with pytest.raises(ValueError, match=r"^--set distill\.method=bogus: distill\.method: 'bogus' is not"):
        load_pipeline(path, ["distill.method=bogus"])
    # a --set that makes another key wrong: the error names that key's line
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:7: tune\.optim\.warmup_steps: 2 exceeds "
                                         r"tune\.train\.steps=1$"):
        load_pipeline(path, ["tune.train.steps=1"])
    assert load_pipeline(path, ["tune.train.steps=2"]).tune.train.steps == 2  # warmup == steps is fine


def test_cli_exits_2_on_an_unknown_stage_without_touching_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxtune.cli.main", "pipeline", str(BIG), "--from", "bogus",
           "--set", f"output.run_dir={run_dir}"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip()
    assert "\n" not in err and err.startswith("error: --from 'bogus': unknown stage 'bogus'; stages: generate,")
    assert "Traceback" not in done.stderr and not run_dir.exists()


@pytest.mark.parametrize("spec, says", [("3/filter", "round 3 has no filter stage"), ("0/tune", "round 0 has no"),
                                        ("x/tune", "expected STAGE or K/STAGE")])
def test_cli_names_a_from_outside_the_plan(tmp_path, capsys, spec, says):
    run_dir = tmp_path / "run"
    assert main(["pipeline", str(_write(tmp_path)), "--rounds", "2", "--from", spec,
                 "--set", f"output.run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: --from {spec!r}: ") and says in err
    assert not run_dir.exists()


# What load does not catch yet: each of these loads, then fails only when its stage runs (for the 8B recipe,
# after round 0 has evaluated the base model). Fixes are in the session report; drop the marks with them.
def test_unknown_self_instruct_keys_fail_at_load(tmp_path):
    with pytest.raises(ValueError, match=r"generate\.self_instruct"):
        load_pipeline(_write(tmp_path), ["generate.method=self-instruct", "domain.seeds=seeds.jsonl",
                                         "generate.self_instruct={prompts_per_rund: 4}"])


def test_self_instruct_needs_a_seed_file_at_load(tmp_path):
    with pytest.raises(ValueError, match=r"domain\.seeds|generate\.method"):
        load_pipeline(_write(tmp_path), ["generate.method=self-instruct"])


def test_a_weight_formula_that_fails_on_some_evidence_fails_at_load(tmp_path):
    # log(0) for a constraint round 0 never failed: found only after round 0 has evaluated the base.
    with pytest.raises(ValueError, match=r"^--set allocation\.weight=log\(fail_rate\): allocation\.weight"):
        load_pipeline(_write(tmp_path), ["allocation.weight=log(fail_rate)"])


def test_a_training_section_error_names_its_line_under_tune(tmp_path):
    path = _write(tmp_path, RECIPE.replace("lr: 1.0e-3", "lr: -1.0"))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:7: tune\.optim\.lr"):
        load_pipeline(path)
