"""Calls on daemon threads of their own, as futures: work a process must not wait for at exit (a hung
request whose twin already answered, the files of a checkpoint a crashed run abandons).
ThreadPoolExecutor's threads are joined when the interpreter exits, so one stuck call would hold the
process."""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

T = TypeVar("T")


def start_daemon(fn: Callable[[], T], name: str = "daemon-call") -> Future:
    """fn() on a new daemon thread; its result or exception through the returned future."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as err:  # noqa: BLE001 (handed to whoever reads the future)
            future.set_exception(err)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
