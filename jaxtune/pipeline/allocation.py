"""What round K+1 generates more of: a weight per label (constraint id or task type) from round K's
failures on the steering split, by a formula written in the recipe, then whole task counts.

The formula is an arithmetic expression over `fail_rate` (failed / n), `pass_rate`, `failures` and `n`, with
`max`, `min`, `sqrt`, `log`, `exp`; e.g. `max(fail_rate, 0.1)` (proportional to failure, a floor per label).
Counts follow the weights by largest remainders (Hamilton), ties to the earlier label, so they sum exactly
to the total. A label the steering split has no prompt for counts as failing (`fail_rate` 1, `n` 0): nothing
says the model can do it.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping, Sequence

VARIABLES = ("fail_rate", "pass_rate", "failures", "n")
FUNCTIONS: dict[str, Callable] = {"max": max, "min": min, "sqrt": math.sqrt, "log": math.log, "exp": math.exp}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}


def compile_formula(text: str) -> Callable[[Mapping[str, float]], float]:
    """A safe evaluator for the weight formula; ValueError naming what is not allowed."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"allocation.weight {text!r} is not an expression: {e.msg}") from None

    def check(node):
        if isinstance(node, ast.Expression):
            return check(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return
        if isinstance(node, ast.Name) and node.id in VARIABLES:
            return
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return check(node.left), check(node.right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return check(node.operand)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
                and not node.keywords and node.args):
            return [check(a) for a in node.args]
        raise ValueError(f"allocation.weight {text!r}: {ast.unparse(node)!r} is not allowed (use numbers, "
                         f"{', '.join(VARIABLES)}, + - * / **, and {', '.join(FUNCTIONS)})")

    check(tree)

    def evaluate(node, env):
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return float(env[node.id])
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](evaluate(node.left, env), evaluate(node.right, env))
        if isinstance(node, ast.UnaryOp):
            return -evaluate(node.operand, env)
        return FUNCTIONS[node.func.id](*(evaluate(a, env) for a in node.args))

    return lambda env: evaluate(tree.body, env)


def weights(failures: Mapping[str, tuple[int, int]], formula: str) -> dict[str, float]:
    """`{label: (failed, n)}` → `{label: weight}`; a weight must come out finite and >= 0."""
    fn = compile_formula(formula)
    out = {}
    for label, (failed, n) in failures.items():
        fail_rate = failed / n if n else 1.0
        env = {"fail_rate": fail_rate, "pass_rate": 1.0 - fail_rate, "failures": failed, "n": n}
        try:
            w = fn(env)
        except (ZeroDivisionError, ValueError, OverflowError) as e:
            raise ValueError(f"allocation.weight {formula!r} fails for {label!r} ({env}): {e}") from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"allocation.weight {formula!r} gives {w} for {label!r} ({env}); weights must be >= 0")
        out[label] = w
    return out


def apportion(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """Whole counts summing to `total`, proportional to `weights` (largest remainder); all-zero → equal."""
    labels = list(weights)
    if not labels:
        raise ValueError("nothing to allocate tasks to")
    w = [weights[x] for x in labels]
    if sum(w) == 0:
        w = [1.0] * len(labels)
    quotas = [total * x / sum(w) for x in w]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(labels)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return dict(zip(labels, counts))


def failures_by(rows: Sequence[dict], by: str) -> dict[str, tuple[int, int]]:
    """`(failed, n)` per label from per-prompt evaluation rows (`instruction_id_list`, `followed` per
    instruction, `task_type`): per instruction id, each instruction counts once; per task type, a prompt fails
    when any of its instructions failed."""
    out: dict[str, list[int]] = {}
    for row in rows:
        if by == "instruction":
            pairs = zip(row["instruction_id_list"], row["followed"])
        elif by == "task_type":
            pairs = [(row.get("task_type") or "unknown", all(row["followed"]))]
        else:
            raise ValueError(f"allocation.by {by!r}: expected 'instruction' or 'task_type'")
        for label, ok in pairs:
            tally = out.setdefault(label, [0, 0])
            tally[0] += not ok
            tally[1] += 1
    return {k: (v[0], v[1]) for k, v in sorted(out.items())}


def allocate(rows: Sequence[dict], labels: Sequence[str], total: int, formula: str, by: str) -> dict:
    """Counts per label (every label in `labels`, in that order) and the evidence behind them."""
    seen = failures_by(rows, by)
    evidence = {label: seen.get(label, (0, 0)) for label in labels}
    w = weights(evidence, formula)
    return {"by": by, "formula": formula, "total": total, "counts": apportion(w, total),
            "weights": w, "evidence": {k: {"failed": f, "n": n} for k, (f, n) in evidence.items()}}
