"""Writing export directories safely: a directory appears whole or not at all, and nothing jaxtune did not
write is ever deleted.

An export goes to a temp dir `.NAME.tmp-TAG` beside the target, holding a marker file (`MARKER`) from its
first instant, and is then swapped in. POSIX rename cannot replace a non-empty directory, so the swap is an
atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`): the old or the new export is under the name at every
instant. Where the filesystem lacks it, two renames via `.NAME.old-TAG` are used and `recover` (run before
every export) finishes a swap cut between them. A live writer holds a `flock` on its temp dir, so recovery
never removes another process's work in progress.

A URL target (`gs://bucket/…`, anything `etils.epath` reads) has no rename to swap with: the directory is
written to a local temp dir (under `$TMPDIR`), then copied up file by file, with the marker saying `complete:
false` first and `complete: true` last, so a cut upload is recognisable and the next export replaces it. Only
entries a previous jaxtune export there listed in its marker are ever removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import uuid
from pathlib import Path

from jaxtune.faults import fault_point
from jaxtune.version import __version__

MARKER = ".jaxtune-export.json"  # in every directory jaxtune exports: what, when, which entries it wrote
_MAX_CHECKED = 10_000  # entries walked before a forced replace gives up looking for run directories
_FULL = (errno.ENOSPC, errno.EDQUOT)


URL_PACKAGES = "gs:// needs `pip install gcsfs google-cloud-storage`"


def is_url(path) -> bool:
    """`gs://bucket/…` and other `scheme://` locations (read and written through `etils.epath`)."""
    return isinstance(path, (str, os.PathLike)) and "://" in os.fspath(path)


def as_path(path: str | os.PathLike):
    """`etils.epath.Path` for a URL, `pathlib.Path` otherwise: `Path("gs://b/x")` would read `gs:/b/x`."""
    if is_url(path):
        from etils import epath

        return epath.Path(path)
    return Path(path)


@contextlib.contextmanager
def url_access(path):
    """A URL's filesystem package missing (`gs://` without gcsfs) becomes one OSError saying what to install."""
    try:
        yield
    except ImportError as e:
        raise OSError(f"{path}: {e}; {URL_PACKAGES}, or use a local path") from None


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temp file beside it and a rename: a kill leaves the old file or the
    new one, never half of either."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _say(msg: str) -> None:
    print(f"[jaxtune] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- the target


def _read_marker(path: Path) -> dict | None:
    try:
        raw = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) and "jaxtune_export" in raw else None


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", … ({len(names)} entries)" if len(names) > limit else "")


def _is_run_dir(path: Path) -> bool:
    return (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file()


def _walk_for_protected(out: Path) -> None:
    """Refuse a tree holding a run directory or a git checkout, or too large to look through."""
    seen = 0
    for root, dirs, names in os.walk(out):
        here = Path(root)
        if _is_run_dir(here):
            raise ValueError(f"export target {out} is or contains the run directory {here} (it has checkpoints/ or "
                             "metrics.jsonl); jaxtune never replaces one; choose a new --out directory")
        if ".git" in dirs or ".git" in names:
            raise ValueError(f"export target {out} contains the git checkout {here}; choose a new --out directory")
        seen += len(dirs) + len(names)
        if seen > _MAX_CHECKED:
            raise ValueError(f"export target {out} holds more than {_MAX_CHECKED} entries; jaxtune will not replace "
                             "it; remove it yourself or choose a new --out directory")


def _refuse_non_export_dir(out) -> None:
    """An existing target that is a file or a run directory is never replaced."""
    if not out.is_dir():
        raise ValueError(f"export target {out} exists and is not a directory; choose a new --out directory")
    if _is_run_dir(out):
        raise ValueError(f"export target {out} is a run directory (it has checkpoints/ or metrics.jsonl); jaxtune "
                         "never replaces one; choose a new --out directory")


def check_target(out: str | Path, *, force: bool = False, protect: dict[str, str | Path | None] | None = None) -> bool:
    """Raise ValueError unless `out` (resolved) may be replaced: absent, empty, a previous jaxtune export
    holding only what it wrote, or (with `force`) any directory that is not read-only and is not, and does
    not contain, the current directory, a run directory or a `protect` path (label → path). True if it exists.
    A URL target is checked by `_check_remote`."""
    if is_url(out):
        return _check_remote(as_path(out), force=force, protect=protect) is not None
    out = Path(out).resolve()
    checks = {"the current directory": Path.cwd(), "your home directory": os.path.expanduser("~"), **(protect or {})}
    for label, path in checks.items():
        if path is None:
            continue
        path = Path(path).resolve()
        if out == path or out in path.parents:
            what = "is" if out == path else "contains"
            raise ValueError(f"export target {out} {what} {label} ({path}); choose a new --out directory")
    if not out.exists():
        return False
    _refuse_non_export_dir(out)
    if not os.access(out, os.W_OK) or not out.stat().st_mode & stat.S_IWUSR:
        raise ValueError(f"export target {out} is read-only; make it writable (chmod u+w) or choose a new --out "
                         "directory")
    entries = [p.name for p in out.iterdir()]
    marker = _read_marker(out)
    if not entries:
        return True
    if marker is not None:
        extra = [n for n in entries if n != MARKER and n not in set(marker.get("files") or ())]
        if not extra:
            return True
        if not force:
            raise ValueError(f"export target {out} holds files the previous jaxtune export there did not write "
                             f"({_listing(extra)}); move them out, or pass --force to replace the directory")
    elif not force:
        raise ValueError(f"export target {out} is not empty and not a jaxtune export (it holds {_listing(entries)}); "
                         "choose a new --out directory, or pass --force to replace it")
    _walk_for_protected(out)
    return True


# ------------------------------------------------------------------------------------------- the swap


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _renameat2() if sys.platform.startswith("linux") else None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the OS or filesystem cannot (then nothing changed)."""
    if _RENAMEAT2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _RENAMEAT2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {b} into place: {os.strerror(err)}", str(b))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Delete a directory jaxtune swapped out, its marker last, so a kill midway leaves a dir `recover` removes."""
    if not path.exists():
        return
    with contextlib.suppress(OSError):
        if _read_marker(path) is None:
            (path / MARKER).write_text(json.dumps({"jaxtune_export": "discard"}))
    for child in path.iterdir():
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink(missing_ok=True)
    (path / MARKER).unlink(missing_ok=True)
    path.rmdir()


def _discard_previous(path: Path) -> None:
    try:
        _discard(path)
    except OSError as e:
        _say(f"exported, but could not remove the previous contents now at {path}: {e}; remove it yourself")


def _swap_in(tmp: Path, out: Path, existed: bool) -> None:
    fault_point("export.before_swap")
    if not existed:
        os.rename(tmp, out)  # fails on a non-empty directory created meanwhile: nothing is lost
    else:
        with dir_lock(out):  # waits for a concurrent export that is still removing what it swapped out
            _replace(tmp, out)
    _fsync_dir(out.parent)


def _replace(tmp: Path, out: Path) -> None:
    if _exchange(tmp, out):
        fault_point("export.after_swap")
        _discard_previous(tmp)
        return
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
    os.rename(out, old)
    fault_point("export.between_renames")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    fault_point("export.after_swap")
    _discard_previous(old)


@contextlib.contextmanager
def dir_lock(path: Path, blocking: bool = True):
    """Hold an exclusive flock on a directory; yields False (without waiting) if another process holds it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def recover(out_dir: str | Path) -> None:
    """Finish or roll back a swap cut short beside `out_dir`, and remove jaxtune's stale temp dirs there
    (named `.NAME.tmp-TAG`/`.NAME.old-TAG` and holding the marker or nothing); other processes' live ones stay."""
    out = Path(out_dir).resolve()
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-([0-9a-f]{{8}})")
    found = {m.groups(): out.parent / m.group(0) for p in out.parent.iterdir() if (m := pattern.fullmatch(p.name))}
    for (kind, tag), path in sorted(found.items(), key=lambda kv: kv[0][0]):  # "old" before "tmp"
        if not path.is_dir() or path.is_symlink():
            continue
        try:
            with dir_lock(found.get(("tmp", tag), path), blocking=False) as free:
                if free:
                    _recover_one(out, kind, path, found.get(("tmp", tag)))
        except FileNotFoundError:  # another process finished with it meanwhile
            continue


def _recover_one(out: Path, kind: str, path: Path, new: Path | None) -> None:
    if kind == "old" and not out.exists():  # cut between the two renames of the fallback swap
        done = new is not None and new.is_dir() and (_read_marker(new) or {}).get("complete")
        os.rename(new if done else path, out)
        _say(f"{'finished' if done else 'rolled back'} an interrupted export swap at {out}")
        if not done:
            return
    if _read_marker(path) is not None or not any(path.iterdir()):
        _discard(path)
    else:
        _say(f"left {path} in place: it is named like jaxtune's temp dirs but has no {MARKER}")


# ------------------------------------------------------------------------------------------- the context


def _marker_text(kind: str, complete: bool, files: list[str]) -> str:
    info = {"jaxtune_export": kind, "jaxtune_version": __version__, "complete": complete,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
    return json.dumps(info, indent=2) + "\n"


def _write_marker(tmp: Path, kind: str, complete: bool) -> None:
    files = sorted(p.name for p in tmp.iterdir() if p.name != MARKER)
    with open(tmp / MARKER, "w") as f:
        f.write(_marker_text(kind, complete, files))
        if complete:
            f.flush()
            os.fsync(f.fileno())


def _sync_tree(tmp: Path) -> None:
    for p in tmp.rglob("*"):
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(tmp)


def _full_disk(e: OSError, out: Path, existed: bool) -> OSError:
    kept = f"the previous export at {out} is intact" if existed else f"nothing was written to {out}"
    err = OSError(f"disk full while exporting to {out} ({e.strerror or e}); {kept} and the partial files were "
                  "removed; free space and export again")
    err.errno = e.errno  # strerror/filename left unset: they would replace the message in str(err)
    return err


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, *, kind: str = "export", force: bool = False,
               protect: dict[str, str | Path | None] | None = None):
    """Yield a fresh temp dir beside `out_dir`; on success it replaces `out_dir` atomically, on any error it
    is deleted and `out_dir` is untouched. Refuses (ValueError, before writing) a target that `check_target`
    does not allow; `kind` is recorded in the marker so a later export recognises its own directory. A URL
    target is written locally, then uploaded (`_uploaded_dir`)."""
    if is_url(out_dir):
        with _uploaded_dir(as_path(out_dir), kind=kind, force=force, protect=protect) as tmp:
            yield tmp
        return
    out = Path(out_dir).resolve()
    recover(out)
    check_target(out, force=force, protect=protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    swapped = False
    with dir_lock(tmp):
        try:
            _write_marker(tmp, kind, complete=False)
            yield tmp
            _write_marker(tmp, kind, complete=True)
            _sync_tree(tmp)
            existed = check_target(out, force=force, protect=protect)  # again: it may have changed meanwhile
            _swap_in(tmp, out, existed)
            swapped = True
        except OSError as e:
            if e.errno in _FULL:
                raise _full_disk(e, out, out.exists()) from None
            raise
        finally:
            if not swapped and tmp.exists():
                _discard(tmp)


# ------------------------------------------------------------------------------------------- URL targets


def _check_remote(out, *, force: bool, protect: dict[str, str | Path | None] | None) -> list[str] | None:
    """What a URL target's previous jaxtune export wrote there (`[]` for an empty directory; None if absent).
    Refuses (ValueError) a file, a run directory, a `protect` path, and entries no jaxtune export listed unless
    `force`, which writes beside them: nothing jaxtune did not write is removed."""
    for label, path in (protect or {}).items():
        if path is not None and is_url(path):
            p, o = str(path).rstrip("/"), str(out).rstrip("/")
            if o == p or p.startswith(o + "/"):
                raise ValueError(f"export target {out} {'is' if o == p else 'contains'} {label} ({path}); choose a "
                                 "new --out directory")
    with url_access(out):
        if not out.exists():
            return None
        _refuse_non_export_dir(out)
        entries = [p.name for p in out.iterdir()]
        marker = _read_marker(out)
    listed = sorted(set((marker or {}).get("files") or ()))
    extra = [n for n in entries if n != MARKER and n not in listed]
    if extra and not force:
        what = "the previous jaxtune export there did not write" if marker else "no jaxtune export wrote"
        raise ValueError(f"export target {out} holds files {what} ({_listing(extra)}); move them out, or pass "
                         "--force to write beside them (jaxtune never deletes them)")
    if extra:
        _say(f"writing beside {len(extra)} entries of {out} that jaxtune did not write ({_listing(extra)}); "
             "left as they are")
    return listed


@contextlib.contextmanager
def _uploaded_dir(out, *, kind: str, force: bool, protect: dict[str, str | Path | None] | None):
    """Yield a local temp dir; on success copy it up to the URL `out` (see the module docstring)."""
    _check_remote(out, force=force, protect=protect)
    with tempfile.TemporaryDirectory(prefix=f"jaxtune-{out.name}-") as staging:
        tmp = Path(staging)
        yield tmp
        previous = _check_remote(out, force=force, protect=protect) or []  # again: it may have changed meanwhile
        with url_access(out):
            _upload(tmp, out, kind, previous)


def _upload(tmp: Path, out, kind: str, previous: list[str]) -> None:
    """Copy `tmp` into `out` file by file: first a marker `complete: false` naming every entry jaxtune may leave
    there (so an upload cut short is replaced by the next export), then the files, then the removal of the
    previous export's entries not written again, and the marker `complete: true` last."""
    files = sorted(p.name for p in tmp.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(_marker_text(kind, False, sorted(set(files) | set(previous))))
    for src in sorted(tmp.rglob("*")):
        dst = out / src.relative_to(tmp).as_posix()
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            continue
        with open(src, "rb") as f, dst.open("wb") as g:
            shutil.copyfileobj(f, g, 16 << 20)
    for name in sorted(set(previous) - set(files)):
        stale = out / name
        if stale.is_dir():
            stale.rmtree()
        elif stale.exists():
            stale.unlink()
    (out / MARKER).write_text(_marker_text(kind, True, files))
