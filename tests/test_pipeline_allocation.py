"""The allocation rule: round K's steering failures decide what round K+1 generates, by a recipe formula."""

import pytest

from jaxtune.pipeline import allocation as A


def _row(ids, followed, task_type="animal"):
    return {"instruction_id_list": ids, "followed": followed, "task_type": task_type}


# Fixed evaluation results: 'a' fails 3 of 4, 'b' 1 of 4, 'c' never fails (2 of 2 followed), 'd' is absent.
ROWS = [_row(["a", "b"], [False, True]), _row(["a"], [False]), _row(["a", "b"], [False, False], "family"),
        _row(["a", "b", "c"], [True, True, True], "family"), _row(["b", "c"], [True, True])]


def test_failures_by_instruction_and_task_type():
    assert A.failures_by(ROWS, "instruction") == {"a": (3, 4), "b": (1, 4), "c": (0, 2)}
    # A prompt fails for its task type when any of its instructions failed.
    assert A.failures_by(ROWS, "task_type") == {"animal": (2, 3), "family": (1, 2)}
    with pytest.raises(ValueError, match="allocation.by"):
        A.failures_by(ROWS, "verb")


def test_proportional_to_failure_with_a_floor():
    out = A.allocate(ROWS, ["a", "b", "c", "d"], 100, "max(fail_rate, 0.1)", "instruction")
    # weights 0.75, 0.25, 0.1 (floor), 1.0 (no evidence: counted as failing) -> sum 2.1
    assert out["weights"] == {"a": 0.75, "b": 0.25, "c": 0.1, "d": 1.0}
    assert out["counts"] == {"a": 36, "b": 12, "c": 5, "d": 47}
    assert sum(out["counts"].values()) == 100
    assert out["evidence"]["d"] == {"failed": 0, "n": 0}


def test_largest_remainder_is_exact_and_ties_go_to_the_earlier_label():
    assert A.apportion({"x": 1, "y": 1, "z": 1}, 10) == {"x": 4, "y": 3, "z": 3}
    assert A.apportion({"x": 0, "y": 0}, 5) == {"x": 3, "y": 2}  # nothing failed anywhere: equal shares
    assert A.apportion({"x": 2, "y": 0}, 7) == {"x": 7, "y": 0}
    with pytest.raises(ValueError):
        A.apportion({}, 3)


def test_other_formulas():
    ev = {"a": (3, 4), "c": (0, 2)}
    assert A.weights(ev, "fail_rate") == {"a": 0.75, "c": 0.0}
    assert A.weights(ev, "1") == {"a": 1.0, "c": 1.0}
    assert A.weights(ev, "sqrt(failures + 1) * n") == pytest.approx({"a": 8.0, "c": 2.0})
    assert A.weights(ev, "max(pass_rate, 0.5) - 0.25") == {"a": 0.25, "c": 0.75}


@pytest.mark.parametrize("bad", ["__import__('os')", "fail_rate.real", "open('x')", "lambda: 1", "x + 1",
                                 "fail_rate if n else 1", "[1][0]", "max(fail_rate, key=1)"])
def test_formula_refuses_anything_but_arithmetic(bad):
    with pytest.raises(ValueError, match="allocation.weight"):
        A.compile_formula(bad)


def test_formula_errors_name_the_label():
    with pytest.raises(ValueError, match="'c'"):
        A.weights({"a": (3, 4), "c": (0, 2)}, "1 / fail_rate")
    with pytest.raises(ValueError, match="must be >= 0"):
        A.weights({"a": (3, 4)}, "-fail_rate")
    with pytest.raises(ValueError, match="not an expression"):
        A.compile_formula("max(")
