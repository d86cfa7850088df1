"""Atomic file writes (temp file + rename) and hashing helpers."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``.

    On any error the temporary file is removed and ``target`` is left as it was. An
    operating-system failure while writing (a full disk) is re-raised as an OSError naming
    ``target``, also when the writer was safetensors.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _claim(target, lambda path: os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)))
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # made 0600; give the usual permissions
        os.replace(tmp, target)
    except OSError as exc:
        if exc.filename is not None and exc.filename != str(tmp):
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(target)) from None
    except SafetensorError as exc:
        first = (str(exc).strip().splitlines() or ["safetensors failed"])[0]
        full = any(s in first for s in ("StorageFull", "os error 28", "No space left"))
        if full:
            raise OSError(errno.ENOSPC, "No space left on device", str(target)) from None
        raise OSError(None, first, str(target)) from None
    finally:
        _release(tmp)


def write_text(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON's null), recursively."""
    if isinstance(obj, np.generic):  # a numpy scalar: its Python value
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {key: finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(value) for value in obj]
    return obj


def to_json(obj: Any, indent: int | None = None) -> str:
    """The one JSON encoder for everything mtl writes: strict JSON, a non-finite number becomes
    null (never a bare NaN, which JSON does not have)."""
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False)


def write_json(target: Path, obj: Any) -> None:
    write_text(target, to_json(obj, indent=2) + "\n")


def append_line(target: Path, line: str) -> None:
    """Append one line and flush it to disk (for JSONL logs read while a run goes on)."""
    with target.open("a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` in one
    step (``replace_directory``), so a reader finds the old directory or the new one, never none."""
    with scratch_dir(target.parent, target.name) as tmp:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        replace_directory(tmp, target)


@contextmanager
def scratch_dir(parent: Path, name: str) -> Iterator[Path]:
    """A private working directory ``.NAME.<random>.tmp`` in ``parent``, removed with everything
    in it when the block ends, also when it ends by an interrupt (see ``_PENDING``)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = _claim(parent / name, lambda path: os.mkdir(path, 0o700))
    try:
        yield tmp
    finally:
        _release(tmp)


# Temporary files and folders being written. A signal can stop the writer at any bytecode, also
# between creating its temporary and entering the ``try`` that removes it, or inside that
# ``finally`` before the removal; whatever is still listed when the process exits is removed
# then (``mtl``'s interrupted exit runs the exit functions too), so no interruption leaves one.
_PENDING: set[Path] = set()
# a forked child did not make its parent's temporaries: it must not remove them when it exits
os.register_at_fork(after_in_child=_PENDING.clear)


def _claim(target: Path, create: Callable[[Path], object]) -> Path:
    """A new temporary name beside ``target``, listed in ``_PENDING`` before ``create`` makes it
    (exclusively: an existing name raises FileExistsError and another is drawn)."""
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
        _PENDING.add(tmp)
        try:
            create(tmp)
            return tmp
        except FileExistsError:
            _PENDING.discard(tmp)  # someone else's: not ours to remove


def _release(tmp: Path) -> None:
    _remove(tmp)
    _PENDING.discard(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@atexit.register
def _remove_pending() -> None:
    for path in list(_PENDING):
        with contextlib.suppress(OSError):
            _release(path)


_AT_FDCWD = -100  # renameat2's "relative to the working directory"
_RENAME_EXCHANGE = 2  # renameat2's flag: swap the two names atomically


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step with Linux's renameat2(RENAME_EXCHANGE); False where
    the C library or the file system has no such call (the caller then falls back)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28, or not Linux
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def replace_directory(new: Path, old: Path) -> None:
    """Put the directory ``new`` at ``old`` (both in one directory), replacing what is there.

    Where ``old`` exists, the two names are exchanged in one atomic step (renameat2 with
    RENAME_EXCHANGE), so a reader of ``old`` sees the old directory or the new one, never
    neither; the old contents, now at ``new``, are then removed. Without that call (another
    system, a file system that lacks it) ``old`` is renamed aside, ``new`` renamed in and the
    aside copy removed: a reader may then miss ``old`` for that moment, and if the second rename
    fails the old directory is put back. Either way a failure never leaves less than there was.
    """
    if not old.exists():
        os.replace(new, old)
        return
    if _exchange(new, old):
        shutil.rmtree(new, ignore_errors=True)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{old.name}.", suffix=".old", dir=old.parent))
    os.replace(old, aside)  # onto the empty directory just made: the name is ours alone
    try:
        os.replace(new, old)
    except BaseException:
        os.replace(aside, old)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


SAMPLE = 1 << 16  # bytes read at each end of a file for its identity


def file_identity(path: Path) -> dict[str, Any]:
    """What identifies a file's content without reading all of it: its resolved path, size,
    modification time (ns), inode, and a hash of its first and last 64 KiB."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(SAMPLE))
        if stat.st_size > SAMPLE:
            handle.seek(max(SAMPLE, stat.st_size - SAMPLE))
            digest.update(handle.read(SAMPLE))
    return {
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "inode": stat.st_ino,
        "sample": digest.hexdigest(),
    }


def sha256_file_remembered(path: Path, memo: Path) -> str:
    """``sha256_file(path)``, read from ``memo`` (a JSON file) when the file's identity is the one
    recorded with it, else computed and recorded. At 10^8 rows hashing every source file on every
    run would cost more than the run; the identity catches any change of size, modification time
    or inode (rewrites, appends, copies, `git checkout`) and any change in the first or last
    64 KiB. It misses only an edit inside the file that keeps its size, its modification time
    and both ends (e.g. a tool that restores the mtime after changing a byte in the middle)."""
    identity = file_identity(path)
    try:
        entries = json.loads(memo.read_text(encoding="utf-8"))
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    known = entries.get(identity["path"])
    if isinstance(known, dict) and known.get("identity") == identity and isinstance(known.get("sha256"), str):
        return str(known["sha256"])
    digest = sha256_file(path)
    entries[identity["path"]] = {"identity": identity, "sha256": digest}
    with contextlib.suppress(OSError):  # a read-only cache directory: the hash is right, only not remembered
        write_json(memo, entries)
    return digest


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
