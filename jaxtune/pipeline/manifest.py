"""Stage manifests: what a stage read, ran with and wrote, so a re-run can skip it.

A stage's key hashes its inputs (the files it reads, by content), the model and tokenizer files, the
teacher, the jaxtune code (every source file of the package, so an uncommitted edit counts too) and its
config. A stage whose `manifest.json` holds the same key and whose outputs still hash as recorded is
skipped. Outputs are the files a later stage or a user reads; logs (metrics with timings, TensorBoard
events) are listed apart and are not part of the identity, so a re-run is byte-identical where it matters.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path

from jaxtune.files import MARKER
from jaxtune.version import __version__

MANIFEST = "manifest.json"
# The training run inside a tune stage (checkpoints, metrics, its own config with temp paths) is a log too.
# Measured wall times (`timing.json`) and the HTML page that shows them vary run to run: they must exist for a
# stage to count as done, but are not part of its identity.
VIEWS = ("timing.json", "report.html")
LOG_NAMES = ("metrics.jsonl", "tensorboard", "checkpoints", "train-run", MARKER, MANIFEST, *VIEWS)


def file_sha256(path: Path) -> str:
    """A file's content hash, computed once per process per (file, size, modification time): a run checks a
    stage's outputs and then hashes the same files as the next stage's inputs (an 8B merged model is 16 GB)."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_hashes(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """`{relative path: sha256}` of every file under `root` (or `root` itself), skipping names in `skip` at
    any depth; sorted, so the same tree always gives the same mapping."""
    root = Path(root)
    if root.is_file():
        return {root.name: file_sha256(root)}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part in skip for part in rel.parts):
            out[rel.as_posix()] = file_sha256(p)
    return out


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@functools.cache
def code_identity() -> dict:
    """The jaxtune version, its git commit when run from a checkout, and a hash of its source files."""
    pkg = Path(__file__).resolve().parents[1]
    sources = {p.relative_to(pkg).as_posix(): file_sha256(p) for p in sorted(pkg.rglob("*"))
               if p.is_file() and p.suffix in (".py", ".jsonl", ".jinja", ".cc")}
    try:
        commit = subprocess.run(["git", "-C", str(pkg), "rev-parse", "HEAD"], check=False, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"version": __version__, "commit": commit, "sources_sha256": digest(sources)}


@functools.cache
def model_identity(model_dir: str) -> dict:
    """Hashes of a model directory's weights, config and tokenizer files."""
    root = Path(model_dir)
    if not root.is_dir():
        return {"path": model_dir}
    files = {p.name: file_sha256(p) for p in sorted(root.iterdir()) if p.is_file()
             and (p.suffix in (".safetensors", ".json", ".model", ".txt", ".jinja") or p.name == "tokenizer.model")}
    return {"path": str(root), "files": files}


def stage_key(*, stage: str, round_: int, inputs: dict[str, str], model: dict, teacher: dict | None,
              config: dict) -> str:
    code = code_identity()
    return digest({"stage": stage, "round": round_, "inputs": inputs, "model": model, "teacher": teacher,
                   "config": config, "code": code["sources_sha256"], "version": code["version"]})


def read_manifest(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_current(stage_dir: Path, key: str) -> bool:
    """Whether the stage directory holds a finished run with this key and untouched outputs."""
    man = read_manifest(stage_dir)
    if man is None or man.get("key") != key:
        return False
    if not all((Path(stage_dir) / name).is_file() for name in man.get("views", [])):
        return False
    return tree_hashes(stage_dir, LOG_NAMES) == man.get("outputs")


def write_manifest(stage_dir: Path, **fields) -> dict:
    """Write `manifest.json` with the output hashes of everything now in `stage_dir` (logs aside)."""
    from jaxtune.files import write_text_atomic

    man = {**fields, "code": code_identity(), "outputs": tree_hashes(stage_dir, LOG_NAMES),
           "views": [name for name in VIEWS if (Path(stage_dir) / name).is_file()]}
    write_text_atomic(Path(stage_dir) / MANIFEST, json.dumps(man, indent=1, sort_keys=True) + "\n")
    return man
