"""`python -m exo.worker.runner`: a runner subprocess speaking frames on stdin/stdout."""

import os
import queue
import signal
import sys
import threading

from loguru import logger

from exo.worker.runner.process import FrameWriter, Runner, read_messages
from exo.worker.runner.protocol import RUNNER_CPUS_ENV, ToRunner


def pin_cpus() -> None:
    """Run on the CPUs the supervisor gave this runner, if any. Called before any thread
    starts (threads inherit the mask; torch sizes its pool by it). A value this machine
    cannot honour is logged and ignored: the runner then shares every core."""
    value = os.environ.get(RUNNER_CPUS_ENV, "").strip()
    if not value:
        return
    try:
        cpus = {int(cpu) for cpu in value.split(",")}
        os.sched_setaffinity(0, cpus)
    except (ValueError, OSError, AttributeError) as exc:
        logger.warning(f"ignoring {RUNNER_CPUS_ENV}={value!r}: {exc}")
        return
    logger.info(f"running on CPUs {sorted(cpus)}")


def main() -> int:
    # A terminal's Ctrl-C reaches the whole process group; the daemon stops its runners
    # in order (Shutdown frame, then kill), so the runner itself ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Frames own fd 1: keep a private handle to it, then point fd 1 (and sys.stdout) at
    # stderr so a stray print, or a library writing to fd 1, cannot corrupt the stream.
    frames_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("EXO_RUNNER_LOG_LEVEL", "INFO"))
    pin_cpus()

    inbox: queue.Queue[ToRunner | None] = queue.Queue()
    reader = threading.Thread(
        target=read_messages, args=(sys.stdin.buffer, inbox), name="runner-stdin", daemon=True
    )
    reader.start()
    try:
        return Runner(inbox, FrameWriter(frames_out)).run()
    finally:
        frames_out.close()


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:
        logger.exception("runner crashed")
        code = 1
    sys.stderr.flush()
    # The reader thread may be blocked reading stdin: normal interpreter shutdown would abort
    # on that stream's lock, so leave without it (frames were flushed and closed above).
    os._exit(code)
