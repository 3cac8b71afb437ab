"""The default XLA:CPU flags `import jaxtune` appends to XLA_FLAGS (jaxtune/xla_flags.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtune.xla_flags import FAST_CPU_XLA_FLAGS, _known_good, _jaxlib_version, apply_default_cpu_flags

GOOD = "0.10.2"


def apply(environ: dict, modules: dict | None = None, version: str = GOOD) -> bool:
    return apply_default_cpu_flags(environ, {} if modules is None else modules, version)


def test_appended_when_allowed():
    env = {}
    assert apply(env)
    assert env["XLA_FLAGS"] == FAST_CPU_XLA_FLAGS


def test_user_flags_preserved():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert apply(env)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FAST_CPU_XLA_FLAGS}"


@pytest.mark.parametrize("value", ["0", " 0 "])
def test_opt_out(value):
    env = {"JAXTUNE_XLA_CPU_FLAGS": value, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert not apply(env)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


def test_not_appended_when_already_set():
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    assert not apply(env)
    assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"


@pytest.mark.parametrize("version", ["0.9.2", "0.11.0", "0.11.2", "1.0.0", "", "garbage"])
def test_not_appended_for_unknown_jaxlib(version):
    env = {}
    assert not apply(env, version=version)
    assert "XLA_FLAGS" not in env


@pytest.mark.parametrize("version", ["0.10.0", "0.10.2", "0.10.9.dev20260101"])
def test_known_good_versions(version):
    assert _known_good(version)


def test_not_appended_without_jaxlib():
    assert not _known_good(None)


@pytest.mark.parametrize("name", ["jax", "jaxlib"])
def test_not_appended_when_jax_imported(name):
    env = {}
    assert not apply(env, modules={name: object()})
    assert "XLA_FLAGS" not in env


def test_import_jaxtune_sets_flag_and_xla_accepts_it():
    """With the installed jaxlib: `import jaxtune` appends the flag (when the version is known good) and XLA
    starts with it (an unknown flag would abort the process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXTUNE_XLA_CPU_FLAGS")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    code = ("import jaxtune, os; print(os.environ['XLA_FLAGS']); import jax, jax.numpy as jnp; "
            "print(float(jnp.ones(3).sum()), jax.device_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    flags, result = out.stdout.strip().splitlines()
    expected = "--xla_force_host_platform_device_count=2"
    if _known_good(_jaxlib_version()):
        expected += f" {FAST_CPU_XLA_FLAGS}"
    assert flags == expected
    assert result == "3.0 2"
