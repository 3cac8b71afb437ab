"""Inference cost of base vs tuned on the same prompts and batches, in one run: response length in tokens, time
to first token (TTFT) and per-token decode time, each with a 95% interval.

Prompts are tokenized once and split into fixed batches (length-sorted and the last one topped up, as
`generate_many` does), so every model decodes exactly the same inputs. Runs interleave the models batch by batch
and repeat by repeat, so clock drift or throttling hits them alike, in an order reversed on every other run
(batch index + repeat odd) so that neither model always runs first. Before timing, one untimed warm-up run per
model and batch shape compiles the prefill and the decode step: compile time is never counted. Decoding is
greedy, so every repeat writes the same tokens.

A run reads the clock once before the prefill, once when the first token is on the host (TTFT), and once after
each decode step when its done flags are on the host; it steps until every row stopped or `max_new_tokens`.
Decode time runs from the first token to the last step; per-token time = decode time / decode steps (a batch
whose rows all stopped on their first token has no per-token time). Per batch each time is the median over
repeats; figures over batches are means with a bootstrap interval, so few batches give wide intervals.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from jaxtune import stats
from jaxtune.generate import SamplingParams, _finish, _knobs, _stepper, pad_prompts, prefill, prompt_ids, stop_token_ids

TIMES = ("ttft_ms", "per_token_ms", "total_ms")
WARMUP = "one untimed run per model and batch shape compiles prefill and decode step before timing"


@functools.lru_cache(maxsize=16)
def _prefiller(graphdef):
    """`prefill` jitted with the graphdef bound, so TTFT does not include hashing a GraphDef on every call."""
    return jax.jit(functools.partial(prefill, graphdef), static_argnames=("cache_len", "max_new", "greedy"))


@dataclasses.dataclass(frozen=True)
class _Run:
    ttft: float
    decode: float
    steps: int
    tokens: np.ndarray
    done: np.ndarray


def _timed_run(graphdef, state, arrays, knobs, max_new: int, clock: Callable[[], float], *,
               warmup: bool = False) -> _Run:
    """Prefill then decode step by step until every row stopped or `max_new` tokens; a warm-up takes at least
    one decode step so the step is compiled even when every row stops on its first token."""
    ids, seg, pos = arrays
    run_prefill, step = _prefiller(graphdef), _stepper(graphdef, True)
    start = clock()
    carry = run_prefill(state, ids, seg, pos, knobs, cache_len=ids.shape[1] + max_new, max_new=max_new,
                        greedy=True)
    _, done = jax.device_get((carry["last"], carry["done"]))
    first = end = clock()
    steps = 0
    while steps + 1 < max_new and (not done.all() or (warmup and steps == 0)):
        carry = step(state, carry, knobs)
        done = jax.device_get(carry["done"])
        steps += 1
        end = clock()
    tokens = jax.device_get(carry["tokens"])
    return _Run(first - start, end - first, steps, np.asarray(tokens), np.asarray(done))


def _batches(ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices per batch, shortest prompts first (less padding, few distinct shapes)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _median(values: Sequence[float]) -> float:
    return float(np.median(values))


def _model_figures(runs: list[list[_Run]], batches: list[list[int]], n_prompts: int) -> dict:
    """Per-prompt lengths and per-batch times (ms, median over repeats) of one model."""
    lengths = [0] * n_prompts
    rows, same = [], True
    for idx, reps in zip(batches, runs):
        gen = _finish(reps[0].tokens, reps[0].done)
        for j, i in enumerate(idx):
            lengths[i] = len(gen.tokens[j])
        same &= all(np.array_equal(r.tokens, reps[0].tokens) for r in reps[1:])
        ttft = [1000 * r.ttft for r in reps]
        decode = [1000 * r.decode for r in reps]
        per_token = [1000 * r.decode / r.steps for r in reps if r.steps]
        rows.append({"prompts": list(idx), "decode_steps": [r.steps for r in reps], "ttft_ms": _median(ttft),
                     "per_token_ms": _median(per_token) if per_token else None,
                     "total_ms": _median([a + b for a, b in zip(ttft, decode)]),
                     "repeats": {"ttft_ms": ttft, "decode_ms": decode}})
    return {"lengths": lengths, "batches": rows, "deterministic": bool(same)}


def _ratio(base: Sequence[float], tuned: Sequence[float]) -> float | None:
    b = float(np.mean(base)) if len(base) else 0.0
    return float(np.mean(tuned)) / b if b > 0 else None


def _compare(ref: dict, other: dict, n_boot: int) -> dict:
    """Paired differences (other − ref) over prompts (lengths) and batches (times), and ratios of means
    (other / ref) under the same keys; a ratio of total times is also the ratio of time per prompt."""
    out = {"length": stats.paired_difference(ref["lengths"], other["lengths"], n_boot=n_boot).to_dict()}
    ratio = {"length": _ratio(ref["lengths"], other["lengths"])}
    for key in TIMES:
        pairs = [(a[key], b[key]) for a, b in zip(ref["batches"], other["batches"])
                 if a[key] is not None and b[key] is not None]
        base, tuned = [p[0] for p in pairs], [p[1] for p in pairs]
        out[key] = stats.paired_difference(base, tuned, n_boot=n_boot).to_dict()
        ratio[key] = _ratio(base, tuned)
    out["ratio"] = ratio
    return out


def measure_latency(models: dict, tokenizer, prompts: Sequence[str], *, template: str | None = None,
                    max_new_tokens: int, batch_size: int = 8, stop_ids: Sequence[int] | None = None,
                    repeats: int = 3, bucket: int = 32, n_boot: int = 2000,
                    clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time greedy generation of `prompts` with each model (the first one is the reference the others are
    compared with), all on the same batches. `stop_ids` default to the first model's stop-token rule.

    Returns a JSON-safe dict: `setup` (batches and their prompt indices, repeats, device), `models` (per model:
    `length` tokens per prompt, `ttft_ms`, `per_token_ms` and `total_ms` per batch as estimates, `per_prompt_ms`,
    per-prompt lengths and per-batch rows) and `comparison` (per other model: paired differences and ratios of
    means against the reference)."""
    if not models:
        raise ValueError("measure_latency: no models given")
    if not prompts:
        raise ValueError("measure_latency: no prompts given")
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size={batch_size}, repeats={repeats}: both must be at least 1")
    names = list(models)
    if stop_ids is None:
        stop_ids = stop_token_ids(models[names[0]].config, tokenizer, template)
    knobs = _knobs(SamplingParams(max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids)))
    ids = [prompt_ids(tokenizer, p, template) for p in prompts]
    empty = next((i for i, p in enumerate(ids) if not p), None)
    if empty is not None:
        raise ValueError(f"prompt {empty} tokenizes to no tokens: give text or a template that adds some")
    batch_size = min(batch_size, len(ids))
    batches = _batches(ids, batch_size)
    padded = [pad_prompts([ids[i] for i in idx] + [ids[idx[-1]]] * (batch_size - len(idx)), bucket)
              for idx in batches]
    split = {name: nnx.split(model) for name, model in models.items()}
    first_of_shape = {}
    for b, arrays in enumerate(padded):
        first_of_shape.setdefault(arrays[0].shape, b)
    for name in names:
        for b in first_of_shape.values():
            _timed_run(*split[name], padded[b], knobs, max_new_tokens, clock, warmup=True)

    runs = {name: [[] for _ in batches] for name in names}
    for b, arrays in enumerate(padded):
        for r in range(repeats):
            for name in names if (b + r) % 2 == 0 else names[::-1]:
                runs[name][b].append(_timed_run(*split[name], arrays, knobs, max_new_tokens, clock))

    figures = {name: _model_figures(runs[name], batches, len(ids)) for name in names}
    out_models = {}
    for name, fig in figures.items():
        per_token = [r["per_token_ms"] for r in fig["batches"] if r["per_token_ms"] is not None]
        totals = [r["total_ms"] for r in fig["batches"]]
        out_models[name] = {
            "length": stats.mean(fig["lengths"], n_boot=n_boot).to_dict(),
            "ttft_ms": stats.mean([r["ttft_ms"] for r in fig["batches"]], n_boot=n_boot).to_dict(),
            "per_token_ms": stats.mean(per_token, n_boot=n_boot).to_dict(),
            "total_ms": stats.mean(totals, n_boot=n_boot).to_dict(),
            "per_prompt_ms": float(sum(totals)) / len(ids), **fig}
    ref = names[0]
    device = jax.devices()[0]
    setup = {"models": names, "reference": ref, "prompts": len(ids), "batch_size": batch_size,
             "batches": len(batches), "batch_prompts": batches, "batch_widths": [int(a[0].shape[1]) for a in padded],
             "repeats": repeats, "max_new_tokens": max_new_tokens, "bucket": bucket,
             "stop_ids": [int(s) for s in stop_ids], "decoding": "greedy", "warmup": WARMUP,
             "device": device.device_kind, "platform": device.platform}
    return {"setup": setup, "models": out_models,
            "comparison": {name: {"vs": ref, **_compare(figures[ref], figures[name], n_boot)}
                           for name in names[1:]}}
