"""Run an entry point as the whole life of its process, without rescanning its imports for garbage.

A training process imports about half a million objects that live until it exits: torch, torch._dynamo (which
any torch optimizer imports), DeepSpeed, sympy. CPython's full collections scan every tracked object, so each
one costs about 0.1-0.25 s, and the interpreter's collections at exit about 1.3 s, on this project's 2-core CPU
test machine. `gc.freeze()` moves the objects alive at that moment into a permanent generation that
collections skip: the standard way to keep a large long-lived heap out of the collector's work. A tiny
2-step training run exits 1.6 s sooner (8.4 s -> 6.7 s, 3 runs each), which the test suite's ~150 processes
feel; a real job gains the same seconds at its start and end.

Only for a process's own entry point (`if __name__ == "__main__":`, a console script): a library call or a
test calling main() in-process keeps its normal collector."""
from __future__ import annotations

import atexit
import gc
from typing import Callable, TypeVar

T = TypeVar("T")


def run_as_process(main: Callable[[], T]) -> T:
    """main(), with what is alive now (the entry point's imports) frozen out of later full collections,
    and everything frozen again at exit. Freezing keeps objects alive, it never frees one early, so the
    only cost is that cyclic garbage made before a freeze is not reclaimed (at exit: not at all, which
    is the point; open files and workers are closed explicitly by the code that owns them)."""
    gc.freeze()
    atexit.register(gc.freeze)  # registered first, so it runs after every later atexit handler
    return main()
