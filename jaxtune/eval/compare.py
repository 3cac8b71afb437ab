"""Base vs tuned on the same prompts: generate greedily with both, score IFEval and the over-rigidity probes,
and keep what each model wrote beside its scores."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from jaxtune.eval import ifeval, rigidity
from jaxtune.generate import stop_token_ids


def respond(model, tokenizer, prompts: Sequence[str], *, template: str | None, max_new_tokens: int,
            batch_size: int, stop_ids: Sequence[int]) -> list[str]:
    """Greedy responses to user prompts (chat-formatted when `template` is given)."""
    from jaxtune.generate import SamplingParams, generate_many, prompt_ids

    ids = [prompt_ids(tokenizer, p, template) for p in prompts]
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids))
    gen = generate_many(model, ids, params, batch_size=batch_size)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in gen.tokens]


def score_models(models: dict, tokenizer, inputs: Sequence[dict], out_dir: str | Path, *, template: str | None,
                 max_new_tokens: int, batch_size: int, probes: Sequence | None = None) -> tuple[dict, dict]:
    """`({side: IFEvalResult}, {side: RigidityResult})` for each named model (e.g. `base`, `tuned`), all
    prompted the same way and stopping at the same ids. Each side's IFEval rows and responses are written
    to `out_dir/ifeval_<side>/`, its probe responses to `out_dir/rigidity_<side>/`, as {prompt, response}
    records that `jaxtune eval ifeval | rigidity --responses` score again. `probes`: over-rigidity probes,
    or None to skip them."""
    first = next(iter(models.values()))
    kw = dict(template=template, max_new_tokens=max_new_tokens, batch_size=batch_size,
              stop_ids=stop_token_ids(first.config, tokenizer, template))
    prompts = [inp["prompt"] for inp in inputs]
    scored, rigid = {}, {}
    for side, model in models.items():
        responses = respond(model, tokenizer, prompts, **kw)
        scored[side] = ifeval.score_responses(inputs, responses)
        ifeval.write_results(scored[side], Path(out_dir) / f"ifeval_{side}")
        ifeval.write_responses(Path(out_dir) / f"ifeval_{side}" / "responses.jsonl", prompts, responses)
        if probes is not None:
            probe_prompts = [p.prompt for p in probes]
            probe_responses = respond(model, tokenizer, probe_prompts, **kw)
            rigid[side] = rigidity.score_rigidity(probes, probe_responses)
            ifeval.write_responses(Path(out_dir) / f"rigidity_{side}" / "responses.jsonl", probe_prompts,
                                   probe_responses)
    return scored, rigid
