"""`mtl train --nproc 2` on census: the same run as one process, and nothing lost when a rank is
killed or the user presses Ctrl-C (the job ends with one message, --resume finishes it exactly)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.test_resume import checkpoint_position, records

SETTINGS = ["train.epochs=3", "train.early_stopping=null", "train.threads=1", "train.checkpoint_every=20"]


def start(run: Path, cache: Path, *extra: str, marker: str = "") -> subprocess.Popen[str]:
    from tests.conftest import REPO

    sets = [part for item in [*SETTINGS, f"data.cache_dir={cache}"] for part in ("--set", item)]
    args = ["train", "recipes/census-mmoe.yaml", "--out", str(run), "--quiet", *sets, *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "mtlcli", *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "MTL_TEST_JOB": marker},
        start_new_session=True,  # its own process group, as a job started from a shell
    )


def finished(process: subprocess.Popen[str]) -> str:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(one process, two processes, the cache) on census."""
    from tests.conftest import CENSUS

    if not CENSUS.is_file():
        pytest.skip(f"census data not found at {CENSUS}")
    base = tmp_path_factory.mktemp("ddp")
    finished(start(base / "one", base / "cache"))
    finished(start(base / "two", base / "cache", "--nproc", "2"))
    return base / "one", base / "two", base / "cache"


def test_two_processes_train_the_one_process_run(runs: tuple[Path, Path, Path]) -> None:
    one, two, _ = runs
    for a, b in zip(records(one), records(two), strict=True):
        for task in ("income", "marital"):
            assert b["train_loss"][task] == pytest.approx(a["train_loss"][task], rel=1e-5)  # type: ignore[index]
            assert b["valid"][task]["auc"] == pytest.approx(a["valid"][task]["auc"], abs=1e-4)  # type: ignore[index]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["epochs_run"] == 3 and summary["exchange"] == "ddp"
    assert json.loads((one / "summary.json").read_text())["exchange"] == "none"


def rank_pid(marker: str, rank: int) -> int | None:
    """The process of training rank ``rank`` of the job started with ``marker``."""
    for entry in Path("/proc").iterdir():
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MTL_TEST_JOB={marker}".encode() in env and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.parametrize("how", ["kill rank 1", "ctrl-c"])
def test_an_interrupted_job_ends_cleanly_and_resumes_exactly(
    how: str, runs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, done, cache = runs
    run, marker = tmp_path / "run", uuid.uuid4().hex
    process = start(run, cache, "--nproc", "2", marker=marker)
    deadline = time.monotonic() + 240
    while checkpoint_position(run)[1] == 0:  # a checkpoint inside an epoch is on disk
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    if how == "kill rank 1":
        pid = rank_pid(marker, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    else:
        os.killpg(process.pid, signal.SIGINT)  # the terminal sends Ctrl-C to the whole job
    _, err = process.communicate(timeout=120)
    assert "Traceback" not in err, err
    if how == "kill rank 1":
        assert process.returncode == 2, err
        assert "rank 1 of 2 was killed by SIGKILL" in err and "--resume" in err, err
    else:
        assert process.returncode == 130, err
        assert "--resume" in err and "--nproc 2" in err, err
    assert not (run / "summary.json").exists()
    finished(start(run, cache, "--nproc", "2", "--resume"))
    assert records(run) == records(done)
    ours, theirs = load_file(str(run / "model.safetensors")), load_file(str(done / "model.safetensors"))
    for name in ours:  # the same batches, slices and kernels: bitwise
        assert torch.equal(ours[name], theirs[name]), name


STREAMED = ["--set", "train.loading=stream", "--set", "train.shuffle_buffer=8192"]


def test_a_streamed_run_reads_a_shard_per_process_and_resumes_on_one(
    runs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Streamed, each of 2 processes reads its own shard (train.shards: auto); the run equals one
    process reading both shards, and interrupted it goes on in its order on 1 process."""
    _, _, cache = runs
    alone = tmp_path / "alone"
    finished(start(alone, cache, *STREAMED, "--set", "train.shards=2"))
    run, marker = tmp_path / "run", uuid.uuid4().hex
    process = start(run, cache, *STREAMED, "--nproc", "2", marker=marker)
    deadline = time.monotonic() + 240
    while checkpoint_position(run)[0] < 2 or checkpoint_position(run)[1] == 0:  # inside epoch 2
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    other = start(run, cache, *STREAMED, "--resume", "--set", "train.shards=1")
    _, err = other.communicate(timeout=120)
    assert other.returncode == 2 and "the run streamed its train split as 2 shards" in err, err
    finished(start(run, cache, *STREAMED, "--resume"))  # auto: the run's 2 shards, on 1 process
    assert json.loads((run / "summary.json").read_text())["train_shards"] == 2
    for a, b in zip(records(alone), records(run), strict=True):
        for task in ("income", "marital"):
            assert b["train_loss"][task] == pytest.approx(a["train_loss"][task], rel=1e-5)  # type: ignore[index]
            assert b["valid"][task]["auc"] == pytest.approx(a["valid"][task]["auc"], abs=1e-4)  # type: ignore[index]


@pytest.mark.parametrize(
    ("setting", "said"),
    [
        ("train.batch_size=255", "train.batch_size (255) does not divide evenly among the 2 processes"),
        ("train.shards=3", "train.shards: 3 shards cannot be shared evenly by 2 processes"),
    ],
)
def test_a_batch_or_shards_that_do_not_split_evenly_are_refused(tmp_path: Path, setting: str, said: str) -> None:
    from tests.conftest import REPO

    result = subprocess.run(
        [sys.executable, "-m", "mtlcli", "train", "recipes/quickstart.yaml", "--out", str(tmp_path / "run"),
         "--nproc", "2", "--set", setting, "--set", f"data.cache_dir={tmp_path}/cache"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.count(said) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "cache").exists(), "refused before any process started"


def test_under_torchrun_a_shared_error_is_said_once(tmp_path: Path) -> None:
    """Without the launcher's early check (torchrun), every rank finds the same problem: rank 0
    alone says it."""
    from tests.conftest import REPO

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "mtlcli", "train", "recipes/quickstart.yaml", "--out", str(tmp_path / "run"), "--quiet",
               "--set", "train.loading=stream", "--set", "train.shards=4", "--set", "train.batch_size=250",
               "--set", f"data.cache_dir={tmp_path}/cache"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    # (torchrun itself then reports the failed ranks with a traceback of its own)
    assert result.stderr.count("train.batch_size (250) does not divide evenly among 4 shards") == 1, result.stderr


def on_two_processes(launcher: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    """``mtl <args>`` on 2 processes started by ``mtl train --nproc`` or by torchrun."""
    from tests.conftest import REPO

    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "mtlcli", *args]  # fmt: skip
    else:
        command = [sys.executable, "-m", "mtlcli", *args, "--nproc", "2"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("launcher", ["--nproc", "torchrun"])
def test_the_data_warnings_are_said_once(tmp_path: Path, launcher: str) -> None:
    """Every rank trains on the same prepared data: its warnings (here a label withheld from the
    inputs) are said by rank 0 alone."""
    train = ["train", "recipes/quickstart.yaml", "--out", str(tmp_path / "run"), "--quiet",
             "--set", "tasks={y1: {type: regression, label: y1}}", "--set", "data.synthetic.rows=2000",
             "--set", "train.epochs=1", "--set", "train.threads=1", "--set", f"data.cache_dir={tmp_path}/cache"]  # fmt: skip
    result = on_two_processes(launcher, train)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("column 'y2' is the label or space of a task not in this recipe") == 1, result.stderr


def test_a_port_in_use_and_a_recipe_on_stdin_are_refused(tmp_path: Path) -> None:
    import socket

    from tests.conftest import REPO

    def train(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "mtlcli", "train", *args, "--out", str(tmp_path / "run"), "--nproc", "2"]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, input="")

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = train("recipes/quickstart.yaml", "--port", str(port))
    assert result.returncode == 2 and f"--port {port}: the port is in use" in result.stderr, result.stderr
    result = train("-")
    assert result.returncode == 2 and "give a file, not '-'" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
@pytest.mark.parametrize("nproc", [1, 2])
def test_device_cuda_without_a_gpu_is_refused_before_any_work(tmp_path: Path, nproc: int) -> None:
    from tests.conftest import REPO

    command = [sys.executable, "-m", "mtlcli", "train", "recipes/quickstart.yaml", "--out", str(tmp_path / "run"),
               "--set", "train.device=cuda", "--set", f"data.cache_dir={tmp_path}/cache", "--nproc", str(nproc)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("train.device: cuda, and torch") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # nothing preprocessed


# --- the launcher's report: the cause first, in whole sentences, once ---------------------------------


def test_the_launcher_names_the_cause_not_the_ranks_that_then_lost_it() -> None:
    from mtlcli.train.launch import INTERRUPTED, LOST_PEER, SAID, RankFailed, outcome

    def said(failures: dict[int, tuple[int, float]], nproc: int = 2) -> str:
        with pytest.raises(RankFailed) as caught:
            outcome(failures, nproc, lambda: "what the run left")
        assert caught.value.hint == "what the run left"
        return caught.value.message

    # rank 0 noticed first, rank 1 was the cause
    assert said({0: (LOST_PEER, 5.0), 1: (-signal.SIGKILL, 7.0)}) == (
        "rank 1 of 2 was killed by SIGKILL; the other ranks were stopped"
    )
    assert said({0: (INTERRUPTED, 1.0), 1: (-signal.SIGTERM, 1.0), 2: (1, 2.0)}, 3).startswith("rank 2 of 3 exited")
    assert said({0: (1, 3.0), 1: (1, 4.0)}).startswith("rank 0 of 2 exited with code 1;")  # two crashes: the first
    assert outcome({0: (SAID, 1.0), 1: (SAID, 1.0)}, 2, str) == SAID  # they said why themselves
    assert outcome({0: (SAID, 1.0), 1: (LOST_PEER, 1.0)}, 2, str) == SAID
    assert outcome({0: (INTERRUPTED, 1.0), 1: (LOST_PEER, 1.0)}, 2, str) == INTERRUPTED


def test_a_lost_rank_is_said_in_a_whole_sentence() -> None:
    from mtlcli.train.launch import lost_peer

    gloo = (
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:34190: "
        "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application "
        "code that cause workers to exit or hang.\nException raised from ..."
    )
    said = lost_peer(0, RuntimeError(gloo), "nothing kept")
    assert (
        said.message == "rank 0 lost another rank of the run: Read error [127.0.0.1]:34190: Connection reset by peer."
    )
    long = "x" * 300
    assert said.hint is not None and said.hint.endswith("; nothing kept")
    assert lost_peer(1, RuntimeError(long), "").message.endswith(long)  # never cut
    assert lost_peer(1, RuntimeError(""), "").message.endswith(": RuntimeError")


def kill_a_rank(tmp_path: Path, rank: int, checkpointed: bool = True) -> tuple[int, str]:
    """quickstart on 2 processes, rank ``rank`` killed once a checkpoint is written (or, not
    ``checkpointed``, as soon as it runs): (exit code, stderr)."""
    from tests.conftest import REPO

    marker, run = uuid.uuid4().hex, tmp_path / "run"
    sets = ["train.epochs=500", "train.early_stopping=null", "train.threads=1", f"data.cache_dir={tmp_path}/cache"]
    command = [sys.executable, "-m", "mtlcli", "train", "recipes/quickstart.yaml", "--out", str(run), "--quiet",
               "--nproc", "2", *(part for item in sets for part in ("--set", item))]  # fmt: skip
    env = {**os.environ, "MTL_TEST_JOB": marker}
    process = subprocess.Popen(command, cwd=REPO, text=True, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while (pid := rank_pid(marker, rank)) is None or (checkpointed and not (run / "checkpoint.safetensors").is_file()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


@pytest.mark.parametrize("rank", [0, 1])
def test_a_killed_rank_is_named_first_and_once(tmp_path: Path, rank: int) -> None:
    code, err = kill_a_rank(tmp_path, rank)
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith(f"error: rank {rank} of 2 was killed by SIGKILL; the other ranks were stopped\n"), err
    assert err.count("error:") == 1, err
    assert f"hint: the run's last checkpoint is kept in {tmp_path / 'run'}" in err, err


def test_a_rank_killed_before_any_checkpoint_leaves_nothing_and_says_so(tmp_path: Path) -> None:
    """Rank 0, which writes the run, killed before it could clean up: the launcher removes what
    the run made and does not promise a checkpoint."""
    code, err = kill_a_rank(tmp_path, 0, checkpointed=False)
    assert code == 2 and err.startswith("error: rank 0 of 2 was killed by SIGKILL"), err
    assert "hint: the run wrote no checkpoint, so nothing of it is kept" in err and "is kept in" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("launcher", ["--nproc", "torchrun"])
def test_resume_without_a_checkpoint_on_two_processes_is_said_once(tmp_path: Path, launcher: str) -> None:
    """The resume checks are the plan's: resolved once (in the parent of --nproc, by rank 0 under
    torchrun) and said once."""
    train = ["train", "recipes/quickstart.yaml", "--out", str(tmp_path / "run"), "--resume", "--quiet",
             "--set", f"data.cache_dir={tmp_path}/cache"]  # fmt: skip
    result = on_two_processes(launcher, train)
    assert result.returncode != 0 and result.stderr.count("no checkpoint to resume from") == 1, result.stderr
    if launcher == "--nproc":  # (torchrun reports the failed ranks with a traceback of its own)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
