"""``replace_directory`` (and ``atomic_dir`` on it): a directory is replaced in one step, so a
reader always finds the old one or the new one, and a failure never leaves less than there was."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mtlcli import fileio
from mtlcli.fileio import atomic_dir, replace_directory


def directory(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "manifest.json").write_text(content)
    (path / "model.bin").write_text(content * 10)
    return path


def listing(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def in_a_new_interpreter(code: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python with ``folder`` as its argument (its exit functions run)."""
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "fallback"])
def test_the_new_directory_takes_the_place_of_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:
        monkeypatch.setattr(fileio, "_exchange", lambda first, second: False)
    old = directory(tmp_path / "bundle", "old")
    new = directory(tmp_path / ".bundle.new", "new")
    replace_directory(new, old)
    assert (old / "manifest.json").read_text() == "new" and (old / "model.bin").read_text() == "new" * 10
    assert listing(tmp_path) == ["bundle"], "neither the new name nor the old contents are left behind"


def test_a_missing_target_is_simply_created(tmp_path: Path) -> None:
    new = directory(tmp_path / ".new", "new")
    replace_directory(new, tmp_path / "bundle")
    assert listing(tmp_path) == ["bundle"] and (tmp_path / "bundle" / "manifest.json").read_text() == "new"


def test_a_failed_move_puts_the_old_directory_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the exchange, a failure of the second rename restores the old directory."""
    monkeypatch.setattr(fileio, "_exchange", lambda first, second: False)
    old = directory(tmp_path / "bundle", "old")
    new = directory(tmp_path / ".bundle.new", "new")
    real = os.replace
    calls = []

    def failing(source: object, target: object) -> None:
        calls.append((source, target))
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(target))
        real(source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(fileio.os, "replace", failing)
    with pytest.raises(OSError, match="No space left"):
        replace_directory(new, old)
    assert (old / "manifest.json").read_text() == "old" and (new / "manifest.json").read_text() == "new"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_a_reader_never_finds_the_directory_missing(tmp_path: Path) -> None:
    """A reader polling the directory during 200 replacements always finds a complete one (with
    rename-aside/rename-in it finds none now and then)."""
    target = directory(tmp_path / "bundle", "0")
    if not fileio._exchange(directory(tmp_path / "probe", "p"), target):
        pytest.skip("this file system has no atomic exchange")
    fileio._exchange(tmp_path / "probe", target)
    seen: list[str] = []
    missing = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                seen.append((target / "manifest.json").read_text())
            except FileNotFoundError:
                missing.append(1)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for version in range(1, 201):
            with atomic_dir(target) as tmp:
                (tmp / "manifest.json").write_text(str(version))
    finally:
        done.set()
        reader.join()
    assert not missing, f"the directory was missing {len(missing)} times out of {len(seen) + len(missing)}"
    assert (target / "manifest.json").read_text() == "200"
    assert listing(tmp_path) == ["bundle", "probe"]


def test_a_failure_while_building_leaves_the_old_directory(tmp_path: Path) -> None:
    target = directory(tmp_path / "bundle", "old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "manifest.json").write_text("half")
        raise RuntimeError("the export failed")
    assert (target / "manifest.json").read_text() == "old"
    assert listing(tmp_path) == ["bundle"]


def _interrupted_after(real):  # type: ignore[no-untyped-def]
    """``real`` that does its work, then is stopped as a signal would stop it right after."""

    def call(*args, **kwargs):  # type: ignore[no-untyped-def]
        real(*args, **kwargs)
        raise KeyboardInterrupt

    return call


@pytest.mark.parametrize("kind", ["file", "directory", "scratch"])
def test_a_temporary_made_just_before_an_interrupt_is_removed_at_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A signal can land between making the temporary and entering the ``try`` that removes it
    (CI once saw `mtl report` stopped by SIGTERM leave `.page.html.*.tmp`): the exit functions,
    which an interrupted `mtl` runs, remove it."""
    if kind == "file":
        monkeypatch.setattr(fileio.os, "close", _interrupted_after(os.close))
        writing = fileio.atomic_path(tmp_path / "page.html")
    else:
        monkeypatch.setattr(fileio.os, "mkdir", _interrupted_after(os.mkdir))
        writing = (
            fileio.atomic_dir(tmp_path / "bundle") if kind == "directory" else fileio.scratch_dir(tmp_path, "rows")
        )
    with pytest.raises(KeyboardInterrupt), writing:
        pass
    monkeypatch.undo()
    assert len(list(tmp_path.iterdir())) == 1, "the temporary exists until the process exits"
    fileio._remove_pending()
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_inside_the_cleanup_still_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def stopped(path: Path) -> None:
        raise KeyboardInterrupt  # the signal lands in the finally, before the removal

    monkeypatch.setattr(fileio, "_remove", stopped)
    with pytest.raises(KeyboardInterrupt), fileio.atomic_path(tmp_path / "page.html") as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer failed")
    monkeypatch.undo()
    fileio._remove_pending()
    assert list(tmp_path.iterdir()) == []


def test_exit_functions_remove_what_an_interrupted_process_left(tmp_path: Path) -> None:
    """The same through a real interpreter: the temporary is gone once the process has exited."""
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from mtlcli import fileio\n"
        "real = os.close\n"
        "def close(fd):\n"
        "    real(fd)\n"
        "    raise KeyboardInterrupt\n"
        "fileio.os.close = close\n"
        "try:\n"
        "    with fileio.atomic_path(Path(sys.argv[1]) / 'page.html'):\n"
        "        pass\n"
        "except KeyboardInterrupt:\n"
        "    fileio.os.close = real\n"
        "    assert len(os.listdir(sys.argv[1])) == 1\n"
        "    sys.exit(130)\n"
    )
    done = in_a_new_interpreter(code, tmp_path)
    assert done.returncode == 130, done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX's")
def test_a_forked_child_leaves_its_parents_temporary_alone(tmp_path: Path) -> None:
    """A child forked while the parent writes (a data-loading worker, say) may run the exit
    functions as it exits; the parent's temporary is not the child's to remove."""
    code = (
        "import atexit, os, sys\n"
        "from pathlib import Path\n"
        "from mtlcli import fileio\n"
        "with fileio.atomic_path(Path(sys.argv[1]) / 'page.html') as tmp:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        atexit._run_exitfuncs()  # what the child's interpreter runs as it exits\n"
        "        os._exit(0)\n"
        "    os.waitpid(pid, 0)\n"
        "    assert tmp.exists(), 'the child removed the parent temporary'\n"
        "    tmp.write_text('done')\n"
    )
    done = in_a_new_interpreter(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert listing(tmp_path) == ["page.html"]
    assert (tmp_path / "page.html").read_text() == "done"


def test_a_scratch_directory_goes_with_what_was_written_in_it(tmp_path: Path) -> None:
    with fileio.scratch_dir(tmp_path / "cache", "batches") as folder:
        assert folder.parent == tmp_path / "cache" and folder.name.startswith(".batches.")
        (folder / "rows.parquet").write_text("rows")
        (folder / "deeper").mkdir()
        (folder / "deeper" / "more").write_text("more")
    assert list((tmp_path / "cache").iterdir()) == []
    assert folder not in fileio._PENDING
