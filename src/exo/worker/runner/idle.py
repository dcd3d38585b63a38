"""An engine's deferred preparation, run while its runner has nothing to serve.

A piece of that work (a compile: seconds) cannot be interrupted, and the supervisor kills a
runner that does not stop within a few seconds of a Shutdown. So a Shutdown, or the end
of the supervisor's input, that arrives during a piece ends the process at once: nothing
is being served then, and the compile's cache stays sound (inductor writes each entry to a
temporary file and renames it into place).
"""

import os
import sys
import threading

from loguru import logger

from exo.worker.engines.base import WorksWhenIdle

_under_way = threading.Event()


def work_while_idle(engine: WorksWhenIdle) -> bool:
    """One piece of the engine's deferred work; False once none is left."""
    _under_way.set()
    try:
        return engine.idle_work()
    finally:
        _under_way.clear()


def stop_now_if_idle_working() -> None:
    """Called by the thread reading the supervisor's frames when told to stop."""
    if _under_way.is_set():
        logger.info("told to stop while preparing in idle time: exiting now")
        sys.stderr.flush()
        os._exit(0)
