"""Where a run's files go: the run directory claimed, locked, and replaced only by a complete run.

``--out R`` names the run directory. A new run into an absent or empty ``R`` trains in place. A new
run that replaces a run already in ``R`` (``--force``) trains beside it, in ``.R.replacing``, and
takes ``R``'s place in one step (``fileio.replace_directory``) only when it is complete: until then
``R`` holds the old run whole. A failed or interrupted run never leaves less than there was: what
it keeps (its last checkpoint, the old run) is said in the error's hint. ``--resume`` continues
the run of ``R``, or the replacement waiting beside it when there is one (it is the newer run). A
finished run (``summary.json``) resumed for more epochs is continued in a copy beside it, which
takes its place when complete: until then ``R`` is the finished run, whole.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mtlcli.errors import ArtifactError, MtlError
from mtlcli.fileio import replace_directory

CHECKPOINT = "checkpoint.safetensors"
FINISHED = "summary.json"  # written last: its presence marks a finished run
GRADIENTS = "gradients.jsonl"  # train.track_gradients samples
EXPLAINED = "explain.json"  # a saved `mtl explain --json`, which `mtl report` reads
TENSORBOARD_DIR = "tensorboard"  # the TensorBoard tracker's event files
RUN_FILES = (
    "recipe.yaml",
    "schema.json",
    "model.safetensors",
    "metrics.jsonl",
    FINISHED,
    CHECKPOINT,
    GRADIENTS,
    EXPLAINED,
    TENSORBOARD_DIR,
)


def replacement(path: Path) -> Path:
    """Where a run that replaces the run of ``path`` trains until it is complete."""
    return path.parent / f".{path.name}.replacing"


@dataclass(frozen=True)
class RunPlace:
    """A run directory, resolved once before any work.

    ``path`` is the ``--out`` directory; ``work`` where this run writes (``path``, or its
    ``replacement`` while a finished run is in ``path``); ``made`` whether this run creates
    ``path`` (a failure before the first checkpoint then removes it again).
    """

    path: Path
    work: Path
    resume: bool
    made: bool

    @property
    def replacing(self) -> bool:
        return self.work != self.path

    @property
    def checkpoint(self) -> Path:
        """The checkpoint a resumed run continues from: its own, or (a finished run continued in
        a copy not made yet) the finished run's."""
        own = self.work / CHECKPOINT
        return own if own.is_file() or not self.resume else self.path / CHECKPOINT


def check_run_dir(run_dir: Path, force: bool) -> None:
    """Refuse a run directory that holds anything, unless ``force`` and it is an mtl run
    (``--force`` never deletes a directory that is not a run, such as the working directory)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ArtifactError(f"{run_dir}: exists and is not a directory", "choose another --out")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not force:
            raise ArtifactError(
                f"{run_dir}: the run directory exists and is not empty",
                "choose another --out, or pass --force to replace it",
            )
        entries = {p.name for p in run_dir.iterdir()}
        looks_like_run = bool(entries & set(RUN_FILES)) and all(n in RUN_FILES or n.startswith(".") for n in entries)
        if not looks_like_run:
            raise ArtifactError(
                f"{run_dir}: --force only replaces an mtl run directory, and this one holds other files",
                "choose another --out",
            )


def resolve_run_dir(path: Path, force: bool, resume: bool) -> RunPlace:
    """The one check of ``--out`` (with ``--force`` / ``--resume``), before any work."""
    if resume:
        pending = replacement(path)
        if not (pending / CHECKPOINT).is_file() and not (path / CHECKPOINT).is_file():
            raise ArtifactError(f"{path}: no checkpoint to resume from", "train it without --resume")
        finished = (path / FINISHED).is_file()  # continued in a copy: the finished run stays whole until then
        work = pending if (pending / CHECKPOINT).is_file() or finished else path
        return RunPlace(path, work, resume=True, made=False)
    check_run_dir(path, force)
    occupied = path.is_dir() and any(path.iterdir())
    return RunPlace(path, replacement(path) if occupied else path, resume=False, made=not path.exists())


@contextmanager
def claimed(place: RunPlace) -> Iterator[None]:
    """Hold ``place`` for one training: locked; on success a replacement takes the old run's
    place; on any failure what is kept is decided (``settle``) and said in the error's hint."""
    with run_lock(place.path):
        if place.replacing and not (place.resume and (place.work / CHECKPOINT).is_file()):
            shutil.rmtree(place.work, ignore_errors=True)  # an earlier replacement, never finished
            if place.resume:  # a finished run continued for more epochs: in a copy beside it
                shutil.copytree(place.path, place.work, ignore=shutil.ignore_patterns(FINISHED))
        place.work.mkdir(parents=True, exist_ok=True)
        try:
            yield
        except BaseException as exc:
            kept = settle(place)
            if isinstance(exc, MtlError):
                exc.hint = f"{exc.hint}; {kept}" if exc.hint else kept
            raise
        if place.replacing:
            replace_directory(place.work, place.path)


def settle(place: RunPlace) -> str:
    """After a failed or interrupted run: keep its checkpoint if it wrote one, else remove what it
    made (never the run it was replacing). Returns what was kept (``kept``), said to the user."""
    if not (place.work / CHECKPOINT).is_file():
        if place.replacing:
            shutil.rmtree(place.work, ignore_errors=True)
        elif place.made:
            shutil.rmtree(place.path, ignore_errors=True)
        elif place.path.is_dir():
            for entry in place.path.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return kept(place)


def kept(place: RunPlace) -> str:
    """What a failed run of ``place`` leaves, as its hint says it: its last checkpoint when it
    wrote one, and the run it was replacing."""
    before = f"the previous run in {place.path} is unchanged"
    if (place.work / CHECKPOINT).is_file():
        again = f"`mtl train ... --out {place.path} --resume` continues it"
        if place.replacing:
            return f"{before}; the new run's last checkpoint is kept beside it in {place.work}: {again}"
        return f"the run's last checkpoint is kept in {place.work}: {again}"
    if place.replacing:
        return f"{before} (the new run wrote no checkpoint)"
    return "the run wrote no checkpoint, so nothing of it is kept"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on a run directory: a sibling ``.NAME.lock`` file holding the owner's pid,
    removed when the lock is released.

    Removing a lock file can let two processes hold "the" lock at once (one locked the old file
    just before it was unlinked, another creates a new one), so the lock is only taken on a file
    that is still the one at the path (same inode after ``flock``; else try again), and the owner
    unlinks it while still holding the lock.
    """
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir.parent / f".{run_dir.name}.lock"
    while True:
        handle = lock_path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise ArtifactError(
                f"{run_dir}: another mtl process (pid {owner}) is training into this run directory",
                "wait for it to finish, or choose another --out",
            ) from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # the previous owner removed this file after we opened it: take the new one
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
