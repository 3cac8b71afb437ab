"""Where the quickstart's model and data come from: explicit paths, the bundled assets, else the Hub.

Order: `JAXTUNE_MODEL` / `JAXTUNE_DATA` / `JAXTUNE_HELDOUT` (paths), then `JAXTUNE_ASSETS` or `../shared/assets`
beside the checkout (how CI and developers run offline), else a small Llama-family model and an Alpaca sample
downloaded from the Hugging Face Hub for users with network.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

HUB_MODEL = "nickypro/tinyllama-15M"  # llama2.c stories15M in HF Llama format (safetensors)
HUB_DATASET = "tatsu-lab/alpaca"
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class QuickstartAssets:
    model: Path
    train: Path
    heldout: Path
    origin: str


def asset_roots() -> list[Path]:
    """Where staged assets may live: `$JAXTUNE_ASSETS`, then `shared/assets` beside the checkout or the cwd."""
    env = os.environ.get("JAXTUNE_ASSETS")
    return ([Path(env)] if env else []) + [REPO_ROOT.parent / "shared" / "assets",
                                           Path.cwd().parent / "shared" / "assets"]


def find_asset(relative: str) -> Path | None:
    """The first staged asset file `relative` (e.g. `data/ifeval_input_data.jsonl`) under `asset_roots()`."""
    return next((root / relative for root in asset_roots() if (root / relative).is_file()), None)


def bundled_assets_dir() -> Path | None:
    hit = find_asset("models/stories260K-hf/config.json")
    return hit.parents[2].resolve() if hit else None


def _from_hub(cache: Path) -> QuickstartAssets:
    """Real download path for users with network (never exercised offline)."""
    from huggingface_hub import snapshot_download

    model = Path(snapshot_download(HUB_MODEL, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    cache.mkdir(parents=True, exist_ok=True)
    train, heldout = cache / "alpaca_1k.json", cache / "alpaca_heldout_200.json"
    if not (train.exists() and heldout.exists()):
        from datasets import load_dataset

        rows = load_dataset(HUB_DATASET, split="train[:1200]")
        keep = [{k: r[k] for k in ("instruction", "input", "output")} for r in rows]
        train.write_text(json.dumps(keep[:1000], indent=1))
        heldout.write_text(json.dumps(keep[1000:], indent=1))
    return QuickstartAssets(model, train, heldout, f"Hugging Face Hub ({HUB_MODEL}, {HUB_DATASET})")


def quickstart_assets(cache: Path | None = None) -> QuickstartAssets:
    env_model, env_data = os.environ.get("JAXTUNE_MODEL"), os.environ.get("JAXTUNE_DATA")
    bundled = bundled_assets_dir()
    if env_model or env_data:
        if not (env_model and env_data):
            raise SystemExit("set both JAXTUNE_MODEL (HF model dir) and JAXTUNE_DATA (instruction file), or neither")
        heldout = os.environ.get("JAXTUNE_HELDOUT", env_data)
        return QuickstartAssets(Path(env_model), Path(env_data), Path(heldout), "environment")
    if bundled is not None:
        return QuickstartAssets(bundled / "models" / "stories260K-hf", bundled / "data" / "alpaca_data_1k.json",
                                bundled / "data" / "alpaca_en_demo.json", f"bundled assets ({bundled})")
    return _from_hub(cache or REPO_ROOT / ".jaxtune_cache" / "quickstart")
