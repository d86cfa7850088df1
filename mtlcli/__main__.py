"""``python -m mtlcli`` and the ``mtl`` script. Importing the command line takes about half a
second (typer, polars, numpy); SIGTERM is handled from before that, so that a command stopped
while it starts exits with 130 like one stopped later (``mtlcli.cli.app.main`` then turns
SIGTERM into KeyboardInterrupt), not with the shell's 143. Nothing is written before then."""

import atexit
import contextlib
import os
import signal
import sys

INTERRUPTED = 130


def _stopped_while_starting(signum: int, frame: object) -> None:
    if os.environ.get("MTL_LAUNCHER") != "1":  # a rank of `mtl train --nproc`: its launcher says why
        sys.stderr.write("interrupted\n")
    os._exit(INTERRUPTED)


def _exit_interrupted() -> None:
    """Leave with 130 once the command has settled (its ``finally`` blocks ran). Under ``python -m``,
    CPython 3.11 turns any exit into death by SIGINT (-2) when the KeyboardInterrupt that stopped
    the command was raised inside code an extension ran through ``PyRun_String`` (an import in
    progress can be one): the interpreter remembers it as unhandled although mtl handled it. So the
    exit functions run here and the process ends with 130 itself."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing more to say
            stream.flush()
    os._exit(INTERRUPTED)


def main() -> None:
    signal.signal(signal.SIGTERM, _stopped_while_starting)
    from mtlcli.cli.app import main as run

    try:
        run()
    except SystemExit as stop:
        if stop.code == INTERRUPTED:
            _exit_interrupted()
        raise


if __name__ == "__main__":
    main()
