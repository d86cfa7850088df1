"""``python -m mtlcli`` and the ``mtl`` script. Importing the command line takes about half a
second (typer, polars, numpy); SIGTERM is handled from before that, so that a command stopped
while it starts exits with 130 like one stopped later (``mtlcli.cli.app.main`` then turns
SIGTERM into KeyboardInterrupt), not with the shell's 143. Nothing is written before then."""

import os
import signal
import sys


def _stopped_while_starting(signum: int, frame: object) -> None:
    if os.environ.get("MTL_LAUNCHER") != "1":  # a rank of `mtl train --nproc`: its launcher says why
        sys.stderr.write("interrupted\n")
    os._exit(130)


def main() -> None:
    signal.signal(signal.SIGTERM, _stopped_while_starting)
    from mtlcli.cli.app import main as run

    run()


if __name__ == "__main__":
    main()
