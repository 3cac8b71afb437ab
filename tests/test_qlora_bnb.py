"""Pre-quantized bitsandbytes 4-bit checkpoints load exactly: logits match transformers' 4-bit model, and a QLoRA
adapter trained on them loads in peft on that base, its merge in transformers."""

import json

import bnb_models
import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtune.hf.load import load_pretrained
from jaxtune.hf.safetensors import CheckpointError
from jaxtune.model.config import UnsupportedConfigError

IDS = np.array([[1, 5, 9, 33, 70, 2, 101, 7], [3, 3, 64, 12, 90, 45, 6, 120]], np.int32)


@pytest.fixture(scope="module")
def bnb_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb")
    out = {}
    for name, double in (("llama_gqa", True), ("phi3", True), ("llama_gqa", False)):
        src = root / f"{name}_fp32"
        if not src.exists():
            hf_models.build(name, src, intermediate_size=128)
        out[name, double] = bnb_models.save_bnb_4bit(src, root / f"{name}_{double}", double_quant=double)
    return out


@nnx.jit
def _forward(model, ids):
    return model(ids)


def _logits(model):
    """One compiled forward: op-by-op dispatch of an unscanned model costs several times its compile."""
    return np.asarray(_forward(model, jnp.asarray(IDS)), np.float32)


@pytest.mark.parametrize("name,double", [("llama_gqa", True), ("phi3", True), ("llama_gqa", False)])
def test_bnb_checkpoint_logits_match_transformers(bnb_dirs, name, double):
    d = bnb_dirs[name, double]
    ref = bnb_models.bnb_reference_logits(d, IDS).numpy()
    for scan in (False, True):
        model = load_pretrained(d, jnp.float32, scan_layers=scan)
        assert getattr(model.lm_head, "weight_quant", None) is None
        np.testing.assert_allclose(_logits(model), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("field,value", [("load_in_8bit", True), ("bnb_4bit_quant_type", "fp4"),
                                         ("bnb_4bit_quant_storage", "bfloat16"), ("quant_method", "gptq")])
def test_unsupported_quantization_refused_in_one_line(bnb_dirs, tmp_path, field, value):
    src = bnb_dirs["llama_gqa", True]
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f)
    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"][field] = value
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises((UnsupportedConfigError, CheckpointError)) as e:
        load_pretrained(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "config.json" in msg and field.split("_")[-1] in msg


def test_qlora_adapter_on_bnb_base_loads_in_peft_and_merges(bnb_dirs, tmp_path):
    import torch
    import transformers

    from jaxtune.export import save_merged, save_peft_adapter
    from jaxtune.lora.apply import apply_lora
    from jaxtune.lora.config import LoraConfig
    from jaxtune.lora.quantize import quantize_base

    d = bnb_dirs["llama_gqa", True]
    cfg = LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules="all-linear", quantize="nf4")
    model = load_pretrained(d, jnp.float32, prepare=lambda m: quantize_base(m, cfg))
    apply_lora(model, cfg)
    key = iter(jax.random.split(jax.random.key(1), 1000))
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        var.set_value(0.05 * jax.random.normal(next(key), var.shape, var.dtype))
    ours = _logits(model)
    adapter = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(d))
    np.testing.assert_allclose(bnb_models.peft_logits_on_4bit(d, adapter, IDS).numpy(), ours, atol=1e-4, rtol=0)
    merged = save_merged(model, None, tmp_path / "merged", source_dir=d, dtype=jnp.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, attn_implementation="eager")
    np.testing.assert_allclose(hf_models.torch_logits(hf.eval(), IDS), ours, atol=1e-4, rtol=0)
