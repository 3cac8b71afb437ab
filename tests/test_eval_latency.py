"""Inference cost, base vs tuned: with a scripted clock the reported TTFT, per-token time, their paired
differences and ratios are exactly the scripted costs; warm-up runs read the clock but are not counted; both
models decode the same batches; lengths equal a separate greedy `generate`; the real clock gives positive
finite times; `jaxtune eval cost` runs end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_curate_score import TEMPLATE, word_tokenizer

from jaxtune import stats
from jaxtune.eval.latency import TIMES, measure_latency
from jaxtune.generate import SamplingParams, generate, prompt_ids

PROMPTS = ["w1 w2 w3", "w7", "w1 w2 w3 w4 w5 w6 w7 w8", "w10 w11", "w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14",
           "w20 w21 w22 w23"]
# Token lengths 9, 7, 14, 8, 18, 10: shortest first in batches of 4, the second topped up to 4 rows.
BATCHES = [[1, 3, 0, 5], [2, 4]]
STOPS = (94, 31)   # tokens the two random models emit at varied steps (lengths 0 to max, some rows never stop)
MAX_NEW, BATCH, BUCKET, REPEATS = 12, 4, 16, 3
PREFILL = {"base": 0.5, "tuned": 0.75}          # seconds; binary fractions keep every sum exact
STEP = {"base": 0.0625, "tuned": 0.125}
JITTER_PREFILL, JITTER_STEP = (0.0, 4.0, -0.5), (0.0, 2.0, -0.25)   # the median repeat has none
WARM, GAP = 1024.0, 3.0


@pytest.fixture(scope="module")
def setup(hf_zoo):
    from jaxtune import load_pretrained

    models = {"base": load_pretrained(hf_zoo("llama_gqa")[0]), "tuned": load_pretrained(hf_zoo("llama_mha")[0])}
    tok = word_tokenizer(bos=True)
    ids = [prompt_ids(tok, p, TEMPLATE) for p in PROMPTS]
    gens = {name: generate(m, ids, SamplingParams(max_new_tokens=MAX_NEW, stop_ids=STOPS))
            for name, m in models.items()}
    return models, tok, gens


def decode_steps(gen, batch: list[int]) -> int:
    """Steps after the prefill until every row of the batch stopped: its longest row's tokens (stop included)
    less the first."""
    return max(len(gen.tokens[i]) + (gen.stop_tokens[i] is not None) for i in batch) - 1


class ScriptedClock:
    """Returns the running sum of a scripted list of increments; reading past its end fails the test."""

    def __init__(self, increments: list[float]):
        self.times = list(np.cumsum(increments))
        self.reads = 0

    def __call__(self) -> float:
        assert self.reads < len(self.times), "the clock was read more often than the run protocol says"
        self.reads += 1
        return float(self.times[self.reads - 1])


def script(gens) -> list[float]:
    """Clock increments in the documented order: warm-ups (per model, per batch shape: a gap, then WARM per
    read), then per batch and repeat, the models in order (reversed when batch + repeat is odd): a gap, the
    prefill, one step per decode step."""
    steps = {name: [decode_steps(g, b) for b in BATCHES] for name, g in gens.items()}
    out = []
    for name in gens:
        for b in range(len(BATCHES)):   # the two batches have widths 16 and 32: each is its shape's first
            out += [GAP, WARM] + [WARM] * max(steps[name][b], 1)
    for b in range(len(BATCHES)):
        for r in range(REPEATS):
            for name in list(gens)[::1 if (b + r) % 2 == 0 else -1]:
                out += [GAP, PREFILL[name] + 0.25 * b + JITTER_PREFILL[r]]
                out += [STEP[name] + 0.125 * b + JITTER_STEP[r]] * steps[name][b]
    return out


@pytest.fixture(scope="module")
def scripted(setup):
    models, tok, gens = setup
    clock = ScriptedClock(script(gens))
    res = measure_latency(models, tok, PROMPTS, template=TEMPLATE, max_new_tokens=MAX_NEW, batch_size=BATCH,
                          stop_ids=STOPS, repeats=REPEATS, bucket=BUCKET, n_boot=200, clock=clock)
    return res, clock


def test_scripted_clock_gives_exact_times(setup, scripted):
    _, _, gens = setup
    res, clock = scripted
    assert clock.reads == len(clock.times)          # warm-ups read the clock too: every scripted read was used
    for name in ("base", "tuned"):
        rows = res["models"][name]["batches"]
        ttft = [1000 * (PREFILL[name] + 0.25 * b) for b in range(len(BATCHES))]
        per_token = [1000 * (STEP[name] + 0.125 * b) for b in range(len(BATCHES))]
        steps = [decode_steps(gens[name], b) for b in BATCHES]
        assert all(s > 0 for s in steps)
        assert [r["ttft_ms"] for r in rows] == ttft       # warm-up (WARM s per read) and gaps are not counted
        assert [r["per_token_ms"] for r in rows] == per_token
        assert [r["total_ms"] for r in rows] == [t + p * s for t, p, s in zip(ttft, per_token, steps)]
        assert [r["decode_steps"] for r in rows] == [[s] * REPEATS for s in steps]
        figures = res["models"][name]
        assert figures["ttft_ms"] == stats.mean(ttft, n_boot=200).to_dict()
        assert figures["per_token_ms"] == stats.mean(per_token, n_boot=200).to_dict()
        assert figures["per_prompt_ms"] == sum(r["total_ms"] for r in rows) / len(PROMPTS)
    cmp = res["comparison"]["tuned"]
    assert cmp["vs"] == "base"
    assert cmp["ttft_ms"] == {"value": 250.0, "lo": 250.0, "hi": 250.0, "n": 2, "k": None,
                              "method": "paired bootstrap"}
    assert (cmp["per_token_ms"]["value"], cmp["per_token_ms"]["lo"], cmp["per_token_ms"]["hi"]) == (62.5,) * 3
    assert cmp["ratio"]["ttft_ms"] == pytest.approx((750 + 1000) / (500 + 750), rel=1e-12)
    assert cmp["ratio"]["per_token_ms"] == pytest.approx((125 + 250) / (62.5 + 187.5), rel=1e-12)
    base_total = [r["total_ms"] for r in res["models"]["base"]["batches"]]
    tuned_total = [r["total_ms"] for r in res["models"]["tuned"]["batches"]]
    assert cmp["total_ms"] == stats.paired_difference(base_total, tuned_total, n_boot=200).to_dict()
    assert cmp["ratio"]["total_ms"] == pytest.approx(sum(tuned_total) / sum(base_total), rel=1e-12)


def test_same_batches_and_lengths_match_generate(setup, scripted):
    _, _, gens = setup
    res, _ = scripted
    s = res["setup"]
    assert s["batch_prompts"] == BATCHES and s["batch_widths"] == [16, 32] and s["batch_size"] == BATCH
    assert (s["batches"], s["repeats"], s["max_new_tokens"], s["stop_ids"]) == (2, REPEATS, MAX_NEW, list(STOPS))
    assert s["device"] and s["reference"] == "base" and "untimed" in s["warmup"]
    for name in ("base", "tuned"):
        figures = res["models"][name]
        assert [r["prompts"] for r in figures["batches"]] == BATCHES
        lengths = [len(t) for t in gens[name].tokens]
        assert figures["lengths"] == lengths and figures["deterministic"]
        assert figures["length"] == stats.mean(lengths, n_boot=200).to_dict()
    assert res["models"]["base"]["lengths"] != res["models"]["tuned"]["lengths"]
    assert 0 in res["models"]["tuned"]["lengths"] and MAX_NEW in res["models"]["base"]["lengths"]
    base, tuned = res["models"]["base"]["lengths"], res["models"]["tuned"]["lengths"]
    assert res["comparison"]["tuned"]["length"] == stats.paired_difference(base, tuned, n_boot=200).to_dict()
    assert res["comparison"]["tuned"]["ratio"]["length"] == pytest.approx(np.mean(tuned) / np.mean(base))
    json.dumps(res, allow_nan=False)


def test_real_clock_gives_positive_finite_times(setup):
    models, tok, _ = setup
    res = measure_latency(models, tok, PROMPTS, template=TEMPLATE, max_new_tokens=MAX_NEW, batch_size=BATCH,
                          stop_ids=(), repeats=1, bucket=BUCKET, n_boot=50)
    for name in models:
        for key in TIMES:
            e = res["models"][name][key]
            assert e["n"] == 2 and all(math.isfinite(e[k]) and e[k] > 0 for k in ("value", "lo", "hi"))
        assert res["models"][name]["lengths"] == [MAX_NEW] * len(PROMPTS)   # no stop ids: all run to the limit


@pytest.mark.parametrize("kw, message", [
    ({"models": {}}, "no models"), ({"prompts": []}, "no prompts"), ({"repeats": 0}, "repeats=0"),
    ({"batch_size": 0}, "batch_size=0"), ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"prompts": ["w1", ""], "template": None}, "prompt 1 tokenizes to no tokens"),
])
def test_bad_arguments_are_refused(setup, kw, message):
    models, _, _ = setup
    tok = word_tokenizer(bos=False)
    args = {"models": models, "prompts": ["w1"], "template": TEMPLATE, "max_new_tokens": 4, "repeats": 1,
            "batch_size": 1, **kw}
    with pytest.raises(ValueError, match=message):
        measure_latency(args.pop("models"), tok, args.pop("prompts"), **args)


def test_cli_cost(hf_zoo, tmp_path, capsys):
    import shutil

    from jaxtune.cli.main import main

    tok = word_tokenizer(bos=True)
    dirs = {}
    for side, name in (("base", "llama_gqa"), ("tuned", "llama_mha")):
        dirs[side] = tmp_path / side
        shutil.copytree(hf_zoo(name)[0], dirs[side])
        tok.save_pretrained(dirs[side])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    argv = ["eval", "cost", "--model", str(dirs["tuned"]), "--base", str(dirs["base"]), "--prompts", str(prompts),
            "--limit", "4", "--repeats", "1", "--max-new-tokens", str(MAX_NEW), "--batch-size", str(BATCH),
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for label in ("response tokens", "TTFT ms/batch", "decode ms/token", "total ms/batch", "tuned/base"):
        assert label in out
    doc = json.loads((tmp_path / "out" / "cost.json").read_text())
    assert doc["setup"]["prompts"] == 4 and doc["setup"]["batches"] == 1 and doc["setup"]["repeats"] == 1
    assert doc["base"]["model"] == str(dirs["base"]) and set(doc["models"]) == {"base", "tuned"}
    assert main([*argv[:6], "--prompts", str(prompts), "--data", str(prompts)]) == 2
    assert "not both" in capsys.readouterr().err
