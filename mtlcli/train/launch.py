"""`mtl train --nproc N`: start N local training processes through torch's own launcher (the
machinery behind ``torchrun``), and tell the user in one line what became of them."""

from __future__ import annotations

import os
import signal

from mtlcli.errors import MtlError

INTERRUPTED = 130


class RankFailed(MtlError):
    """A training process died or failed; the others were stopped."""


def launch(nproc: int, args: list[str]) -> int:
    """Run ``python -m mtlcli <args>`` on ``nproc`` local ranks (gloo, a free port on localhost);
    the exit code of the job: 0, 130 when interrupted, 2 when the ranks stopped on an error they
    printed themselves. A rank that died raises ``RankFailed`` naming it."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for name in list(logging.root.manager.loggerDict):  # the launcher's own notes: we say what failed
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # each rank sets its threads from train.threads
    options = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "mtlcli", *args])
    try:
        run(options)
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        if all(code == INTERRUPTED for code in codes.values()):
            return INTERRUPTED
        if all(code == 2 for code in codes.values()):
            return 2
        rank, first = exc.get_first_failure()
        raise RankFailed(
            f"rank {rank} of {nproc} {describe(first.exitcode)}; the other ranks were stopped",
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
