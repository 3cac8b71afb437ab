"""The CPU process defaults (jaxtune/runtime.py) that `apply_cpu_defaults()` applies and `import jaxtune` does
not: an XLA:CPU flag appended to XLA_FLAGS, and glibc malloc settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtune import runtime as cpu_runtime
from jaxtune.runtime import FAST_CPU_XLA_FLAGS, _known_good, _jaxlib_version, apply_default_cpu_flags, tune_malloc

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
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"}
    assert not apply(env)
    assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"


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


def test_apply_cpu_defaults_sets_flag_and_xla_accepts_it():
    """With the installed jaxlib: `jaxtune.apply_cpu_defaults()` appends the flag (when the version is known
    good) and XLA starts with it (an unknown flag would abort the process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXTUNE_XLA_CPU_FLAGS")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    code = ("import jaxtune, os; jaxtune.apply_cpu_defaults(); print(os.environ['XLA_FLAGS']); import jax, jax.numpy as jnp; "
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


class FakeLibc:
    def __init__(self, result: int = 1):
        self.calls, self.result = [], result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


def test_malloc_settings_when_cpu_only():
    libc = FakeLibc()
    assert tune_malloc({"JAX_PLATFORMS": "cpu"}, {}, libc)
    assert libc.calls == [(cpu_runtime.M_ARENA_MAX, 1), (cpu_runtime.M_MMAP_MAX, 0),
                          (cpu_runtime.M_TRIM_THRESHOLD, 2**31 - 1)]


@pytest.mark.parametrize("environ, modules", [
    ({"JAX_PLATFORMS": "cpu", "JAXTUNE_CPU_MALLOC": "0"}, {}),   # opted out
    ({"JAX_PLATFORMS": "cuda"}, {}),                              # an accelerator was asked for
    ({"JAX_PLATFORMS": "tpu,cpu"}, {}),
    ({"JAX_PLATFORMS": "cpu"}, {"jax": object()}),                # too late: jax's threads have arenas
])
def test_malloc_left_alone(environ, modules):
    libc = FakeLibc()
    assert not tune_malloc(environ, modules, libc)
    assert libc.calls == []


def test_malloc_left_alone_with_an_accelerator_plugin(monkeypatch):
    monkeypatch.setattr(cpu_runtime.importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None)
    libc = FakeLibc()
    assert not tune_malloc({}, {}, libc)
    assert libc.calls == []


def test_malloc_reports_a_refused_setting():
    assert not tune_malloc({"JAX_PLATFORMS": "cpu"}, {}, FakeLibc(result=0))


def test_tuned_malloc_and_xla_runs():
    """In a fresh CPU process, `tune_malloc` sets the malloc options (glibc's mallopt accepts them) and a
    jitted step that needs a large scratch block runs, twice, with the same result."""
    env = {k: v for k, v in os.environ.items() if k != "JAXTUNE_CPU_MALLOC"}
    env.update(JAX_PLATFORMS="cpu")
    code = ("import jaxtune.runtime as c; "
            "print(c.tune_malloc({'JAX_PLATFORMS': 'cpu'}, {}) if c._glibc() else 'no-glibc'); "
            "import jax, jax.numpy as jnp; f = jax.jit(lambda x: (jnp.tanh(x @ x.T) @ x).sum()); "
            "x = jnp.ones((2048, 2048)) / 2048; print(float(f(x)) == float(f(x)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() in (["True", "True"], ["no-glibc", "True"])


def test_import_jaxtune_changes_nothing():
    """`import jaxtune` (and its public names' lookup table) leaves the environment, malloc and sys.modules
    alone: no XLA_FLAGS change, no jax, no numpy."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXTUNE_XLA_CPU_FLAGS", "JAXTUNE_CPU_MALLOC")}
    env.update(JAX_PLATFORMS="cpu")
    code = ("import os, sys; before = dict(os.environ); import jaxtune; "
            "print(dict(os.environ) == before, [m for m in ('jax', 'jaxlib', 'numpy', 'flax') if m in sys.modules], "
            "jaxtune.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split(" ", 2)[:2] == ["True", "[]"], out.stdout


def test_cli_applies_defaults_before_jax():
    """The `jaxtune` entry point builds its whole parser without importing jax (command modules import it
    lazily), then applies the defaults before running a command."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXTUNE_XLA_CPU_FLAGS")}
    env.update(JAX_PLATFORMS="cpu")
    code = ("import os, sys, jaxtune.cli.main as m; m.build_parser(); print('jax' in sys.modules); "
            "m.prepare_process(); print(repr(os.environ.get('XLA_FLAGS', '')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    expected = FAST_CPU_XLA_FLAGS if _known_good(_jaxlib_version()) else ""
    assert out.stdout.splitlines() == ["False", repr(expected)], out.stdout
