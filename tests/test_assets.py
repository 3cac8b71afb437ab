"""Quickstart asset resolution order: explicit env paths, then bundled assets (the Hub path needs network)."""

import pytest

from jaxtune import assets


def test_env_paths_win(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXTUNE_MODEL", str(tmp_path / "m"))
    monkeypatch.setenv("JAXTUNE_DATA", str(tmp_path / "d.json"))
    a = assets.quickstart_assets()
    assert (a.model, a.train, a.heldout, a.origin) == (tmp_path / "m", tmp_path / "d.json", tmp_path / "d.json",
                                                       "environment")


def test_env_paths_must_come_together(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXTUNE_MODEL", str(tmp_path / "m"))
    monkeypatch.delenv("JAXTUNE_DATA", raising=False)
    with pytest.raises(SystemExit, match="JAXTUNE_DATA"):
        assets.quickstart_assets()


def test_bundled_assets_before_hub(monkeypatch, assets_dir):
    monkeypatch.delenv("JAXTUNE_MODEL", raising=False)
    monkeypatch.delenv("JAXTUNE_DATA", raising=False)
    monkeypatch.setattr(assets, "_from_hub", lambda cache: pytest.fail("must not download"))
    a = assets.quickstart_assets()
    assert a.model == assets_dir.resolve() / "models" / "stories260K-hf" and a.train.name == "alpaca_data_1k.json"


def test_hub_when_nothing_local(monkeypatch, tmp_path):
    for var in ("JAXTUNE_MODEL", "JAXTUNE_DATA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(assets, "bundled_assets_dir", lambda: None)
    called = {}
    monkeypatch.setattr(assets, "_from_hub", lambda cache: called.setdefault("cache", cache))
    assets.quickstart_assets(tmp_path)
    assert called["cache"] == tmp_path
