"""Forgetting monitor: base measures as zero change, a model fine-tuned off-domain shows forgetting, the
evaluation sets are seeded and saved with the run, and a resumed run reloads its baseline."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from jaxtune import load_pretrained, load_tokenizer
from jaxtune.eval.forgetting import (DEFAULT_BASE_PROBES, ForgettingConfig, ForgettingMonitor, load_base_probes,
                                     token_agreement)
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
