"""Data cost arithmetic on fixed token counts and times, and the seen/unseen generalization split."""

import pytest

from jaxtune import stats
from jaxtune.pipeline.evaluate import generalization
from jaxtune.pipeline.report import data_cost

PRICES = {"currency": "USD", "price_per_million_input": 2.0, "price_per_million_output": 8.0, "device_hour": 3.6,
          "human_example": 1.5}


def test_endpoint_tokens_and_local_time_are_priced():
    usage = [{"stage": "generate", "teacher": "endpoint", "tokens_in": 500_000, "tokens_out": 250_000, "seconds": 40.0},
             {"stage": "distill", "teacher": "local", "tokens_in": 10_000, "tokens_out": 5_000, "seconds": 100.0}]
    d = data_cost(usage, 100, PRICES)
    # endpoint: 0.5 M in x $2 + 0.25 M out x $8 = $3; local: 100 s at $3.6/h = $0.10
    assert [s["cost"] for s in d["stages"]] == pytest.approx([3.0, 0.1])
    assert d["total"] == pytest.approx(3.1) and d["per_kept_example"] == pytest.approx(0.031)
    assert d["human_equivalent"] == pytest.approx(150.0) and d["saving"] == pytest.approx(1 - 3.1 / 150)
    assert d["device_seconds"] == 100.0 and d["tokens"] == {"in": 510_000, "out": 255_000}


def test_unset_prices_give_no_figure_rather_than_zero():
    usage = [{"stage": "generate", "teacher": "endpoint", "tokens_in": 1000, "tokens_out": 1000, "seconds": 1.0}]
    d = data_cost(usage, 10, {"device_hour": 1.0})
    assert d["total"] is None and d["per_kept_example"] is None and d["saving"] is None
    assert d["human_equivalent"] is None
    local = data_cost([{**usage[0], "teacher": "local", "seconds": 7200.0}], 0, {"device_hour": 1.0})
    assert local["total"] == pytest.approx(2.0) and local["per_kept_example"] is None  # nothing kept


def test_generalization_split_and_gap():
    rows = ([{"task_type": "animal", "followed": [True]}] * 6 + [{"task_type": "animal", "followed": [False]}] * 2
            + [{"task_type": "lesson", "followed": [True, False]}] * 3 + [{"task_type": "lesson", "followed": [True]}])
    g = generalization(rows, ("lesson",), n_boot=300)
    assert g["seen"]["k"] == 6 and g["seen"]["n"] == 8
    assert g["unseen"]["k"] == 1 and g["unseen"]["n"] == 4
    assert g["gap"]["value"] == pytest.approx(0.75 - 0.25) and g["gap"]["method"] == "bootstrap difference"
    assert generalization(rows, (), n_boot=10) is None
    assert stats.Estimate(**g["gap"]).lo <= 0.5 <= stats.Estimate(**g["gap"]).hi
