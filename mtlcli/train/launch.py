"""`mtl train --nproc N`: start N local training processes through torch's own launcher (the
machinery behind ``torchrun``), and tell the user in one line what became of them."""

from __future__ import annotations

import os
import signal
import socket

from mtlcli.errors import MtlError

INTERRUPTED = 130


class RankFailed(MtlError):
    """A training process died or failed; the others were stopped."""


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


def launch(nproc: int, args: list[str], port: int | None = None) -> int:
    """Run ``python -m mtlcli <args>`` on ``nproc`` local ranks (gloo; on localhost:``port``, or a
    free port); the exit code of the job: 0, 130 when interrupted, 2 when the ranks stopped on an
    error they printed themselves. A rank that died raises ``RankFailed`` naming it."""
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
    try:
        run(options)
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        if all(code == INTERRUPTED for code in codes.values()):
            return INTERRUPTED
        if all(code == 2 for code in codes.values()):
            return 2
        # the cause, not a consequence: a rank killed by a signal or failing on its own, before the
        # ranks that then lost it (2) or were stopped (130)
        causes = {r: f for r, f in exc.failures.items() if f.exitcode not in (2, INTERRUPTED)} or exc.failures
        rank = min(causes, key=lambda r: (causes[r].timestamp, r))
        raise RankFailed(
            f"rank {rank} of {nproc} {describe(causes[rank].exitcode)}; the other ranks were stopped",
            "the run's last checkpoint is kept: the same command with --resume continues it",
        ) from None
    except (KeyboardInterrupt, SignalException):  # the user's Ctrl-C or kill: the ranks checkpoint and stop
        return INTERRUPTED
    return 0


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
