"""Real bitsandbytes 4-bit HF checkpoints, made offline on CPU from the tiny fp32 zoo models (tests/hf_models.py).

Importing bitsandbytes on an AVX512-BF16 CPU asks the HF Hub for a `kernels-community` gemm kernel; `offline_bnb`
keeps that lookup off the network (`import peft` imports bitsandbytes too, so it goes inside it as well). Reference
logits switch off bitsandbytes' CPU bf16 inference kernel so they are fp32 (dequantise to fp32, then an fp32 matmul)
on every CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
_QUIET_LOGGERS = ("bitsandbytes", "kernels")
_MISSING = object()


@contextlib.contextmanager
def offline_bnb():
    """HF Hub offline (env and the already-read `huggingface_hub.constants`), and bitsandbytes imported with the
    `kernels` package hidden so its Hub kernel lookup fails at once and quietly; everything restored on exit."""
    from huggingface_hub import constants

    env_old, const_old = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    os.environ["HF_HUB_OFFLINE"], constants.HF_HUB_OFFLINE = "1", True
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        if "bitsandbytes" not in sys.modules:
            kernels = sys.modules.get("kernels", _MISSING)
            sys.modules["kernels"] = None
            try:
                import bitsandbytes  # noqa: F401
            finally:
                if kernels is _MISSING:
                    del sys.modules["kernels"]
                else:
                    sys.modules["kernels"] = kernels
        yield
    finally:
        constants.HF_HUB_OFFLINE = const_old
        if env_old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env_old
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def bnb_config(*, double_quant: bool = True, quant_type: str = "nf4", compute_dtype=torch.float32,
               skip_modules=None):
    """`skip_modules` replaces transformers' default skips (lm_head), it does not add to them."""
    import transformers

    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_use_double_quant=double_quant,
                                           bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip_modules)


def load_bnb_4bit(model_dir: Path, **config_kw):
    """The model in `model_dir` loaded 4-bit on CPU: a pre-quantized checkpoint as saved, an fp32 one quantized
    with `bnb_config(**config_kw)`."""
    import transformers

    with offline_bnb():
        kw = {} if not config_kw else {"quantization_config": bnb_config(**config_kw)}
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu",
                                                                  attn_implementation="eager", **kw)
    return model.eval()


def save_bnb_4bit(src_dir: Path, out_dir: Path, *, double_quant: bool = True, quant_type: str = "nf4",
                  compute_dtype=torch.float32, skip_modules=None) -> Path:
    """Quantize the fp32 HF model in `src_dir` with bitsandbytes and save it (safetensors) with any tokenizer files
    into `out_dir`, as `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))` would."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    model = load_bnb_4bit(src_dir, double_quant=double_quant, quant_type=quant_type, compute_dtype=compute_dtype,
                          skip_modules=skip_modules)
    with offline_bnb():
        model.save_pretrained(out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (src_dir / name).exists():
            shutil.copy2(src_dir / name, out_dir / name)
    return out_dir


def fp32_bnb_forward_(model) -> None:
    """Route every bnb Linear4bit off the AVX512-BF16 CPU kernel (bf16 activations and scales) onto dequantise-then-
    matmul in the compute dtype, so logits do not depend on the CPU's instruction set; refuse layers whose CPU
    dequantisation is wrong."""
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            blocksize = module.weight.quant_state.blocksize
            if module.in_features % blocksize:
                raise ValueError(f"{name}: in_features {module.in_features} is not a multiple of the bnb blocksize "
                                 f"{blocksize}; bitsandbytes' CPU dequantize kernel mis-decodes blocks that straddle "
                                 "rows, so its logits are no reference. Build the base with sizes divisible by it.")
            module.support_avx512bf16_for_cpu = False


def _logits(model, input_ids) -> torch.Tensor:
    fp32_bnb_forward_(model)
    with torch.no_grad():
        return model(torch.as_tensor(input_ids)).logits.float()


def bnb_reference_logits(bnb_dir: Path, input_ids) -> torch.Tensor:
    """transformers' logits [B, T, V] (fp32) for the saved 4-bit checkpoint `bnb_dir`, on CPU."""
    return _logits(load_bnb_4bit(bnb_dir), input_ids)


def peft_logits_on_4bit(bnb_dir: Path, adapter_dir: Path, input_ids) -> torch.Tensor:
    """Logits [B, T, V] (fp32) of the PEFT LoRA adapter in `adapter_dir` loaded onto the 4-bit base `bnb_dir`."""
    base = load_bnb_4bit(bnb_dir)
    with offline_bnb():
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, adapter_dir).eval()
    return _logits(model, input_ids)
