"""python -m infd.cli: the `infd` command (torchrun -m infd.cli eval-gen ... runs it on every rank)."""
import logging
import os
import sys

from infd.cli import main
from infd.utils.process_main import run_as_process

code = run_as_process(main)
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A rank of a torchrun job leaves without Python's finalization. A gloo worker thread can drop its
    # last reference to a collective's tensor after the process group is destroyed and the interpreter
    # has begun to shut down; that decref needs the GIL, the thread is made to exit while unwinding
    # through C++, and the process aborts ("terminate called without an active exception"). Seen in 2
    # of 4 test-suite runs on the 2-rank eval-gen; the core dump's stack: pt_gloo_runloop ->
    # ~TensorImpl -> decref_pyobject -> take_gil -> PyThread_exit_thread -> std::terminate (the race
    # pytorch/pytorch#179291 describes). Every output is written by now; flush and leave.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
