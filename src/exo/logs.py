"""Loguru setup: readable console lines and JSON lines in a rotating file."""

import sys
from pathlib import Path

from loguru import logger


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
    logger.add(
        log_dir / "exo.jsonl",
        level="DEBUG",
        serialize=True,
        rotation="20 MB",
        retention=5,
        enqueue=True,
    )
