"""Forgetting monitor: base measures as zero change, a model fine-tuned off-domain shows forgetting, the
evaluation sets are seeded and saved with the run, a resumed run reloads its baseline; each check's log
line, its warn_at / stop_at verdict and the thresholds' validation."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from jaxtune import load_pretrained, load_tokenizer
from jaxtune.eval.forgetting import (DEFAULT_BASE_PROBES, ForgettingConfig, ForgettingMonitor, assess,
                                     load_base_probes, ppl_rise, token_agreement)
from jaxtune.eval.loss import sequence_rows
from jaxtune.train.loss import sequence_nll

SMALL = ForgettingConfig(n_samples=4, sample_tokens=32, seq_len=64, batch_size=4, max_windows=4, probe_tokens=12,
                         general_chars=4000)


@pytest.fixture(scope="module")
def stories(stories_dir):
    return load_pretrained(stories_dir), load_tokenizer(stories_dir)


@pytest.fixture(scope="module")
def general(assets_dir):
    return str(assets_dir / "data" / "tinyshakespeare_input.txt")


@pytest.fixture(scope="module")
def drifted(stories, stories_dir):
    """stories260K after 40 Adam steps on one off-domain sentence: a model that has forgotten."""
    _, tok = stories
    model = load_pretrained(stories_dir)
    ids = tok.encode("The stock market fell sharply today as investors sold shares of technology companies.")
    rows = {k: jnp.asarray(v) for k, v in sequence_rows([ids], len(ids) - 1).items()}
    graphdef, params = nnx.split(model)
    opt = optax.adam(2e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        def loss(p):
            nll, _, n = sequence_nll(nnx.merge(graphdef, p), rows["input_ids"], rows["targets"], rows["loss_mask"])
            return nll / n

        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(40):
        params, state = step(params, state)
    return nnx.merge(graphdef, params)


def test_packaged_probes_are_valid():
    probes = load_base_probes()
    assert DEFAULT_BASE_PROBES.name == "base_tasks_v1.jsonl"
    assert len(probes) >= 12 and len({p.id for p in probes}) == len(probes)
    assert {"story", "knowledge"} <= {p.kind for p in probes}


def test_bad_probe_file_names_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: field 'prompt'"):
        load_base_probes(path)
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: duplicate probe id 'a'"):
        load_base_probes(path)


def test_token_agreement():
    assert token_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert token_agreement([1, 2, 3, 4], [1, 9, 3]) == 0.5
    assert token_agreement([1, 2], [1, 2, 3, 4]) == 1.0
    assert token_agreement([], []) == 1.0 and token_agreement([], [5]) == 0.0


def test_base_is_zero_change_and_drift_is_detected(stories, drifted, general, tmp_path):
    model, tok = stories
    monitor = ForgettingMonitor(tok, dataclasses.replace(SMALL, general_text=general), run_dir=tmp_path)
    base = monitor.baseline(model)
    assert base["forgetting/probe_agreement"] == 1.0
    assert all(base[k] == 0.0 for k in base if k.endswith("_rel"))
    assert 1.0 < base["forgetting/base_ppl"] < base["forgetting/general_ppl"]

    again = monitor.measure(model, step=0)
    assert again["forgetting/probe_agreement"] == 1.0
    assert abs(again["forgetting/base_ppl_rel"]) < 1e-5 and abs(again["forgetting/general_ppl_rel"]) < 1e-5

    after = monitor.measure(drifted, step=40)
    assert after["forgetting/base_ppl_rel"] > 0.1
    assert after["forgetting/probe_agreement"] < 0.9
    assert after["forgetting/probe_agreement_rel"] == pytest.approx(after["forgetting/probe_agreement"] - 1.0)
    assert [h["step"] for h in monitor.history] == [0, 40]

    saved = tmp_path / "forgetting"
    samples = [json.loads(line) for line in (saved / "base_samples.jsonl").read_text().splitlines()]
    assert len(samples) == SMALL.n_samples and all(s["ids"][0] == tok.bos_token_id for s in samples)
    outputs = [json.loads(line) for line in (saved / "base_probe_outputs.jsonl").read_text().splitlines()]
    assert [o["id"] for o in outputs] == [p.id for p in load_base_probes()]


def test_resume_reloads_the_baseline_instead_of_remeasuring(stories, drifted, general, tmp_path):
    model, tok = stories
    cfg = dataclasses.replace(SMALL, general_text=general)
    first = ForgettingMonitor(tok, cfg, run_dir=tmp_path).baseline(model)
    resumed = ForgettingMonitor(tok, cfg, run_dir=tmp_path)
    assert resumed.baseline(drifted) == first  # the drifted model is not measured as the base
    assert resumed.resumed
    assert resumed.measure(model)["forgetting/probe_agreement"] == 1.0

    with pytest.raises(ValueError, match="different forgetting config"):
        ForgettingMonitor(tok, dataclasses.replace(cfg, n_samples=5), run_dir=tmp_path).baseline(model)
    # Thresholds act on the figures, not the baseline: a resume may tighten them.
    tighter = ForgettingMonitor(tok, dataclasses.replace(cfg, warn_at=0.05, stop_at=0.2), run_dir=tmp_path)
    assert tighter.baseline(drifted) == first
    assert "stop_at" not in json.loads((tmp_path / "forgetting" / "baseline.json").read_text())["config"]


def test_samples_are_seeded(stories, general):
    model, tok = stories
    cfg = dataclasses.replace(SMALL, general_text=general, n_samples=2, sample_tokens=16)
    a, b = ForgettingMonitor(tok, cfg), ForgettingMonitor(tok, cfg)
    a.baseline(model)
    b.baseline(model)
    assert a.samples == b.samples and a.samples[0] != a.samples[1]
    c = ForgettingMonitor(tok, dataclasses.replace(cfg, seed=1))
    c.baseline(model)
    assert c.samples != a.samples


def test_measure_before_baseline_is_an_error(stories, general):
    _, tok = stories
    with pytest.raises(RuntimeError, match="before baseline"):
        ForgettingMonitor(tok, dataclasses.replace(SMALL, general_text=general)).measure(stories[0])


def _result(base_rel: float, general_rel: float | None = 0.01, agreement: float = 0.92) -> dict:
    out = {"forgetting/base_ppl": 4.0 * (1 + base_rel), "forgetting/base_ppl_rel": base_rel,
           "forgetting/probe_agreement": agreement, "forgetting/probe_agreement_rel": agreement - 1.0}
    if general_rel is not None:
        out.update({"forgetting/general_ppl": 9.0 * (1 + general_rel), "forgetting/general_ppl_rel": general_rel})
    return out


def test_assess_is_one_line_with_warning_and_stop():
    cfg = ForgettingConfig(warn_at=0.1, stop_at=0.5)
    line, stop = assess(_result(0.032), cfg, 100)
    assert line == "forgetting @ step 100: base ppl 4.13 (+3.2%)  general ppl 9.09 (+1.0%)  probe agreement 92%"
    assert stop is None

    # The larger of the two rises counts: here the general text's.
    line, stop = assess(_result(-0.2, general_rel=0.12), cfg, 200)
    assert line == ("forgetting @ step 200: base ppl 3.20 (-20.0%)  general ppl 10.08 (+12.0%)  probe agreement 92%"
                    " — WARNING: general perplexity rose 12.0% ≥ warn_at 10%")
    assert stop is None

    line, stop = assess(_result(0.5, general_rel=None), cfg, 300)
    assert line == ("forgetting @ step 300: base ppl 6.00 (+50.0%)  probe agreement 92% — STOP: base perplexity "
                    "rose 50.0% ≥ stop_at 50%")
    assert stop == "base perplexity rose 50.0% ≥ forgetting.stop_at 50% at the forgetting check of step 300"

    # Without thresholds nothing is flagged, however large the rise.
    assert assess(_result(5.0), ForgettingConfig(), 1) == (
        "forgetting @ step 1: base ppl 24.00 (+500.0%)  general ppl 9.09 (+1.0%)  probe agreement 92%", None)
    assert ppl_rise(_result(0.2, general_rel=0.3)) == ("general_ppl", 0.3)
    assert ppl_rise({"forgetting/probe_agreement": 1.0}) is None


@pytest.mark.parametrize("kw, message", [
    ({"warn_at": 0.0}, r"forgetting\.warn_at: must be a number > 0"),
    ({"stop_at": -0.5}, r"forgetting\.stop_at: must be a number > 0"),
    ({"stop_at": True}, r"forgetting\.stop_at: must be a number > 0"),
    ({"warn_at": 0.6, "stop_at": 0.5}, r"forgetting\.warn_at: 0\.6 is above forgetting\.stop_at 0\.5"),
])
def test_thresholds_are_validated(kw, message):
    with pytest.raises(ValueError, match=message):
        ForgettingConfig(**kw)
    ForgettingConfig(warn_at=0.5, stop_at=0.5)  # equal is allowed: the stop wins


def test_recipe_threshold_error_names_file_and_line(tmp_path):
    from jaxtune.recipe import ConfigError, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("model:\n  path: m\ndata:\n  train: d.json\noutput:\n  run_dir: r\nforgetting:\n"
                    "  warn_at: 0.1\n  stop_at: -1\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:9: forgetting\.stop_at: must be a number > 0"):
        load_recipe(path)
    assert load_recipe(path, ["forgetting.stop_at=0.5"]).forgetting.stop_at == 0.5
