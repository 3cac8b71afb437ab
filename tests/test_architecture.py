"""The package's shape, checked by reading its source with `ast`: imports flow one way through the layers
below (module-level, function-level, `TYPE_CHECKING` blocks, and module names imported by string, as the lazy
`jaxtune/__init__.py` and `cli/main.py` do), no import cycles, and one definition per shared concept.

LAYERS is the one statement of the layer order (docs/usage.md shows it). A module may import from its own
layer or any layer before it. The most specific prefix decides a module's layer.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxtune"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("jaxtune.version", "jaxtune.runtime", "jaxtune.cache", "jaxtune.jsonl", "jaxtune.files", "jaxtune.assets",
     "jaxtune.structs", "jaxtune.faults", "jaxtune.stats"),
    ("jaxtune.model",),
    ("jaxtune.hf",),
    ("jaxtune.lora",),
    ("jaxtune.data",),
    ("jaxtune.train",),                      # the step: loss, optim, step, vocab, partition, checkpoint, metrics
    ("jaxtune.generate",),
    ("jaxtune.export",),
    ("jaxtune.eval",),
    ("jaxtune.recipe",),
    ("jaxtune.train.loop", "jaxtune.train.hooks", "jaxtune.train.plan"),   # the run
    ("jaxtune.curate",),
    ("jaxtune.pipeline",),
    ("jaxtune.cli",),
    ("jaxtune",),                            # the lazy public API: nothing inside imports it
)


def module_files(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(target: str, modules: dict) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def imports_of(name: str, path: Path, modules: dict) -> list[tuple[str, int]]:
    """`(imported jaxtune module, line)` for every import in the file, at any depth, plus string constants
    naming a jaxtune module (lazy imports by name)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.fullmatch(r"jaxtune(\.\w+)+", node.value):
                targets = [node.value]
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            head = str(node.values[0].value)
            if re.fullmatch(r"jaxtune(\.\w+)*\.", head):   # f"jaxtune.cli.{name}": the package it names into
                targets = [head.rstrip(".")]
        for t in targets:
            if t == "jaxtune" or t.startswith("jaxtune."):
                resolved = _resolve(t, modules)
                if resolved and resolved != name:
                    found.append((resolved, node.lineno))
    return found


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_architecture.py")
    return rank


def layering_violations(root: Path) -> list[str]:
    modules = module_files(root)
    bad = []
    for name, path in modules.items():
        here = layer_of(name)
        for target, line in imports_of(name, path, modules):
            if layer_of(target) > here:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {name} (layer {here}) imports {target} "
                           f"(layer {layer_of(target)}), which is above it")
    return bad


def import_cycles(root: Path) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    modules = module_files(root)
    graph = {n: sorted({t for t, _ in imports_of(n, p, modules)}) for n, p in modules.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


# ------------------------------------------------------------------------------------ one definition each

DTYPE_NAMES = {"float32", "bfloat16", "float16", "fp32", "bf16", "fp16"}
SAFETENSORS_CODES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}
BACKENDS = {"xla", "blockwise", "cpu_flash", "cudnn", "splash"}
# Concept → (how to recognise a definition, the one file allowed to hold it).
TABLES = {
    "dtype-name table": (DTYPE_NAMES, 2, "jaxtune/model/config.py"),
    "safetensors dtype-code table": (SAFETENSORS_CODES, 3, "jaxtune/hf/safetensors.py"),
    "attention-backend list": (BACKENDS, 3, "jaxtune/model/config.py"),
}
FUNCTIONS = {
    "stop-token rule": (r"(default_)?stop_(token_)?ids|eos_ids|stop_tokens", "jaxtune/generate.py"),
    "LoRA parameter count": (r"count_(lora_)?params|(num_|n_)?lora_params?(_count)?", "jaxtune/lora/apply.py"),
}


def _literal_strings(node) -> set[str]:
    if isinstance(node, ast.Dict):
        elems = [*node.keys, *node.values]
    elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        elems = node.elts
    else:
        return set()
    return {e.value for e in elems if isinstance(e, ast.Constant) and isinstance(e.value, str)}


def definitions(root: Path) -> dict[str, list[str]]:
    """Concept → every `file:line` that defines it, over the package and the scripts beside it."""
    files = sorted(root.rglob("*.py")) + sorted((root.parent / "scripts").rglob("*.py"))
    found: dict[str, list[str]] = {c: [] for c in [*TABLES, *FUNCTIONS]}
    for path in files:
        rel = path.relative_to(root.parent).as_posix()
        tree = ast.parse(path.read_text(), filename=str(path))
        # An argparse `choices=` narrows what one command accepts; it is not a second table.
        choices = {id(k.value) for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg == "choices"}
        for node in ast.walk(tree):
            strings = _literal_strings(node) if id(node) not in choices else set()
            for concept, (names, at_least, _) in TABLES.items():
                if len(strings & names) >= at_least:
                    found[concept].append(f"{rel}:{node.lineno}")
            if isinstance(node, ast.FunctionDef):
                for concept, (pattern, _) in FUNCTIONS.items():
                    if re.fullmatch(pattern, node.name.lstrip("_")):
                        found[concept].append(f"{rel}:{node.lineno}")
    return found


def duplicate_definitions(root: Path) -> list[str]:
    bad = []
    for concept, where in definitions(root).items():
        home = (TABLES.get(concept) or FUNCTIONS[concept])[-1]
        if len(where) != 1 or not where[0].startswith(home + ":"):
            bad.append(f"{concept}: defined at {where or 'nowhere'}; expected exactly one definition, in {home}")
    return bad


# ------------------------------------------------------------------------------------------------ tests


def test_every_module_has_a_layer():
    for name in module_files(PACKAGE):
        layer_of(name)


def test_imports_only_flow_down_the_layers():
    assert layering_violations(PACKAGE) == []


def test_no_import_cycles():
    assert import_cycles(PACKAGE) == []


def test_one_definition_per_concept():
    assert duplicate_definitions(PACKAGE) == []


@pytest.fixture
def package_copy(tmp_path) -> Path:
    root = tmp_path / "jaxtune"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.cc"))
    shutil.copytree(PACKAGE.parent / "scripts", tmp_path / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.mark.parametrize("where, line", [
    ("model/layers.py", "from jaxtune.train.optim import decay_mask\n"),     # module level, upward
    ("data/chat.py", "def _f():\n    from jaxtune.recipe import load_recipe\n"),   # function level, upward
    ("hf/load.py", "if False:  # TYPE_CHECKING\n    from jaxtune.cli.main import main\n"),
    ("model/config.py", "import jaxtune\n"),                                  # the lazy public API is on top
])
def test_checker_catches_an_upward_import(package_copy, where, line):
    path = package_copy / where
    path.write_text(path.read_text() + "\n" + line)
    bad = layering_violations(package_copy)
    assert len(bad) == 1 and bad[0].startswith(f"jaxtune/{where}:"), bad


def test_checker_catches_a_cycle(package_copy):
    (package_copy / "files.py").write_text((package_copy / "files.py").read_text() + "\nimport jaxtune.jsonl\n")
    (package_copy / "jsonl.py").write_text((package_copy / "jsonl.py").read_text() + "\nimport jaxtune.files\n")
    assert ["jaxtune.files", "jaxtune.jsonl"] in import_cycles(package_copy)


@pytest.mark.parametrize("where, code, concept", [
    ("cli/export.py", '_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}\n', "dtype-name table"),
    ("train/loop.py", 'DTYPES = {"float32": 1, "bfloat16": 2}\n', "dtype-name table"),
    ("hf/load.py", '_CODES = {"F32": 1, "BF16": 2, "F16": 3}\n', "safetensors dtype-code table"),
    ("recipe.py", 'IMPLS = ("xla", "blockwise", "splash")\n', "attention-backend list"),
    ("eval/forgetting.py", "def default_stop_ids(config):\n    return ()\n", "stop-token rule"),
    ("../scripts/bench/utils.py", "def lora_params(cfg, rank):\n    return 0\n", "LoRA parameter count"),
])
def test_checker_catches_a_second_definition(package_copy, where, code, concept):
    path = package_copy / where
    path.write_text(path.read_text() + "\n" + code)
    bad = duplicate_definitions(package_copy)
    assert len(bad) == 1 and bad[0].startswith(concept + ":"), bad
