"""Export back to Hugging Face: a merged checkpoint `transformers` loads, and (re-exported from
`jaxtune.lora.peft`) PEFT adapters both ways.

Every directory is written atomically (`jaxtune.files.atomic_dir`): into a temp dir beside the target, then
swapped in, so an interrupted export leaves the previous output as it was; only an absent or empty target or a
previous jaxtune export is replaced unless `force=True`, and never the source model, a run directory or the
current directory.

On a multi-process job every process calls these (the weights are sharded over all of them): each tensor is
gathered onto the hosts when it is written and released after, process 0 alone writes, and every process
returns once the directory is in place, or raises if process 0's write failed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.faults import fault_point
from jaxtune.files import as_path, atomic_dir
from jaxtune.generate import stop_token_ids
from jaxtune.hf.families import family
from jaxtune.hf.load import kept_tensors
from jaxtune.hf.safetensors import Tensor
from jaxtune.hf.save import (
    hf_config_from_model,
    hf_config_from_source,
    hf_tensors,
    host_array,
    save_tokenizer,
    save_weights,
)
from jaxtune.lora import peft
from jaxtune.lora.peft import load_peft_adapter
from jaxtune.model.config import DTYPES, parse_dtype

__all__ = ["load_peft_adapter", "save_merged", "save_peft_adapter"]


def _generation_config(model_config, tokenizer, chat_template, extra, source_dir) -> dict:
    gen = {}
    if source_dir is not None and (Path(source_dir) / "generation_config.json").is_file():
        gen = json.loads((Path(source_dir) / "generation_config.json").read_text())
    stops = stop_token_ids(model_config, tokenizer, chat_template, extra, gen)
    if stops:
        gen["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    bos = model_config.bos_token_id if model_config.bos_token_id is not None else getattr(
        tokenizer, "bos_token_id", None)
    pad = model_config.pad_token_id if model_config.pad_token_id is not None else getattr(
        tokenizer, "pad_token_id", None)
    for key, value in (("bos_token_id", bos), ("pad_token_id", pad)):
        if value is not None:
            gen[key] = int(value)
    return gen


def _export_dtype(dtype, source_dir, model):
    if dtype is not None:
        return parse_dtype(dtype, "export dtype")
    if source_dir is not None and (Path(source_dir) / "config.json").is_file():
        raw = json.loads((Path(source_dir) / "config.json").read_text())
        name = raw.get("dtype") or raw.get("torch_dtype")
        if name in DTYPES:
            return parse_dtype(name)
    table = model.embed_tokens
    return jnp.dtype(jnp.float32 if table.weight_quant is not None else table.weight.dtype)


def save_merged(model, tokenizer, out_dir: str | Path, *, source_dir: str | Path | None = None, dtype=None,
                chat_template: str | None = None, stop_ids=(), max_shard_size: int | str = "5GB", force: bool = False,
                protect: dict[str, str | Path | None] | None = None) -> Path:
    """Write an HF checkpoint of `model` with any LoRA merged (fp32 math, one cast) that
    `AutoModelForCausalLM.from_pretrained(out_dir)` loads: safetensors (sharded above `max_shard_size`),
    `config.json` (the source's, with only changed fields rewritten), tokenizer files with `chat_template`
    (the one training used) and `generation_config.json` listing every stop id. `dtype` defaults to the
    source checkpoint's dtype; `tokenizer` may be None. `force` replaces a directory jaxtune did not write;
    `protect` (label → path, e.g. the adapter dir) names more directories the target must not be or contain."""
    out = as_path(out_dir)  # a gs:// URL stays one
    dt = _export_dtype(dtype, source_dir, model)
    cfg = model.config
    config = (hf_config_from_source(cfg, Path(source_dir), dt) if source_dir is not None
              else hf_config_from_model(cfg, dt))
    generation = _generation_config(cfg, tokenizer, chat_template, stop_ids, source_dir)
    guarded = {"the source model directory": source_dir, **(protect or {})}

    def write(tensors: list[Tensor]) -> None:
        with atomic_dir(out, kind="merged", force=force, protect=guarded) as tmp:
            kept = kept_tensors(source_dir, family(cfg.model_type)) if source_dir is not None else []
            save_weights(tensors + kept, tmp, max_shard_size)
            fault_point("export.writing")
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
            if tokenizer is not None:
                save_tokenizer(tokenizer, tmp, chat_template)

    _written_once(write, hf_tensors(model, dt))
    return out


def save_peft_adapter(model, out_dir: str | Path, **kwargs) -> Path:
    """`jaxtune.lora.peft.save_peft_adapter` (same arguments) from every process of a job: each gathers the
    adapter weights onto its host first (the adapter is small beside the model: the size of the file written),
    then process 0 writes."""
    if jax.process_count() == 1:
        return peft.save_peft_adapter(model, out_dir, **kwargs)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    on_host = nnx.merge(graphdef, jax.tree.map(host_array, lora), rest)
    _written_once(lambda _: peft.save_peft_adapter(on_host, out_dir, **kwargs), [])
    return as_path(out_dir)


def _written_once(write: Callable[[list[Tensor]], None], tensors: list[Tensor]) -> None:
    """`write(tensors)` on process 0 alone, which reads each tensor once, in order; on one process, just that.
    Every other process reads the same tensors alongside it (each read of a sharded tensor is a gather all
    processes take part in) and writes nothing. A failed write still reads what it left unread, so no process
    waits in a gather another skipped; then all processes learn process 0's outcome and fail together."""
    if jax.process_count() == 1:
        write(tensors)
        return
    from jax.experimental import multihost_utils

    read = [0]

    def count(x):
        read[0] += 1
        return x

    tensors = [t.then(count) for t in tensors]
    error = None
    if jax.process_index() == 0:
        try:
            write(tensors)
        except Exception as e:  # noqa: BLE001 — re-raised below, once the other processes know
            error = e
    for t in tensors[read[0]:]:
        t.numpy()
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if error is not None:
        raise error
    if not ok:
        raise OSError(f"process 0 of {jax.process_count()} failed to write the export; its log names the error")
