"""An interrupted command exits with 130 under ``python -m mtlcli`` even when CPython remembers a
KeyboardInterrupt as unhandled (one raised inside code an extension ran through PyRun_String,
which an import under way can be): without care the process then dies by SIGINT (-2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROBE = """
import ctypes, sys

import mtlcli.cli.app  # imports first: any later PyRun_String that ends well clears the flag
import mtlcli.__main__

run_string = ctypes.pythonapi.PyRun_String
run_string.restype = ctypes.py_object
run_string.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.py_object, ctypes.py_object]
try:
    run_string(b"raise KeyboardInterrupt", 257, {}, {})  # 257: Py_file_input
except KeyboardInterrupt:
    pass  # handled, as mtl handles SIGTERM; CPython's flag stays set all the same

def stopped():
    sys.stderr.write("interrupted\\n")
    raise SystemExit(130)

mtlcli.cli.app.main = stopped
mtlcli.__main__.main()
"""


def test_an_interrupted_command_run_as_a_module_exits_130(tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(PROBE)
    done = subprocess.run(
        [sys.executable, "-m", "probe"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{tmp_path}:{Path(__file__).parents[2]}", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr == "interrupted\n"
