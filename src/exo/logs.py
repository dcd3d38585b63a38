"""Loguru setup: readable console lines and JSON lines in a rotating file."""

import logging
import sys
from logging.handlers import RotatingFileHandler
from pathlib import Path

from loguru import logger

LOG_FILE = "exo.jsonl"
ROTATE_BYTES = 20 * 1024 * 1024
KEPT_FILES = 5


class JsonLinesFile(RotatingFileHandler):
    """The log file, rotated by size (exo.jsonl, exo.jsonl.1, ...).

    A write that fails (a full disk, a file cap) is said once on stderr, with the reason,
    and not again until a write succeeds: the console keeps every record meanwhile. Loguru's
    own file sink would print an error block with a traceback for every record instead.
    """

    def __init__(
        self, path: Path, rotate_bytes: int = ROTATE_BYTES, kept: int = KEPT_FILES
    ) -> None:
        super().__init__(
            path, maxBytes=rotate_bytes, backupCount=kept, encoding="utf-8", delay=True
        )
        self.failing = False
        self._failed_now = False

    def write(self, line: str) -> None:
        self._failed_now = False
        self.emit(logging.makeLogRecord({"msg": line.rstrip("\n")}))
        if self.failing and not self._failed_now:
            self.failing = False
            sys.stderr.write(f"exo: the log file {self.baseFilename} is written again\n")

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed_now = True
        if self.stream is not None:  # drop what it holds; the next record opens it anew
            try:
                self.stream.close()
            except OSError:
                pass
            self.stream = None  # pyright: ignore[reportAttributeAccessIssue]
        if not self.failing:
            self.failing = True
            error = sys.exc_info()[1]
            sys.stderr.write(
                f"exo: the log file {self.baseFilename} cannot be written ({error}); "
                "logging to the console only until it can\n"
            )


def setup_logging(log_dir: Path, verbose: bool) -> None:
    logger.remove()
    level = "DEBUG" if verbose else "INFO"
    logger.add(
        sys.stderr,
        level=level,
        format="<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
        "<cyan>{name}</cyan> {message}",
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = JsonLinesFile(log_dir / LOG_FILE)
    # Written by loguru's own thread (enqueue): a slow disk never holds up the event loop.
    logger.add(log_file.write, level="DEBUG", serialize=True, enqueue=True)
