"""`mtl train --nproc N`: start N local training processes through torch's own launcher (the
machinery behind ``torchrun``), and tell the user in one line what became of them."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Mapping

from mtlcli.errors import MtlError
from mtlcli.train.rundir import RunPlace, settle

INTERRUPTED = 130
SAID = 2  # a rank said what went wrong itself (an error message), the CLI's exit code for errors
LOST_PEER = 3  # a rank stopped because another rank of the run went away: a consequence, never the cause
LAUNCHED_BY = "MTL_LAUNCHER"  # set in the ranks that `mtl train --nproc` starts: it names the failed rank


class RankFailed(MtlError):
    """A training process died or failed; the others were stopped."""


class LostPeer(MtlError):
    """A rank's collective failed because another rank of the run went away."""


def under_launcher() -> bool:
    """Whether this process is a rank that `mtl train --nproc` started: when it loses another rank
    it exits with ``LOST_PEER`` and says nothing, the launcher says which rank went first."""
    return os.environ.get(LAUNCHED_BY) == "1"


def lost_peer(rank: int, exc: BaseException, kept: str) -> LostPeer:
    """What rank ``rank`` says when a collective failed (``exc``, e.g. gloo's "Connection reset by
    peer") under another launcher (torchrun): the transport's first sentence, whole, without the
    source location it starts with; ``kept`` says what the run left (``rundir.kept``)."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    if line.startswith("[") and "] " in line:  # gloo: "[.../pair.cc:537] Read error ..."
        line = line.split("] ", 1)[1]
    end = line.find(". ")
    sentence = line[: end + 1] if end >= 0 else line
    return LostPeer(
        f"rank {rank} lost another rank of the run: {sentence}",
        f"the launcher's report says which rank stopped first and why; {kept}",
    )


def check_port(port: int) -> None:
    """A clear error when ``port`` on localhost is taken (the ranks meet there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise MtlError(
                f"--port {port}: the port is in use on this machine ({exc.strerror})",
                "choose another port, or leave --port out to let the ranks use a free one",
            ) from None


def launch(nproc: int, args: list[str], place: RunPlace, port: int | None = None) -> int:
    """Run ``python -m mtlcli <args>`` on ``nproc`` local ranks (gloo; on localhost:``port``, or a
    free port) training into ``place``; the exit code of the job: 0, 130 when interrupted, 2 when
    the ranks stopped on an error they printed themselves. A rank that died raises ``RankFailed``
    naming it, and what the run left is settled (``rundir.settle``: rank 0 may have had no time to)
    and said."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for name in list(logging.root.manager.loggerDict):  # the launcher's own notes: we say what failed
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # each rank sets its threads from train.threads
    where = ["--standalone"]
    if port is not None:
        check_port(port)
        where = ["--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={port}"]
    options = get_args_parser().parse_args([*where, f"--nproc-per-node={nproc}", "-m", "mtlcli", *args])
    os.environ[LAUNCHED_BY] = "1"
    try:
        run(options)
    except ChildFailedError as exc:
        failures = {rank: (f.exitcode, f.timestamp) for rank, f in exc.failures.items()}
        return outcome(failures, nproc, lambda: settle(place))
    except (KeyboardInterrupt, SignalException):  # the user's Ctrl-C or kill: the ranks checkpoint and stop
        return INTERRUPTED
    finally:
        del os.environ[LAUNCHED_BY]
    return 0


CONSEQUENCES = (INTERRUPTED, LOST_PEER, -signal.SIGTERM)  # stopped by the launcher or the user, or lost a rank


def outcome(failures: Mapping[int, tuple[int, float]], nproc: int, kept: Callable[[], str]) -> int:
    """The job's exit code from its failed ranks' (exit code, time): 2 when the ranks stopped on an
    error they said themselves, 130 when they were interrupted; otherwise ``RankFailed`` names the
    cause, the first rank that failed on its own (killed, or crashed), never one that then lost it
    or was stopped, with what the run left (``kept()``) as its hint."""
    causes = {rank: failure for rank, failure in failures.items() if failure[0] not in CONSEQUENCES}
    unsaid = {rank: failure for rank, failure in causes.items() if failure[0] != SAID}
    if causes and not unsaid:
        return SAID
    if not causes and any(code != LOST_PEER for code, _ in failures.values()):
        return INTERRUPTED
    first = unsaid or failures  # every rank lost another, which left without an error: name the first
    rank = min(first, key=lambda r: (first[r][1], r))
    raise RankFailed(f"rank {rank} of {nproc} {describe(first[rank][0])}; the other ranks were stopped", kept())


def describe(code: int) -> str:
    """What became of a rank that exited with ``code`` (negative: killed by that signal)."""
    if code == LOST_PEER:
        return "lost another rank of the run"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
