"""Shared fixtures: 8 fake CPU devices (set before jax is imported), asset paths, tiny HF models."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `jaxtune train` turns on JAX's persistent compilation cache under ~/.cache/jaxtune unless a directory is
# set: the suite (and its subprocesses) gets a throwaway one instead, removed when the suite ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxtune-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# jaxtune's CPU process defaults (jaxtune/runtime.py: an XLA:CPU flag joining the ones above, malloc settings)
# work only before jax is imported; applying them here makes every selection of tests run as the whole suite
# and the `jaxtune` command do.
from jaxtune.runtime import apply_cpu_defaults  # noqa: E402

apply_cpu_defaults()

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

ASSETS = Path(os.environ.get("JAXTUNE_ASSETS", Path(__file__).resolve().parents[1].parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    if not (ASSETS / "models" / "stories260K-hf").is_dir():
        pytest.skip(f"real assets not found at {ASSETS} (set JAXTUNE_ASSETS)")
    return ASSETS


@pytest.fixture(scope="session")
def stories_dir(assets_dir) -> Path:
    return assets_dir / "models" / "stories260K-hf"


@pytest.fixture(scope="session")
def short_alpaca(assets_dir, tmp_path_factory) -> Path:
    """The 40 bundled Alpaca records with the shortest prompts (they fit a 128-token seq_len)."""
    import json

    records = json.loads((assets_dir / "data" / "alpaca_data_1k.json").read_text())
    records = sorted(records, key=lambda r: len(r["instruction"]) + len(r["input"]))[:40]
    path = tmp_path_factory.mktemp("data") / "alpaca_40.json"
    path.write_text(json.dumps(records))
    return path


class _Zoo:
    """Builds each tiny HF variant once per test session: `zoo(name) -> (model_dir, torch_model)`."""

    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def __call__(self, name: str):
        if name not in self.cache:
            from hf_models import build

            path = self.root / name
            self.cache[name] = (path, build(name, path))
        return self.cache[name]


@pytest.fixture(scope="session")
def hf_zoo(tmp_path_factory) -> _Zoo:
    return _Zoo(tmp_path_factory.mktemp("hf_zoo"))


@pytest.fixture(scope="session")
def html_checker():
    """`check_page(path) -> PageCheck` (tests/browser.py) in one headless Chromium for the whole session; skips
    without a browser unless JAXTUNE_REQUIRE_BROWSER=1 (CI), where that is a failure."""
    from browser import checker_session

    yield from checker_session()
