"""The cache root, the persistent compilation cache `jaxtune train` turns on, and the data cache under it."""

from __future__ import annotations

import jax
import pytest

from jaxtune import cache
from jaxtune.recipe import RecipeConfig
from jaxtune.structs import from_dict


@pytest.fixture
def no_cache_dir():
    """jax's cache dir is process-global: clear it for the test, put the suite's back after."""
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", old)


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXTUNE_CACHE_DIR", str(tmp_path / "root"))
    assert cache.cache_dir() == tmp_path / "root"
    monkeypatch.delenv("JAXTUNE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "jaxtune"


def test_compile_cache_goes_under_the_root_unless_jax_has_one(monkeypatch, tmp_path, no_cache_dir):
    monkeypatch.setenv("JAXTUNE_CACHE_DIR", str(tmp_path))
    assert cache.enable_compile_cache() == tmp_path / "xla"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert cache.enable_compile_cache() == tmp_path / "mine"  # the user's choice wins


def test_train_turns_the_cache_on_unless_the_recipe_says_no(monkeypatch, tmp_path, no_cache_dir):
    from jaxtune.train import loop

    class Stop(Exception):
        pass

    def stop(*_a, **_k):  # everything after the cache decision is tested elsewhere
        raise Stop

    monkeypatch.setattr(loop, "build_mesh", stop)
    monkeypatch.setenv("JAXTUNE_CACHE_DIR", str(tmp_path))
    raw = {"model": {"path": str(tmp_path)}, "data": {"train": str(tmp_path / "d.json")},
           "output": {"run_dir": str(tmp_path / "run")}, "train": {"compile_cache": False}}
    with pytest.raises(Stop):
        loop.train(from_dict(RecipeConfig, raw))
    assert jax.config.jax_compilation_cache_dir is None
    raw["train"]["compile_cache"] = True
    with pytest.raises(Stop):
        loop.train(from_dict(RecipeConfig, raw))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    with pytest.raises(ValueError, match="train.compile_cache: expected true or false"):
        from_dict(RecipeConfig, dict(raw, train={"compile_cache": "yes"}))


def test_data_cache_defaults_under_the_root(monkeypatch, tmp_path):
    from jaxtune.data.config import DataConfig

    monkeypatch.setenv("JAXTUNE_CACHE_DIR", str(tmp_path))
    assert DataConfig(train="x.json").cache_dir == str(tmp_path / "data")
    assert DataConfig(train="x.json", cache_dir=None).cache_dir is None  # null still disables it
