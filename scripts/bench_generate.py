"""Batched greedy generation throughput, jaxtune `generate` vs transformers `generate`.

    python scripts/bench_generate.py --preset tiny --batches 1,16

Same model shape (random weights, so both sides decode exactly `--new` tokens: no stop token), same
left-padded random prompts, greedy, KV cache on both sides. New tokens/s = batch × new tokens / wall time of
one `generate` call (median of `--repeats` after one warm-up call; jaxtune's first call includes its
compile and is reported separately). Each side runs in its own process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import utils as bu  # noqa: E402

DEFAULTS = {"cpu": dict(prompt=32, new=64, dtype="float32", repeats=3),
            "gpu": dict(prompt=128, new=128, dtype="bfloat16", repeats=3)}


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Ragged prompts (lengths length/2..length) so left padding is exercised on both sides."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lens = rng.integers(max(1, length // 2), length + 1, batch)
    lens[0] = length
    return [rng.integers(3, vocab, n).tolist() for n in lens]


@bu.jaxtune_side
def jax_worker(s: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import transformers
    from flax import nnx

    from jaxtune.generate import SamplingParams, generate
    from jaxtune.hf.families import from_hf_config
    from jaxtune.model.transformer import Transformer

    cfg = from_hf_config(transformers.LlamaConfig(**bu.hf_config_kwargs(s["preset"])), scan_layers=s["scan_layers"])
    model = Transformer(cfg, dtype=jnp.dtype(s["dtype"]), rngs=nnx.Rngs(0))
    ps = prompts(s["batch"], s["prompt"], cfg.vocab_size)
    params = SamplingParams(max_new_tokens=s["new"], stop_ids=())
    t0 = time.perf_counter()
    out = generate(model, ps, params)
    first = time.perf_counter() - t0
    assert all(len(t) == s["new"] for t in out.tokens)
    times = []
    for _ in range(s["repeats"]):
        t0 = time.perf_counter()
        generate(model, ps, params)
        times.append(time.perf_counter() - t0)
    dev = jax.devices()[0]
    return dict(bu.summarize(times, s["batch"] * s["new"]), side="jaxtune", first_call_s=first,
                device=dev.device_kind, peak_rss=bu.peak_rss_bytes(),
                peak_device=(dev.memory_stats() or {}).get("peak_bytes_in_use"))


def hf_worker(s: dict) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = bu.torch_llama(s["preset"], getattr(torch, s["dtype"]), dev, attn_implementation=s["hf_attention"]).eval()
    ps = prompts(s["batch"], s["prompt"], model.config.vocab_size)
    width = max(len(p) for p in ps)
    ids = torch.zeros((len(ps), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(ps):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    kw = dict(max_new_tokens=s["new"], min_new_tokens=s["new"], do_sample=False, pad_token_id=0,
              eos_token_id=None)
    if s["hf_static_cache"]:
        kw["cache_implementation"] = "static"

    def run():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        if cuda:
            torch.cuda.synchronize()
        return out

    t0 = time.perf_counter()
    out = run()
    first = time.perf_counter() - t0
    assert out.shape[1] == width + s["new"]
    times = []
    for _ in range(s["repeats"]):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return dict(bu.summarize(times, s["batch"] * s["new"]), side="transformers", first_call_s=first,
                device=torch.cuda.get_device_name() if cuda else bu.cpu_name(), peak_rss=bu.peak_rss_bytes(),
                peak_device=torch.cuda.max_memory_allocated() if cuda else None, threads=torch.get_num_threads())


WORKERS = {"jaxtune": jax_worker, "transformers": hf_worker}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(bu.PRESETS), default="tiny")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt", type=int)
    p.add_argument("--new", type=int)
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int)
    p.add_argument("--scan", action="store_true", help="jaxtune scan_layers")
    p.add_argument("--hf-attention", default="sdpa")
    p.add_argument("--hf-static-cache", action="store_true")
    p.add_argument("--sides", default="jaxtune,transformers")
    bu.add_run_args(p, WORKERS, timeout=900, out="bench_generate_<preset>.{md,json}")
    args = p.parse_args(argv)
    if bu.dispatch_worker(args, WORKERS):
        return 0

    m = bu.machine()
    plat = "gpu" if m["gpu"] else "cpu"
    base = dict(DEFAULTS[plat])
    for k in ("prompt", "new", "dtype", "repeats"):
        if getattr(args, k) is not None:
            base[k] = getattr(args, k)
    base.update(preset=args.preset, scan_layers=args.scan, hf_attention=args.hf_attention,
                hf_static_cache=args.hf_static_cache)
    envs = {"jaxtune": bu.jax_env(plat, not args.plain_xla), "transformers": bu.torch_env()}
    rows, results = [], []
    for batch in (int(b) for b in args.batches.split(",")):
        s = dict(base, batch=batch)
        got = {}
        for side in args.sides.split(","):
            r = bu.spawn_worker(str(Path(__file__).resolve()), side, s, timeout=args.timeout, env=envs.get(side),
                                label=f"{side} batch {batch}")
            r.setdefault("side", side)
            got[side] = r
            results.append(dict(r, batch=batch))
        ref = got.get("transformers", {}).get("tokens_per_s")
        for side, r in got.items():
            if "tokens_per_s" not in r:
                rows.append([batch, side, None, None, None, r.get("error")])
                continue
            rate = f"{r['tokens_per_s']:,.0f} ({r['tokens_per_s_min']:,.0f}–{r['tokens_per_s_max']:,.0f})"
            rows.append([batch, side, rate,
                         f"{r['tokens_per_s'] / ref:.2f}×" if ref else None, r["first_call_s"],
                         bu.fmt_bytes(r.get("peak_device") or r["peak_rss"])])
    head = (f"preset `{args.preset}`, greedy, prompts {base['prompt'] // 2}–{base['prompt']} tokens (left-padded), "
            f"{base['new']} new tokens, {base['dtype']}, median of {base['repeats']} calls after a warm-up"
            + (", HF static cache" if args.hf_static_cache else ""))
    text = (head + "\n\n" + bu.markdown_table(["batch", "side", "new tokens/s median (min–max)", "ratio",
                                                "first call s", "peak memory"], rows)
            + f"\n\njaxtune env: {bu.env_note(envs['jaxtune'])}; PyTorch env: {bu.env_note(envs['transformers'])}"
            + f"\n\nMachine: {bu.machine_markdown(m)}\n\n"
            f"Command: `{bu.command('bench_generate.py', argv)}`\n")
    print(text)
    bu.write_outputs(args.out, f"bench_generate_{args.preset}", text, {"settings": base, "results": results})
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
