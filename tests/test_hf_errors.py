"""Corrupt or unsupported model directories fail with one line naming the file (and tensor), never a traceback:
the same message from `load_pretrained` (a ValueError) and from the CLI (`error: …`, exit 2)."""

import json
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxtune.cli.main import main

WEIGHT = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture
def model_dir(stories_dir, tmp_path) -> Path:
    """A writable copy of the stories260K model."""
    out = tmp_path / "model"
    shutil.copytree(stories_dir, out, copy_function=shutil.copyfile)
    return out


def _cli_error(argv, capsys) -> str:
    """Run the CLI, expect exit 2 and exactly one `error:` line on stderr; return the message."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0].removeprefix("error: ")


def _load_error(path) -> str:
    from jaxtune import load_pretrained

    with pytest.raises(ValueError) as e:
        load_pretrained(path)
    return str(e.value)


def _rewrite(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _flip_header(data: bytes) -> bytes:
    b = bytearray(data)
    for i in range(8, 24):
        b[i] ^= 0xFF
    return bytes(b)


CORRUPTIONS = {
    "truncated_5_bytes": lambda d: d[:5],
    "header_length_2_40": lambda d: struct.pack("<Q", 2**40) + d[8:],
    "half_a_file": lambda d: d[: len(d) // 2],
    "flipped_header_bytes": _flip_header,
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupt_weight_file_is_named(model_dir, capsys, how):
    f = model_dir / "model.safetensors"
    f.write_bytes(CORRUPTIONS[how](f.read_bytes()))
    msg = _cli_error(["info", str(model_dir)], capsys)  # plain info opens each header
    assert str(f) in msg
    assert _load_error(model_dir) == msg
    assert _cli_error(["info", "--check", str(model_dir)], capsys) == msg


def test_integer_weight_is_refused(model_dir, capsys):
    f = model_dir / "model.safetensors"
    _rewrite(f, lambda t: t.update({WEIGHT: (t[WEIGHT] * 100).astype(np.int64)}))
    msg = _cli_error(["info", str(model_dir)], capsys)
    assert str(f) in msg and WEIGHT in msg and "int64" in msg
    assert _load_error(model_dir) == msg


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
def test_wrong_shape_names_file_and_tensor(model_dir, scan):
    from jaxtune import load_pretrained

    f = model_dir / "model.safetensors"
    _rewrite(f, lambda t: t.update({WEIGHT: t[WEIGHT][:, :171].copy()}))
    with pytest.raises(ValueError) as e:
        load_pretrained(model_dir, scan_layers=scan)
    assert str(f) in str(e.value) and WEIGHT in str(e.value) and "(64, 171)" in str(e.value)


def test_reader_is_zero_copy(stories_dir):
    from jaxtune.hf.safetensors import read_safetensors

    for _, arr in read_safetensors(stories_dir / "model.safetensors"):
        assert not arr.flags.writeable and not arr.flags.owndata  # a view of the read-only memmap


def test_float_casts_still_load(model_dir, capsys):
    from jaxtune import load_pretrained

    _rewrite(model_dir / "model.safetensors",
             lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}))
    load_pretrained(model_dir)  # bf16 → fp32 is a cast, not an error
    assert main(["info", "--check", str(model_dir)]) == 0
    assert "no NaN/Inf" in capsys.readouterr().out


def test_check_reports_nan_and_inf(model_dir, capsys):
    f = model_dir / "model.safetensors"

    def poison(t):
        t[WEIGHT] = t[WEIGHT].copy()
        t[WEIGHT][0, :3] = np.nan
        t[WEIGHT][1, 0] = np.inf

    _rewrite(f, poison)
    assert main(["info", str(model_dir)]) == 0  # plain info never reads the weights
    out = capsys.readouterr().out
    assert "weights" in out
    msg = _cli_error(["info", "--check", str(model_dir)], capsys)
    assert str(f) in msg and WEIGHT in msg
    main(["info", "--check", str(model_dir)])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if WEIGHT in ln)
    assert "3 NaN" in line and "1 Inf" in line


def test_clean_model_checks_fine(stories_dir, capsys):
    assert main(["info", "--check", str(stories_dir)]) == 0
    out = capsys.readouterr().out
    assert "no NaN/Inf" in out and "model.safetensors" in out


# --- config.json and the directory itself -------------------------------------------------------------------

FALCON = {"architectures": ["FalconForCausalLM"], "model_type": "falcon", "hidden_size": 64, "n_head": 4,
          "n_layer": 2, "vocab_size": 128, "multi_query": True, "parallel_attn": True, "alibi": False,
          "bias": False, "new_decoder_architecture": False, "layer_norm_epsilon": 1e-5}


def _both(path, capsys) -> str:
    msg = _cli_error(["info", str(path)], capsys)
    assert _cli_error(["params", str(path)], capsys) == msg
    assert _load_error(path) == msg
    return msg


def test_unsupported_model_type(model_dir, capsys):
    (model_dir / "config.json").write_text(json.dumps(FALCON))
    msg = _both(model_dir, capsys)
    assert str(model_dir / "config.json") in msg
    assert "model_type='falcon' is not supported; jaxtune supports llama" in msg


def test_unknown_model_type(model_dir, capsys):
    (model_dir / "config.json").write_text(json.dumps({**FALCON, "model_type": "no-such-family"}))
    assert "model_type='no-such-family' is not supported" in _both(model_dir, capsys)


def test_missing_model_path(tmp_path, capsys):
    path = tmp_path / "nope"
    assert _both(path, capsys) == f"{path}: no such directory (expected an HF model dir with config.json)"


def test_directory_without_config(model_dir, capsys):
    (model_dir / "config.json").unlink()
    msg = _both(model_dir, capsys)
    assert msg.startswith(f"{model_dir}: no config.json")


def test_config_not_json(model_dir, capsys):
    (model_dir / "config.json").write_text("{not json")
    msg = _both(model_dir, capsys)
    assert str(model_dir / "config.json") in msg and "JSON" in msg


def test_config_with_unreadable_fields(model_dir, capsys):
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": None, "head_dim": None}))
    msg = _both(model_dir, capsys)
    assert str(model_dir / "config.json") in msg
