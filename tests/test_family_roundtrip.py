"""Per family: the merged export reloads in transformers with our logits (from the source config and from the
model alone), our PEFT adapter loads in peft, and a peft-made adapter loads in jaxtune, each at fp32 parity."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hf_models import torch_logits
from test_export import ATOL, _ids, _logits, lora_model

from jaxtune import load_pretrained
from jaxtune.export import save_merged
from jaxtune.lora.peft import load_peft_adapter, save_peft_adapter

# (variant, scanned layout): the layouts alternate so both are covered without doubling the time.
FAMILIES = [("gemma", True), ("gemma2", False), ("gemma3", True), ("phi3", False), ("phi4_longrope", True),
            ("olmo2", False), ("granite", True)]


@pytest.mark.parametrize("name,scan", FAMILIES, ids=[n for n, _ in FAMILIES])
def test_merged_export_and_adapters_round_trip(hf_zoo, tmp_path, name, scan):
    import peft
    from transformers import AutoModelForCausalLM

    path, hf = hf_zoo(name)
    model = lora_model(path, scan, target_modules="all-linear")
    ids = _ids()
    ours = _logits(model, ids)
    assert np.abs(ours - torch_logits(hf, ids)).max() > 1e-2  # the adapters change the model
    for source in (path, None):
        out = save_merged(model, None, tmp_path / f"merged-{source is None}", source_dir=source)
        assert np.abs(torch_logits(AutoModelForCausalLM.from_pretrained(out), ids) - ours).max() <= ATOL

    adapter = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), adapter)
    assert np.abs(torch_logits(pm, ids) - ours).max() <= ATOL
    back = load_peft_adapter(load_pretrained(path, scan_layers=not scan), adapter)
    assert np.abs(_logits(back, ids) - ours).max() <= 1e-5

    made = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        task_type="CAUSAL_LM", init_lora_weights=False, target_modules="all-linear", r=2, lora_alpha=4))
    made.save_pretrained(tmp_path / "peft-made")
    theirs = load_peft_adapter(load_pretrained(path, scan_layers=scan), tmp_path / "peft-made")
    assert np.abs(_logits(theirs, ids) - torch_logits(made, ids)).max() <= ATOL


def test_multimodal_gemma3_text_tower_round_trips(hf_zoo, tmp_path):
    """The text tower of a multimodal Gemma 3 checkpoint (`language_model.model.` on disk, `model.language_model.`
    in transformers' modules): a merged export keeps the vision tower byte for byte and reloads whole; adapters
    use transformers' module names both ways; without its source directory an export is refused."""
    import peft
    from test_export import tensors
    from transformers import AutoModelForCausalLM

    path, hf = hf_zoo("gemma3_vision")
    model = lora_model(path, True, target_modules=["q_proj", "down_proj"])
    ids = _ids()
    ours = _logits(model, ids)
    assert np.abs(ours - torch_logits(hf, ids)).max() > 1e-2
    out = save_merged(model, None, tmp_path / "merged", source_dir=path)
    source, merged = tensors(path), tensors(out)
    vision = [n for n in source if not n.startswith("language_model.")]
    assert vision and all(np.array_equal(source[n], merged[n]) for n in vision)
    assert np.abs(torch_logits(AutoModelForCausalLM.from_pretrained(out), ids) - ours).max() <= ATOL
    with pytest.raises(ValueError, match="text tower of a multimodal checkpoint"):
        save_merged(model, None, tmp_path / "alone")

    adapter = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    assert any(k.startswith("base_model.model.model.language_model.layers.0.") for k in tensors(adapter))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), adapter)
    assert np.abs(torch_logits(pm, ids) - ours).max() <= ATOL
    back = load_peft_adapter(load_pretrained(path), adapter)
    assert np.abs(_logits(back, ids) - ours).max() <= 1e-5
