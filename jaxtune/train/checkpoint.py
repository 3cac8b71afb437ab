"""Run checkpoints with orbax: trainable params, optimizer state, and a JSON `meta` item (step, RNG,
data-iterator state, resolved config, provenance).

Keep-last-N *and* keep-best-by-eval-loss is `AnyPreservationPolicy([LatestN, BestN])`: with `best_fn` and
`max_to_keep` alone orbax may delete the latest step, the one a resume needs. Saves are async and atomic
(orbax writes a temporary directory and renames it when complete), so an interrupted save leaves the
previous checkpoint intact. Trees are stored as nested dicts of plain string keys, rebuilt on restore from
the live (abstract) tree's structure, so any optax state layout round-trips.

The directory may be a URL (`gs://bucket/run/checkpoints`): it is held as an `etils.epath.Path` throughout,
and on GCS orbax marks a finished step with `commit_success.txt` instead of a rename.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from jaxtune.faults import fault_at
from jaxtune.files import is_url, url_access


class CheckpointWriteError(OSError):
    """A save failed (e.g. the disk is full); the checkpoints already committed are left as they were."""

    def __init__(self, err_no: int | None, message: str):
        super().__init__(message)  # str(): the message alone, without "[Errno N]"
        self.errno = err_no


def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _names(path) -> list[str]:
    names = [_key_name(k) for k in path]
    return names[:-1] if len(names) > 1 and names[-1] == "value" else names


def to_nested(tree) -> dict:
    """Any pytree → nested dict `{name: …: leaf}` keyed by its tree path (Variable `.value` dropped)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        *head, last = _names(path) or ["_"]
        for name in head:
            node = node.setdefault(name, {})
        node[last] = leaf
    return out


def from_nested(nested: dict, like):
    """Inverse of `to_nested`, taking the structure (and Variable metadata) from `like`."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in leaves_with_path:
        node = nested
        for name in _names(path) or ["_"]:
            node = node[name]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


@contextlib.contextmanager
def _absl_quiet(level: int):
    """Raise the level of absl's logger (orbax logs through it) for the duration."""
    log = logging.getLogger("absl")
    old = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(old)


def _shapes(tree) -> dict[str, tuple]:
    return {".".join(_names(path)): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(leaf, "shape")}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def checkpoint_path(directory: str | os.PathLike) -> epath.Path:
    """`directory` as orbax takes it: the URL as written, a local path made absolute."""
    return epath.Path(directory if is_url(directory) else os.path.abspath(directory))


class Checkpointer:
    """One run's checkpoint directory (`output.checkpoint_dir`, by default `RUN/checkpoints`): local or a URL."""

    def __init__(self, directory: str | Path, *, keep_last: int = 2, keep_best: int = 0, async_save: bool = True):
        if keep_last < 1:
            raise ValueError("train.keep_last must be >= 1: a resume needs the latest checkpoint")
        keep = [policies.LatestN(n=keep_last)]
        if keep_best > 0:
            keep.append(policies.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=keep_best,
                                       keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.directory = checkpoint_path(directory)
        with url_access(self.directory):  # listing a gs:// directory needs gcsfs and google-cloud-storage
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._saving: int | None = None  # the step whose (async) write may still fail
        self._failed = False

    def save(self, step: int, trainable, opt_state, meta: dict, eval_loss: float | None = None) -> None:
        """Start saving `step` (returns once device buffers are copied; the write continues in the
        background). `eval_loss` ranks the checkpoint for keep-best. A failed write, this one's or the
        previous one's, raises `CheckpointWriteError` naming the last committed step."""
        args = ocp.args.Composite(
            trainable=ocp.args.StandardSave(to_nested(trainable)),
            opt_state=ocp.args.StandardSave(to_nested(opt_state)),
            meta=ocp.args.JsonSave(meta),
        )
        metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
        with self._writing(step):
            self._write(step, args, metrics)
        fault_at("checkpoint.mid_save", step)

    def _write(self, step: int, args, metrics) -> None:
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def _committed(self) -> int | None:
        """Latest step orbax finalized (renamed from its temporary name; on GCS, holding `commit_success.txt`)."""
        return max(ocp.utils.checkpoint_steps(self.directory), default=None)

    @contextlib.contextmanager
    def _writing(self, step: int | None):
        """Turn an OSError of a write into one line: what failed, and the checkpoint still intact."""
        if step is not None:
            self._saving = step
        try:
            yield
        except CheckpointWriteError:
            raise
        except OSError as err:
            self._failed = True
            why = os.strerror(err.errno) if err.errno else str(err)
            with contextlib.suppress(Exception):  # an earlier save still in flight may yet commit
                self.manager.wait_until_finished()
            last = self._committed()
            kept = "no checkpoint was committed yet" if last is None else \
                f"the last good checkpoint is step {last}, left intact"
            todo = "free space, then resume with --resume" if err.errno == errno.ENOSPC else "resume with --resume"
            raise CheckpointWriteError(err.errno, f"{self.directory.parent}: saving checkpoint step {self._saving} "
                                       f"failed: {why}; {kept} ({todo})") from None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        """Kept step with the lowest eval loss (from each step's meta), None if none was evaluated."""
        scored = [(m["eval_loss"], s) for s in self.all_steps()
                  if (m := self.read_meta(s)).get("eval_loss") is not None]
        return min(scored)[1] if scored else None

    def restore(self, step: int | None, trainable_like, opt_state_like):
        """`(trainable, opt_state, meta)` of `step` (default latest), placed with the shardings of the
        `*_like` trees (live arrays or ShapeDtypeStructs)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint to resume from")
        args = ocp.args.Composite(
            trainable=ocp.args.StandardRestore(to_nested(_abstract(trainable_like))),
            opt_state=ocp.args.StandardRestore(to_nested(_abstract(opt_state_like))),
            meta=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(step, args=args)
        return from_nested(out["trainable"], trainable_like), from_nested(out["opt_state"], opt_state_like), \
            out["meta"]

    def shape_mismatches(self, step: int, trainable_like) -> list[str]:
        """`name: stored (2, 64) != (8, 64)` for each trainable array whose stored shape differs from the live
        tree's (or that only one side has), read from the checkpoint's metadata without restoring anything."""
        with _absl_quiet(logging.ERROR), ocp.StandardCheckpointer() as reader:  # "no step metadata" warning
            md = reader.metadata(self.directory / str(step) / "trainable")
        tree = getattr(md, "item_metadata", md)
        stored = _shapes(getattr(tree, "tree", tree))
        live = _shapes(to_nested(trainable_like))
        return [f"{k}: stored {stored.get(k)} != {live.get(k)}" for k in sorted(stored.keys() | live.keys())
                if stored.get(k) != live.get(k)]

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        # orbax logs a failed background write with its traceback before raising it; `_writing` says it in one line
        with self._writing(None), _absl_quiet(logging.CRITICAL + 1):
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the last save and release orbax's threads; a failure already reported is not raised again."""
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self.manager.close()
            except OSError:
                if not self._failed:
                    raise


# --- provenance -------------------------------------------------------------------------------------------

_PACKAGES = ("jaxtune", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers",
             "tokenizers", "numpy")


def package_versions() -> dict[str, str | None]:
    out = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_sha(cwd: str | Path | None = None) -> str | None:
    """HEAD of the jaxtune checkout (None outside git, or before the first commit), `+dirty` if modified."""
    cwd = cwd or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if sha.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _update(h, obj) -> None:
    if isinstance(obj, dict):
        for k in sorted(obj):
            h.update(str(k).encode())
            _update(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"[%d" % len(obj))
        for x in obj:
            _update(h, x)
    elif isinstance(obj, (str, bytes)):
        h.update(obj.encode() if isinstance(obj, str) else obj)
    elif obj is None or isinstance(obj, (bool, int, float)):
        h.update(repr(obj).encode())
    else:
        arr = np.asarray(obj)
        h.update(str(arr.dtype).encode() + str(arr.shape).encode() + arr.tobytes())


def content_hash(obj) -> str:
    """sha256 of nested dicts/lists/arrays/strings: the tokenized examples a run actually trains on."""
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    return content_hash({
        "vocab": tokenizer.get_vocab(),
        "special": list(getattr(tokenizer, "all_special_tokens", [])),
        "chat_template": getattr(tokenizer, "chat_template", None),
    })


def provenance(*, data_hash: str | None = None, tokenizer=None) -> dict:
    return {
        "versions": package_versions(),
        "git_sha": git_sha(),
        "data_hash": data_hash,
        "tokenizer_hash": tokenizer_hash(tokenizer) if tokenizer is not None else None,
    }
