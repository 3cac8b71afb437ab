"""Export round trips with logit parity: jaxtune → merged HF → transformers, jaxtune → PEFT adapter → peft,
peft-made adapter → jaxtune; atomic writes; refusal of adapter options we do not implement; the CLI."""

from __future__ import annotations

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import torch_logits

from jaxtune import load_pretrained
from jaxtune.hf import save as hf_save
from jaxtune.hf.safetensors import read_safetensors
from jaxtune.lora.peft import AdapterError, load_peft_adapter, save_peft_adapter
from jaxtune.export import save_merged
from jaxtune.lora.config import LoraConfig
from jaxtune.lora.apply import apply_lora, lora_sites

ATOL = 1e-4
CASES = [(f, s) for f in ("llama_gqa", "qwen2_bias") for s in (False, True)]
CASE_IDS = [f"{f}-{'scan' if s else 'layers'}" for f, s in CASES]
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer inside the tiny models' 128-token vocab, with chat end-of-turn markers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant"] + [f"w{i}" for i in range(50)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def _ids(shape=(2, 12), seed=0):
    return np.random.RandomState(seed).randint(0, 128, shape).astype(np.int32)


def _logits(model, ids):
    return np.asarray(model(jnp.asarray(ids)))


def randomize_b(model, std=0.1):
    """Non-zero B (PEFT's init leaves B = 0, which would make every parity check trivial)."""
    linears = {id(lin): lin for _, lin, _ in lora_sites(model)}.values()
    for i, lin in enumerate(linears):
        lin.lora_B.set_value(std * jax.random.normal(jax.random.key(i), lin.lora_B.shape))
    return model


def lora_model(path, scan, **kw):
    cfg = LoraConfig(**{"rank": 4, "alpha": 8.0, "dropout": 0.0, **kw})
    return randomize_b(apply_lora(load_pretrained(path, scan_layers=scan), cfg))


def tensors(out_dir):
    return {n: a.copy() for f in sorted(out_dir.glob("*.safetensors")) for n, a in read_safetensors(f)}


@pytest.mark.parametrize("family,scan", CASES, ids=CASE_IDS)
def test_merged_export_loads_in_transformers_with_parity(hf_zoo, tokenizer, tmp_path, family, scan):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, hf = hf_zoo(family)
    model = lora_model(path, scan)
    ids = _ids()
    ours = _logits(model, ids)
    assert np.abs(ours - torch_logits(hf, ids)).max() > 1e-2  # the adapters change the model
    out = save_merged(model, tokenizer, tmp_path / "merged", source_dir=path, chat_template=TEMPLATE)
    assert np.abs(torch_logits(AutoModelForCausalLM.from_pretrained(out), ids) - ours).max() <= ATOL

    source = json.loads((path / "config.json").read_text())
    written = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in written.items() if k != "dtype"} == {k: v for k, v in source.items() if k != "dtype"}
    assert written["dtype"] == "float32"
    assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert generation["bos_token_id"] == 1


def test_config_fields_kept_and_vocab_change_written(hf_zoo, tmp_path):
    from transformers import AutoConfig

    path, _ = hf_zoo("llama_gqa")
    src = tmp_path / "src"
    shutil.copytree(path, src)
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**raw, "dtype": "bfloat16", "custom_note": "kept"}))
    model = load_pretrained(src)
    out = save_merged(model, None, tmp_path / "out", source_dir=src)
    written = json.loads((out / "config.json").read_text())
    assert written["custom_note"] == "kept" and written["dtype"] == "bfloat16"
    assert {n: a.dtype.name for n, a in tensors(out).items()} == {n: "bfloat16" for n in tensors(out)}
    resized = load_pretrained(src)
    resized.config = resized.config.replace(vocab_size=132)
    resized.embed_tokens.weight.set_value(jnp.zeros((132, 64)))
    resized.lm_head.weight.set_value(jnp.zeros((132, 64)))
    out2 = save_merged(resized, None, tmp_path / "out2", source_dir=src, dtype="float32")
    assert AutoConfig.from_pretrained(out2).vocab_size == 132
    wider = load_pretrained(src)
    wider.config = wider.config.replace(intermediate_size=128)
    with pytest.raises(ValueError, match="intermediate_size=96 but the exported model has intermediate_size=128"):
        save_merged(wider, None, tmp_path / "out3", source_dir=src)
    with pytest.raises(ValueError, match="is the source model directory"):
        save_merged(model, None, src, source_dir=src)


def test_sharded_export_is_identical_across_layouts(hf_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    path, _ = hf_zoo("llama_gqa")
    layered = lora_model(path, False, target_modules=["q_proj", "down_proj"])
    save_peft_adapter(layered, tmp_path / "adapter")
    scanned = load_peft_adapter(load_pretrained(path, scan_layers=True), tmp_path / "adapter")
    a = save_merged(layered, None, tmp_path / "a", source_dir=path, max_shard_size="60KB")
    b = save_merged(scanned, None, tmp_path / "b", source_dir=path, max_shard_size="60KB")
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (a / "model.safetensors").exists()
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() == index["weight_map"].keys()
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)
    ids = _ids()
    assert np.abs(torch_logits(AutoModelForCausalLM.from_pretrained(a), ids) - _logits(layered, ids)).max() <= ATOL


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2_window", "qwen3"])
def test_export_without_source_config(hf_zoo, tmp_path, family):
    from transformers import AutoModelForCausalLM

    path, _ = hf_zoo(family)
    model = lora_model(path, False)
    out = save_merged(model, None, tmp_path / "out")
    ids = _ids()
    assert np.abs(torch_logits(AutoModelForCausalLM.from_pretrained(out), ids) - _logits(model, ids)).max() <= ATOL


def test_interrupted_export_keeps_previous_output(hf_zoo, tmp_path, monkeypatch):
    path, _ = hf_zoo("llama_gqa")
    model = lora_model(path, False)
    out = save_merged(model, None, tmp_path / "out", source_dir=path, max_shard_size="100KB")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = hf_save.write_safetensors
    calls = []

    def failing(file, ts, metadata=None):
        calls.append(file)
        if len(calls) == 2:
            file.write_bytes(b"partial")
            raise OSError("disk full")
        return real(file, ts, metadata)

    monkeypatch.setattr(hf_save, "write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        save_merged(randomize_b(model, std=0.5), None, out, source_dir=path, max_shard_size="100KB")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("family,scan", CASES, ids=CASE_IDS)
def test_peft_adapter_loads_in_peft_and_back(hf_zoo, tmp_path, family, scan):
    import peft

    path, hf = hf_zoo(family)
    model = lora_model(path, scan, target_modules=["q_proj", "v_proj", "down_proj"], rslora=True)
    out = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    keys = set(tensors(out))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 12
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (4, 8.0, True)
    ids = _ids()
    ours = _logits(model, ids)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out)
    assert np.abs(torch_logits(pm, ids) - ours).max() <= ATOL
    back = load_peft_adapter(load_pretrained(path, scan_layers=not scan), out)
    assert np.abs(_logits(back, ids) - ours).max() <= 1e-5


PEFT_CONFIGS = {
    "patterns": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], r=4, lora_alpha=8,
                     rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 5}, layers_to_transform=[1],
                     exclude_modules=["k_proj"]),
    "regex": dict(target_modules=r".*\.(self_attn\.o_proj|mlp\.gate_proj)", r=3, lora_alpha=6, use_rslora=True),
    "all-linear": dict(target_modules="all-linear", r=2, lora_alpha=4),
}


@pytest.mark.parametrize("config", sorted(PEFT_CONFIGS))
@pytest.mark.parametrize("family,scan", CASES, ids=CASE_IDS)
def test_peft_made_adapter_loads_in_jaxtune(hf_zoo, tmp_path, family, scan, config):
    import peft

    path, hf = hf_zoo(family)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False,
                                                                **PEFT_CONFIGS[config]))
    pm.save_pretrained(tmp_path / "adapter")
    ids = _ids()
    ref = torch_logits(pm, ids)
    assert np.abs(ref - torch_logits(hf, ids)).max() > 1e-2
    model = load_peft_adapter(load_pretrained(path, scan_layers=scan), tmp_path / "adapter")
    assert np.abs(_logits(model, ids) - ref).max() <= ATOL


@pytest.fixture(scope="module")
def jaxtune_adapter(hf_zoo, tmp_path_factory):
    path, _ = hf_zoo("llama_gqa")
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    return path, save_peft_adapter(lora_model(path, False, target_modules=["q_proj"]), out)


@pytest.mark.parametrize("change,match", [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"trainable_token_indices": [5, 6]}, "trainable_token_indices"),
    ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
    ({"peft_type": "IA3"}, "only LoRA"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"r": 8}, r"shape \(4, 64\), expected \(8, 64\)"),
    ({"target_modules": ["q_proj", "foo_proj"]}, "'foo_proj' matches no linear layer"),
    ({"target_modules": ["q_proj", "v_proj"]}, "v_proj.lora_A.weight' is missing"),
])
def test_bad_adapters_are_refused_clearly(jaxtune_adapter, tmp_path, change, match):
    path, adapter = jaxtune_adapter
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    model = load_pretrained(path)
    with pytest.raises(AdapterError, match=match) as err:
        load_peft_adapter(model, bad)
    assert str(bad) in str(err.value)
    assert getattr(model, "lora_config", None) is None  # the caller's model is untouched


def _cli(argv):
    from jaxtune.cli.main import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


def test_cli_params_and_export(hf_zoo, tokenizer, tmp_path, capsys, jaxtune_adapter):
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, hf = hf_zoo("qwen2_bias")
    assert _cli(["params", str(path), "--lora-rank", "8", "--targets", "q_proj,v_proj", "--dtype", "fp32"]) == 0
    text = capsys.readouterr().out
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainable, total = pm.get_nb_trainable_parameters()
    assert f"{trainable:,} / {total:,}" in text and "full" in text

    model = lora_model(path, False)
    save_peft_adapter(model, tmp_path / "run" / "export" / "adapter", tokenizer=tokenizer, chat_template=TEMPLATE)
    assert _cli(["export", "--model", str(path), "--run", str(tmp_path / "run"), "--out", str(tmp_path / "merged"),
                 "--peft-out", str(tmp_path / "peft")]) == 0
    ids = _ids()
    ours = _logits(model, ids)
    assert np.abs(torch_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids) - ours).max() <= ATOL
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == TEMPLATE
    re_exported = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "peft")
    assert np.abs(torch_logits(re_exported, ids) - ours).max() <= ATOL
    with pytest.raises(SystemExit, match="export/adapter not found"):
        _cli(["export", "--model", str(path), "--run", str(tmp_path), "--out", str(tmp_path / "x")])
    # A run whose recipe moved its export (output.export_dir) is read there.
    moved = tmp_path / "elsewhere"
    (tmp_path / "run" / "export").rename(moved)
    (tmp_path / "run" / "config.yaml").write_text(f"output:\n  run_dir: {tmp_path / 'run'}\n  export_dir: {moved}\n")
    assert _cli(["export", "--model", str(path), "--run", str(tmp_path / "run"), "--out",
                 str(tmp_path / "merged")]) == 0
    (tmp_path / "run" / "config.yaml").write_text("output:\n  run_dir: r\n  export_dir: gs://bucket/run\n")
    with pytest.raises(SystemExit, match="exported to gs://bucket/run; copy"):
        _cli(["export", "--model", str(path), "--run", str(tmp_path / "run"), "--out", str(tmp_path / "y")])
